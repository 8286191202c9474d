"""Data parallel (FSDP2 over gloo on CPU, two ranks under torchrun) equals one process.

Each rank trains on its share of ``pack_micro_batches(..., dp_size=2)``; one process trains on
all the micro-batches. After one step the weights (read back from the DP run's checkpoint,
gathered from the shards) and the step loss agree, so the cross-rank loss weighting and the
gradient reduction are exact; fresh sharded trainers loading that checkpoint compute the
same next loss. Run as a script, this file is the per-rank worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CFG = {"lr": 2e-2, "weight_decay": 0.1, "micro_batch_tokens": 40}


def _samples(path: Path):
    from tests.trainer.conftest import load_hf, make_samples

    return make_samples(load_hf(path), 7, seed=50)


def _worker(model_path: str, out: str) -> None:
    import torch.distributed as dist

    from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
    from mopd.packing import pack_micro_batches
    from trainer.torch_backend import TorchTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    per_rank = pack_micro_batches(
        _samples(Path(model_path)), micro_batch_tokens=CFG["micro_batch_tokens"], dp_size=2
    )
    trainer = TorchTrainer(
        TrainerConfig(**CFG), ModelConfig(path=model_path), AlgorithmConfig(), device="cpu"
    )
    metrics = trainer.forward_backward(per_rank[rank])
    metrics |= trainer.optim_step()
    trainer.save(Path(out) / "ckpt")
    trainer.export_weights(Path(out) / "export", trainer.version)
    # Resume on fresh sharded trainers: the next step matches the uninterrupted one.
    resumed = TorchTrainer(
        TrainerConfig(**CFG), ModelConfig(path=model_path), AlgorithmConfig(), device="cpu"
    )
    resumed.load(Path(out) / "ckpt")
    nxt = [trainer.forward_backward(per_rank[rank])["loss"]]
    nxt.append(resumed.forward_backward(per_rank[rank])["loss"])
    metrics["next_loss"], metrics["next_loss_resumed"] = nxt
    if rank == 0:
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
    dist.destroy_process_group()


def test_fsdp_two_ranks_equal_one_process(tiny_models, make_trainer, tmp_path):
    from mopd.packing import pack_micro_batches
    from tests.trainer.conftest import params
    from trainer.export import read_export_version

    path = tiny_models["mimo_v2_flash"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, str(path), str(tmp_path),
    ]  # fmt: skip
    # A session of its own, so a hung run is stopped with its rank processes, not only torchrun.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    dp_metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert read_export_version(tmp_path / "export") == 1

    per_rank = pack_micro_batches(
        _samples(path), micro_batch_tokens=CFG["micro_batch_tokens"], dp_size=2
    )
    assert all(len(r) == len(per_rank[0]) for r in per_rank)
    single = make_trainer(path, **CFG)
    metrics = single.forward_backward([mb for r in per_rank for mb in r])
    metrics |= single.optim_step()

    assert abs(dp_metrics["loss"] - metrics["loss"]) < 1e-6
    assert dp_metrics["next_loss_resumed"] == dp_metrics["next_loss"]
    assert dp_metrics["next_loss"] != dp_metrics["loss"]
    for key in ("num_tokens", "num_samples", "tokens"):
        assert dp_metrics[key] == metrics[key]
    assert abs(dp_metrics["grad_norm"] - metrics["grad_norm"]) < 1e-5
    assert abs(dp_metrics["route_agreement"] - metrics["route_agreement"]) < 1e-9
    dp_weights = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    ours = params(single.model)
    assert dp_weights.keys() >= ours.keys()
    assert max(float((dp_weights[k] - ours[k]).abs().max()) for k in ours) < 1e-6


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
