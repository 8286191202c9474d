"""The reward-function protocol shared by every verifier of the environment role.

A reward function scores one finished response of the student against what the prompt's
data source stored for it: ``answer`` (the reference answer, None when the source has none)
and ``metadata`` (source-specific, JSON-serialisable fields, e.g. a reasoning-gym entry).
It returns a finite float, normally in [0, 1]. It may raise on bad input (a missing
reference answer, malformed metadata): the ``RewardWorker`` turns an exception into reward
0 and a counted ``reward_error``, and a call that hangs into reward 0 and a counted
``reward_timeout``, so a verifier never takes a run down.

Reward functions run in worker processes: they must be picklable (module-level functions or
``functools.partial`` of them) and must not rely on state of the calling process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["RewardFn"]


@runtime_checkable
class RewardFn(Protocol):
    """``(response, answer, metadata) -> reward``."""

    def __call__(self, response: str, answer: str | None, metadata: Mapping[str, Any]) -> float:
        """Score ``response`` (the decoded student output) for one prompt."""
        ...
