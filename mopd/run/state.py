"""Where a run keeps its files, and the two counters every part of the run reads.

``RunState`` is owned by the driver and read by the parts it drives (producer, evaluation,
weights, ledger): they never reference the driver itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints

__all__ = ["DRIVER_STATE", "TRAINED_LOG", "RunPaths", "RunState"]

DRIVER_STATE = "driver_state.json"
TRAINED_LOG = "trained_samples.jsonl"


@dataclasses.dataclass
class RunState:
    """The run's position: optimizer steps taken and the policy version they made.

    ``version`` is the version of the trainer's weights (``step`` + the versions of a resumed
    run); the rollout servers may still serve an older one until the next weight sync.
    """

    step: int = 0
    version: int = 0
    stop_requested: bool = False
    """Set by SIGINT: finish this step, checkpoint and stop."""


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files, all under ``run.output_dir``."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def models(self) -> Path:
        return self.root / "models_cache"

    @property
    def trained_log(self) -> Path:
        return self.root / TRAINED_LOG

    @property
    def model(self) -> Path:
        """The trained model of a finished run (HF layout)."""
        return self.root / "model"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint directory of ``step``."""
        return checkpoint_dir(self.checkpoints, step)

    def latest_checkpoint(self) -> Path | None:
        """The newest committed checkpoint, None when there is none."""
        return latest_checkpoint(self.checkpoints) if self.checkpoints.exists() else None

    def committed_checkpoints(self) -> list[Path]:
        """Every committed checkpoint, oldest first."""
        return list_checkpoints(self.checkpoints)

    def make_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (self.checkpoints, self.weights, self.logs):
            sub.mkdir(exist_ok=True)
