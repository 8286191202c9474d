"""What a step measured: phase times, rollout statistics, the tracked metrics and the one
line the progress bar prints."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping

import numpy as np

__all__ = ["StepStats", "summary_line"]


@dataclasses.dataclass
class StepStats:
    """Accumulated during one step by the producer and the loop; ``clear`` starts the next."""

    phase_s: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    """Seconds per phase (rollout, reward, teacher, train, checkpoint, sync)."""
    rollout: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    """Per-sample values: reward/<domain>, response_length/<domain>, truncated."""

    def clear(self) -> None:
        self.phase_s.clear()
        self.rollout.clear()

    def metrics(self, step_s: float) -> dict[str, float]:
        """time/<phase>_s, time/step_s, rollout/<key> means, rollout throughput."""
        out: dict[str, float] = {f"time/{k}_s": v for k, v in self.phase_s.items()}
        out["time/step_s"] = step_s
        for key, values in self.rollout.items():
            if values:
                out[f"rollout/{key}"] = float(np.mean(values))
        tokens = sum(sum(v) for k, v in self.rollout.items() if k.startswith("response_length/"))
        out["throughput/rollout_tokens_per_s"] = tokens / step_s if step_s > 0 else 0.0
        return out


def summary_line(step: int, m: Mapping[str, float]) -> str:
    """``step 3  loss=..  gnorm=..  tlr=..  reward/arithmetic=0.5  acc/arithmetic=0.6``."""
    keys = [
        ("loss", "loss"),
        ("grad_norm", "gnorm"),
        ("teacher_log_ratio", "tlr"),
        ("masked_fraction", "masked"),
        ("time/step_s", "s"),
    ]
    parts = [f"step {step}"]
    parts += [f"{short}={m[k]:.4g}" for k, short in keys if k in m]
    parts += [
        f"{k.split('/', 1)[1]}={v:.3f}"
        for k, v in sorted(m.items())
        if k.startswith("rollout/reward/")
    ]
    parts += [
        f"acc/{k.rsplit('/', 1)[1]}={v:.3f}"
        for k, v in sorted(m.items())
        if k.startswith("eval/accuracy/")
    ]
    return "  ".join(parts)
