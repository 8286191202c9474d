"""RewardWorker on real worker processes: correct scores, and a verifier that hangs, crashes,
raises or returns garbage gives reward 0 and a counted metric while the pool recovers."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import reasoning_gym

from envs.registry import REWARDS
from envs.worker import RewardWorker
from mopd.types import Prompt, RolloutSample


# Verifiers that misbehave; module level so the worker processes can unpickle them.
def sleep_forever(response, answer, metadata):
    time.sleep(10_000)


def crash(response, answer, metadata):
    os._exit(3)


def raises(response, answer, metadata):
    raise RuntimeError("verifier bug")


def not_a_number(response, answer, metadata):
    return "yes" if response else math.nan


@pytest.fixture(scope="module")
def worker():
    rewards = {
        **REWARDS,
        "sleep": sleep_forever,
        "crash": crash,
        "raises": raises,
        "garbage": not_a_number,
    }
    sources = {"sum": "reasoning_gym", "qa": "exact_match", "math": "math_equivalence"}
    sources |= {name: name for name in ("sleep", "crash", "raises", "garbage")}
    w = RewardWorker(sources, rewards=rewards, timeout_s=2.0, num_processes=2)
    yield w
    w.close()


def _sample(source: str, response: str, answer, metadata=None) -> RolloutSample:
    prompt = Prompt(
        prompt_id=f"{source}/0",
        source=source,
        domain="d",
        input_ids_P=np.array([1]),
        answer=answer,
        metadata=metadata or {},
    )
    return RolloutSample(
        sample_id=f"{source}/0#0",
        prompt=prompt,
        response_ids_T=np.array([1]),
        logp_rollout_T=np.zeros(1),
        versions_T=np.zeros(1),
        finish_reason="stop",
        text=response,
    )


def _healthy_batch() -> tuple[list[RolloutSample], list[float]]:
    entries = list(reasoning_gym.create_dataset("chain_sum", size=4, seed=2))
    samples, expected = [], []
    for i, entry in enumerate(entries):
        meta = {"reasoning_gym": {"dataset": "chain_sum", "config": {}, "entry": entry}}
        response = entry["answer"] if i % 2 == 0 else "-1000000"
        samples.append(_sample("sum", response, entry["answer"], meta))
        expected.append(1.0 if i % 2 == 0 else 0.0)
    samples += [_sample("qa", " Paris ", "Paris"), _sample("math", "\\boxed{1/2}", "0.5")]
    return samples, [*expected, 1.0, 1.0]


def test_scores_real_items(worker):
    samples, expected = _healthy_batch()
    assert worker.score(samples) == expected


def test_hung_verifier_times_out_and_the_pool_recovers(worker):
    before = worker.metrics()
    samples, expected = _healthy_batch()
    start = time.monotonic()
    rewards = worker.score([_sample("sleep", "x", "x"), *samples])
    assert time.monotonic() - start < 30
    assert rewards == [0.0, *expected]
    after = worker.metrics()
    assert after["reward_timeout"] - before["reward_timeout"] == 1
    assert after["reward_timeout/sleep"] - before.get("reward_timeout/sleep", 0.0) == 1
    assert after["reward_error"] == before["reward_error"]
    # The hung process was replaced: a second hang times out too, healthy calls still score.
    assert worker.score([_sample("sleep", "y", "y"), *samples]) == [0.0, *expected]
    assert worker.metrics()["reward_timeout"] - before["reward_timeout"] == 2


def test_crashing_raising_and_garbage_verifiers_count_as_errors(worker):
    before = worker.metrics()
    samples, expected = _healthy_batch()
    bad = [_sample(s, "r", "a") for s in ("crash", "raises", "garbage")]
    bad.append(_sample("garbage", "", "a"))  # NaN
    assert worker.score([*bad, *samples]) == [0.0] * 4 + expected
    after = worker.metrics()
    assert after["reward_error"] - before["reward_error"] == 4
    assert after["reward_error/garbage"] - before.get("reward_error/garbage", 0.0) == 2
    assert after["reward_calls"] - before["reward_calls"] == 4 + len(samples)
    assert worker.score(samples) == expected


def test_misconfiguration_fails_before_scoring(worker):
    with pytest.raises(ValueError, match=r"no reward configured for source\(s\) \['nope'\]"):
        worker.score([_sample("nope", "r", "a")])
    with pytest.raises(LookupError, match="unknown reward 'nope'"):
        RewardWorker({"s": "nope"})
