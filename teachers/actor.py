"""``TeacherScorerActor``: a thin Ray actor around one teacher's ``TeacherScorer``.

The teacher's servers are started elsewhere (the driver launches them like rollout servers:
the same engine, prefill-only traffic); the actor receives their URLs, holds the scorer's
connections and forwards scoring calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mopd.types import RolloutSample
from teachers.base import TeacherScores
from teachers.scorer import TeacherScorer

__all__ = ["TeacherScorerActor", "remote_teacher_scorer"]


class TeacherScorerActor:
    """Forwards to a ``TeacherScorer`` (same arguments)."""

    def __init__(self, name: str, urls: Sequence[str], **scorer_kwargs: Any):
        self._scorer = TeacherScorer(name, urls, **scorer_kwargs)

    def name(self) -> str:
        return self._scorer.name

    async def score(
        self, prompt_ids_P: Sequence[int] | np.ndarray, response_ids_T: Sequence[int] | np.ndarray
    ) -> TeacherScores:
        return await self._scorer.score(prompt_ids_P, response_ids_T)

    async def score_samples(self, samples: Sequence[RolloutSample]) -> list[TeacherScores]:
        return await self._scorer.score_samples(samples)

    async def health(self) -> bool:
        return await self._scorer.health()

    async def shutdown(self) -> None:
        await self._scorer.aclose()


def remote_teacher_scorer(**ray_options: Any) -> Any:
    """The Ray actor class for ``TeacherScorerActor`` (ray.remote options as keywords)."""
    import ray

    cls = TeacherScorerActor
    return ray.remote(**ray_options)(cls) if ray_options else ray.remote(cls)
