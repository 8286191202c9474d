"""RewardActor on a local Ray cluster: rollout samples in, rewards and failure counts out."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from envs.actor import remote_reward_actor
from mopd.types import Prompt, RolloutSample
from tests.ray_local import private_ray


@pytest.fixture(scope="module")
def ray_local():
    with private_ray(num_cpus=1):
        yield


def _sample(response: str, answer: str | None) -> RolloutSample:
    prompt = Prompt(prompt_id="qa/0", source="qa", domain="d", input_ids_P=[1], answer=answer)
    return RolloutSample(
        sample_id="qa/0#0",
        prompt=prompt,
        response_ids_T=np.array([1]),
        logp_rollout_T=np.zeros(1),
        versions_T=np.zeros(1),
        finish_reason="stop",
        text=response,
    )


def test_actor_forwards_scores_and_metrics(ray_local):
    actor = remote_reward_actor(num_cpus=0).remote(
        {"qa": "exact_match"}, timeout_s=5.0, num_processes=1
    )
    batch = [_sample("Paris", "Paris"), _sample("Lyon", "Paris"), _sample("x", None)]
    assert ray.get(actor.score.remote(batch)) == [1.0, 0.0, 0.0]
    metrics = ray.get(actor.metrics.remote())
    assert metrics["reward_calls"] == 3 and metrics["reward_error"] == 1  # no reference answer
    ray.get(actor.close.remote())
    ray.kill(actor)
