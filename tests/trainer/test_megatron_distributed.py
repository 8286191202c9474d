"""Megatron backend on two gloo ranks (CPU) equals the torch backend in one process.

Each rank runs the Megatron trainer on its share of ``pack_micro_batches(..., dp_size=2)``,
first with data parallel 2 (dense and expert weights replicated), then with expert parallel 2
(each rank holds half the experts; tokens travel through Megatron's allgather dispatcher; the
grouped-GEMM experts), then tensor parallel 2 with sequence parallelism and expert parallel 2. One
torch-backend process trains on all the micro-batches. Per-token log-probs, the step loss, the
grad norm, the loss after one AdamW step and the exported weights after it must agree, so the
model, the cross-rank loss weighting, Megatron's gradient reduction and optimizer, and the
gather of expert-parallel weights into an HF checkpoint are exact. Under expert parallelism a
checkpoint saved by both ranks is also reloaded by a fresh trainer, bit for bit.

Run as a script (under torchrun), this file is the per-rank worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip(
    "megatron.core", reason="needs the [megatron] extra: pip install -e '.[megatron]'"
)

REPO = Path(__file__).resolve().parents[2]
# adam_eps 1e-4: Adam's first step is lr * g / (|g| + eps), sign-like for |g| << eps; a large
# eps keeps fp32 noise of near-zero gradients (~1e-7 across implementations) from being
# amplified to a full lr-sized difference, so weights after the step compare to 1e-5.
CFG = {"lr": 1e-3, "weight_decay": 0.1, "adam_eps": 1e-4, "micro_batch_tokens": 40}
LAYOUTS = {
    "dp2": {"data_parallel": 2},
    "ep2": {"data_parallel": 2, "expert_parallel": 2},
    "tp2_ep2": {"tensor_parallel": 2, "expert_parallel": 2},
}
# Expert implementation per layout: Megatron's SequentialMLP, or the grouped-GEMM experts.
EXPERTS = {"dp2": "sequential", "ep2": "grouped", "tp2_ep2": "sequential"}
# 8 heads, 2 KV heads in global layers and 4 in sliding ones: both split over TP 2, with GQA.
MODEL = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "v_head_dim": 8}


def _per_rank(path: Path, dp: int = 2):
    from mopd.packing import pack_micro_batches
    from tests.trainer.conftest import load_hf, make_samples

    samples = make_samples(load_hf(path), 7, seed=50)
    return pack_micro_batches(samples, micro_batch_tokens=CFG["micro_batch_tokens"], dp_size=dp)


def _worker(model_path: str, out: str) -> None:
    import torch.distributed as dist

    from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
    from trainer.megatron.backend import MegatronTrainer
    from trainer.megatron.parallel import destroy_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name, layout in LAYOUTS.items():
        dp = layout.get("data_parallel", 1)
        mine = _per_rank(Path(model_path), dp)[rank % dp]
        trainer = MegatronTrainer(
            TrainerConfig(backend="megatron", **CFG, **layout),
            ModelConfig(path=model_path),
            AlgorithmConfig(),
            experts=EXPERTS[name],
        )
        logp = [x.tolist() for x in trainer.compute_logprobs(mine)]
        step = trainer.forward_backward(mine)
        step |= trainer.optim_step()
        trainer.save(Path(out) / f"ckpt_{name}")
        after = trainer.forward_backward(mine)
        trainer.export_weights(Path(out) / f"export_{name}", trainer.version)
        every: list = [None, None]
        dist.all_gather_object(every, logp)
        results[name] = {"step": step, "after": after, "logp": every[:dp]}
        if name == "ep2":  # each rank saved its own experts: a fresh trainer resumes exactly
            del trainer
            resumed = MegatronTrainer(
                TrainerConfig(backend="megatron", **CFG, **layout),
                ModelConfig(path=model_path),
                AlgorithmConfig(),
                experts=EXPERTS[name],
            )
            resumed.load(Path(out) / f"ckpt_{name}")
            results[name]["resumed"] = resumed.forward_backward(mine)
        destroy_parallel(keep_process_group=True)
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _run_torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """torchrun with 2 ranks on a free loopback port; the whole process group is killed if
    it overruns, so no rank outlives the test."""
    from trainer.megatron.parallel import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        __file__, *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_dp2_ep2_tp2_equal_the_torch_backend(make_trainer, tmp_path):
    from mopd.models.tiny import build_tiny_checkpoint
    from tests.trainer.conftest import load_hf, params
    from trainer.export import read_export_version

    path = build_tiny_checkpoint(tmp_path / "model", "mimo_v2_flash", seed=0, **MODEL)
    proc = _run_torchrun([str(path), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())

    ref = make_trainer(path, **CFG)
    # Reference log-probs for both packings (two data-parallel ranks, or one).
    ref_logp = {
        dp: ref.compute_logprobs([mb for r in _per_rank(path, dp) for mb in r]) for dp in (1, 2)
    }
    step = ref.forward_backward([mb for r in _per_rank(path) for mb in r])
    step |= ref.optim_step()
    after = ref.forward_backward([mb for r in _per_rank(path) for mb in r])
    assert after["loss"] != 0.0
    ref_weights = params(ref.model)

    for name, layout in LAYOUTS.items():
        got = results[name]
        logp = [np.asarray(x) for rank_logp in got["logp"] for x in rank_logp]
        expected = ref_logp[layout.get("data_parallel", 1)]
        assert len(logp) == len(expected), name
        for a, b in zip(logp, expected):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        # The step's loss does not depend on how the samples were packed.
        for key in ("num_tokens", "num_samples"):
            assert got["step"][key] == step[key], (name, key)
        assert got["step"]["loss"] == pytest.approx(step["loss"], abs=1e-5), name
        assert got["step"]["grad_norm"] == pytest.approx(step["grad_norm"], rel=1e-5), name
        assert got["step"]["route_agreement"] == pytest.approx(step["route_agreement"]), name
        assert got["step"]["train_rollout_k3"] == pytest.approx(step["train_rollout_k3"], rel=1e-4)
        # One AdamW step later (with weight decay): same loss, same weights.
        assert got["after"]["loss"] == pytest.approx(after["loss"], abs=1e-5), name
        if "resumed" in got:  # multi-rank checkpoint: bit-exact resume
            assert got["resumed"] == got["after"]
        export = tmp_path / f"export_{name}"
        assert read_export_version(export) == 1
        exported = params(load_hf(export))
        assert exported.keys() == ref_weights.keys()
        worst = max(float((exported[k] - ref_weights[k]).abs().max()) for k in ref_weights)
        assert worst < 1e-5, (name, worst)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
