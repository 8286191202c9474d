"""The run's errors: one the user acts on, one the loop recovers from."""

from __future__ import annotations

__all__ = ["RunError", "TrainerDied"]


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class TrainerDied(RuntimeError):
    """The trainer actor's process is gone (killed, OOM, crashed): the loop restarts it from
    the last committed checkpoint."""
