"""The run wing: the driver and the single-purpose parts it drives (see ``driver``).

It is the one place that wires the roles (rollout, teachers, envs, trainer) together; roles
and the core never import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .driver import Driver, train
from .errors import RunError
from .ledger import read_audit_log
from .state import TRAINED_LOG, RunPaths

__all__ = ["Driver", "RunError", "RunPaths", "train", "trained_log", "trained_sample_ids"]


def trained_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The run's audit log: one record per committed step (step, the version it trained,
    its sample ids and the oldest token version of each)."""
    return read_audit_log(Path(output_dir) / TRAINED_LOG)


def trained_sample_ids(output_dir: str | Path) -> list[str]:
    """Every sample id trained by committed steps, in order."""
    return [sid for record in trained_log(output_dir) for sid in record["samples"]]
