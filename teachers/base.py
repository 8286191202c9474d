"""What a teacher gives the MOPD pipeline: its log-probs of the student's sampled tokens.

A teacher is a named model served for prefill-only scoring (SGLang or the embedded engine,
reached through ``mopd.inference``). For each student response it returns one log-prob per
response token, ``log pi_teacher(y_t | x, y_<t)``, and optionally its top-K alternatives per
position. ``teachers.scorer.TeacherScorer`` implements this protocol.

Shapes: T response tokens, K top log-probs per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from mopd.types import RolloutSample

__all__ = ["Teacher", "TeacherScores", "TeacherUnavailableError"]


class TeacherUnavailableError(RuntimeError):
    """A teacher stayed unreachable past its retries: the run must stop, not score zeros."""


@dataclass(frozen=True, eq=False)
class TeacherScores:
    """One teacher's scores of one student response.

    Produced by: a teacher scorer. Consumed by: the step that builds a ``ScoredSample``.
    """

    teacher: str
    """Name of the teacher."""
    logp_T: np.ndarray
    """float32 [T] teacher log-prob of each sampled response token."""
    topk_logp_TK: np.ndarray | None = None
    """float32 [T, K] the teacher's top-K log-probs at each response position."""
    topk_ids_TK: np.ndarray | None = None
    """int32 [T, K] the token ids of those top-K entries."""
    weight_version: str | None = None
    """Version label of the teacher weights that scored."""


@runtime_checkable
class Teacher(Protocol):
    name: str

    async def score(
        self, prompt_ids_P: Sequence[int] | np.ndarray, response_ids_T: Sequence[int] | np.ndarray
    ) -> TeacherScores:
        """Score one response; raises ``TeacherUnavailableError`` if the teacher is down."""
        ...

    async def score_samples(self, samples: Sequence[RolloutSample]) -> list[TeacherScores]:
        """Score many rollout samples (concurrently); results in input order."""
        ...

    async def aclose(self) -> None: ...
