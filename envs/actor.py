"""``RewardActor``: a thin Ray actor around ``RewardWorker``; every method forwards.

The worker's process pool lives inside the actor's process, so verifier processes run where
Ray placed the actor and die with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envs.worker import RewardWorker
from mopd.types import RolloutSample

__all__ = ["RewardActor", "remote_reward_actor"]


class RewardActor:
    """Forwards to a ``RewardWorker`` built with the same arguments."""

    def __init__(
        self, source_rewards: Mapping[str, str], *, timeout_s: float = 10.0, num_processes: int = 2
    ) -> None:
        self._worker = RewardWorker(
            source_rewards, timeout_s=timeout_s, num_processes=num_processes
        )

    def score(self, samples: Sequence[RolloutSample]) -> list[float]:
        return self._worker.score(samples)

    def score_texts(
        self, items: Sequence[tuple[str, str, str | None, Mapping[str, Any]]]
    ) -> list[float]:
        return self._worker.score_texts(items)

    def metrics(self) -> dict[str, float]:
        return self._worker.metrics()

    def close(self) -> None:
        self._worker.close()


def remote_reward_actor(**ray_options: Any) -> Any:
    """The Ray actor class for ``RewardActor`` (``num_cpus=...`` etc. as ray.remote options)."""
    import ray

    return ray.remote(**ray_options)(RewardActor) if ray_options else ray.remote(RewardActor)
