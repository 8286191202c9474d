"""The trainer protocol: the narrow API every backend implements.

A driver (or a test) feeds micro-batches and steps the optimizer; nothing else of a
backend is visible outside it. The same pair of calls torchtitan's RL trainer and
tinker's ``train_step`` use:

    metrics = trainer.forward_backward(micro_batches)   # accumulate gradients
    metrics |= trainer.optim_step()                      # clip, step, schedule; version += 1
    trainer.export_weights(dir, trainer.version)         # HF safetensors for rollout servers
    trainer.save(ckpt_dir) / trainer.load(ckpt_dir)      # exact resume

Losses come from ``mopd.algo`` through its registry, selected by ``AlgorithmConfig.loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from mopd.types import MicroBatch


@runtime_checkable
class Trainer(Protocol):
    """What the driver may call on a trainer backend."""

    @property
    def version(self) -> int:
        """Policy version: the number of optimizer steps applied (0 = initial weights)."""
        ...

    def forward_backward(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """Forward and backward over the micro-batches of one step; gradients accumulate.

        The loss of each micro-batch is weighted so that the step's gradient equals the
        gradient of the configured aggregation over all of the step's micro-batches.
        Returns metrics (loss, per-token statistics, R3 route agreement, train/rollout
        mismatch, per-domain figures) as floats.
        """
        ...

    def optim_step(self) -> dict[str, float]:
        """Clip gradients, step the optimizer and the LR schedule, zero gradients, bump the
        version. Returns grad norm, learning rate, and the new version."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint atomically (model, optimizer, LR schedule, RNG, step, version)."""
        ...

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by ``save`` exactly."""
        ...

    def export_weights(self, path: str | Path, version: int) -> Path:
        """Write the weights in Hugging Face layout (sharded safetensors + config) atomically,
        tagged with ``version``, for rollout servers to load."""
        ...
