"""Moved to ``mopd.run`` (the run wing); kept only until the pipeline imports from there."""

from pathlib import Path

from mopd.run import Driver, RunError, RunPaths, train, trained_log, trained_sample_ids


def _latest(root: Path) -> Path | None:
    from trainer.checkpoint import latest_checkpoint

    return latest_checkpoint(root) if root.exists() else None


__all__ = ["Driver", "RunError", "RunPaths", "train", "trained_log", "trained_sample_ids"]
