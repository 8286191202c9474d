"""Forward + backward time of the torch trainer's two micro-batch layouts on a CPU.

The trainer runs a micro-batch either as one packed row (``position_ids`` restarting per
sequence; what a varlen flash kernel wants) or as a right-padded [B, T] batch with an
attention mask (what it does with eager/sdpa attention; see trainer/torch_backend.py). With
eager attention the packed row computes the whole N x N score matrix of the row, most of it
masked, so short sequences packed into long rows waste compute quadratically.

This times ``TorchTrainer.forward_backward`` (the real trainer, SFT loss, R3 off) on the quick
start's tiny MiMo-V2-Flash model, for micro-batches of ``--sequences`` sequences of
``--length`` tokens packed into rows of ``--micro-batch-tokens``, once per layout (the packed
one forced through the ``packed`` property), best of ``--repeats`` after a warm-up. Prints a
table and, with ``--json``, writes the numbers.

    python benchmarks/bench_trainer_layout.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.models.tiny import build_tiny_checkpoint
from mopd.packing import pack_micro_batches
from mopd.types import Prompt, RolloutSample, ScoredSample
from trainer.torch_backend import TorchTrainer

REPO = Path(__file__).resolve().parents[1]


def samples(n: int, length: int, seed: int = 0) -> list[ScoredSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(3, 200, size=length)
        prompt = Prompt(f"p{i}", "bench", "bench", ids[: length // 2])
        resp = ids[length // 2 :]
        t = resp.shape[0]
        sample = RolloutSample(
            f"p{i}/0", prompt, resp, np.zeros(t, np.float32), np.zeros(t, np.int32), "stop"
        )
        out.append(ScoredSample(sample, reward=0.0, advantage=0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[256, 1024, 8192])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tiny = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())["init"]["tiny"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(Path(tmp) / "model", tiny["arch"], **tiny["config"])
        trainer = TorchTrainer(
            TrainerConfig(routing_replay=False),
            ModelConfig(path=str(path), dtype="float32"),
            AlgorithmConfig(loss="sft", aggregation="token_mean"),
        )
        data = samples(args.sequences, args.length)
        for mbt in args.micro_batch_tokens:
            (mbs,) = pack_micro_batches(data, micro_batch_tokens=mbt)
            for layout in ("packed", "padded"):
                type(trainer).packed = property(lambda self, p=layout == "packed": p)
                trainer.forward_backward(mbs)  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    trainer.optimizer.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    trainer.forward_backward(mbs)
                    best = min(best, time.perf_counter() - t0)
                tokens = args.sequences * args.length
                rows.append(
                    {
                        "micro_batch_tokens": mbt,
                        "micro_batches": len(mbs),
                        "layout": layout,
                        "seconds": round(best, 4),
                        "tokens_per_s": round(tokens / best),
                    }
                )
                print(
                    f"micro_batch_tokens={mbt:5d} ({len(mbs):3d} mb) {layout:6s} "
                    f"{best:7.3f} s  {tokens / best:8.0f} tokens/s",
                    flush=True,
                )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
