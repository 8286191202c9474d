"""The run's errors: one the user acts on, one the loop recovers from."""

from __future__ import annotations

__all__ = ["RedisUnavailable", "RunError", "TrainerDied"]


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class RedisUnavailable(RunError):
    """The training stream's Redis went away mid-run (and, for the embedded one, could not be
    restarted); the message names it, says that nothing acknowledged was lost and how to
    resume."""


class TrainerDied(RuntimeError):
    """The trainer actor's process is gone (killed, OOM, crashed): the loop restarts it from
    the last committed checkpoint."""
