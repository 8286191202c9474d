"""AdamW and the learning-rate schedule of ``TrainerConfig``.

Schedule (``lr_at``), with ``w = warmup_steps``, ``n = steps`` and the step index ``s``
counting optimizer steps already taken (the first update uses ``s = 0``):

    s <  w:  lr * (s + 1) / w                              linear warm-up, never exactly 0
    s >= w:  constant:  lr
             linear:    min_lr + (lr - min_lr) * (1 - p)
             cosine:    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2
             with p = min(1, (s - w) / max(1, n - w)), so runs longer than ``steps`` hold min_lr.

Weight decay applies to matrices only (ndim >= 2); norms, biases, attention sinks and router
biases (vectors) are not decayed, the usual AdamW practice for transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mopd.config.schema import LR_SCHEDULES, TrainerConfig

__all__ = ["LRSchedule", "build_optimizer", "build_scheduler", "lr_at", "step_metrics"]


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate of the update that follows ``step`` completed optimizer steps."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"trainer.lr_schedule={cfg.lr_schedule!r}; accepted values: {', '.join(LR_SCHEDULES)}"
        )
    w = max(0, int(cfg.warmup_steps))
    if step < w:
        return cfg.lr * (step + 1) / w
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min(1.0, (step - w) / max(1, cfg.steps - w))
    if cfg.lr_schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - p)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass
class LRSchedule:
    """``LambdaLR`` multiplier: ``lr_at(step) / lr`` (a callable object, so it pickles and its
    fields travel with the scheduler's state dict)."""

    lr: float
    min_lr: float
    schedule: str
    warmup_steps: int
    steps: int

    def __call__(self, step: int) -> float:
        cfg = TrainerConfig(
            lr=self.lr,
            min_lr=self.min_lr,
            lr_schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            steps=self.steps,
        )
        return lr_at(step, cfg) / self.lr if self.lr else 0.0


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: TrainerConfig
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decay on matrices only (see module docstring)."""
    if cfg.lr < 0 or cfg.min_lr < 0:
        raise ValueError(f"trainer.lr={cfg.lr} and trainer.min_lr={cfg.min_lr} must be >= 0")
    decay, no_decay = [], []
    for _name, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following ``lr_at``; call ``.step()`` once after each optimizer step."""
    lr_at(0, cfg)  # validates the schedule name up front
    fn = LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_schedule, int(cfg.warmup_steps), int(cfg.steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn)


def step_metrics(grad_norm: float, lr: float, version: int, skipped: bool) -> dict[str, float]:
    """What ``optim_step`` returns in every backend: the global grad norm before clipping, the
    LR of the update, the version after it, and whether a non-finite norm skipped it."""
    return {
        "grad_norm": grad_norm,
        "lr": lr,
        "version": float(version),
        "optim_skipped": float(skipped),
    }
