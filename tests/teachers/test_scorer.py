"""TeacherScorer against real local servers: the SGLang-shaped stand-in and the embedded engine."""

from __future__ import annotations

import asyncio
import shutil
import time

import numpy as np
import pytest

from mopd.inference.client import EngineClient
from mopd.inference.protocol import GenerateRequest, SamplingParams
from mopd.models.tiny import build_tiny_checkpoint
from mopd.types import Prompt, RolloutSample
from rollout.launcher import LaunchSpec, launch_server
from teachers.base import Teacher, TeacherUnavailableError
from teachers.scorer import TeacherScorer
from teachers.tokenizer import TokenizerMismatchError, check_tokenizer_compatible
from tests.inference.sglang_standin import free_port, standin_logprob

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5.0}


def run(coro):
    return asyncio.run(coro)


async def scored(scorer: TeacherScorer, items):
    async with scorer:
        return await scorer.score_batch(items)


def test_scores_exactly_the_sampled_tokens(standin):
    url, state = standin
    items = [([1, 2, 3], [7, 8]), ([4], [9, 10, 11, 12]), ([5, 6], [3])]
    scorer = TeacherScorer("math", [url], top_logprobs=2, **FAST)
    assert isinstance(scorer, Teacher)
    results = run(scored(scorer, items))
    for (prompt, response), res in zip(items, results, strict=True):
        expected = [standin_logprob(t, len(prompt) + i) for i, t in enumerate(response)]
        assert res.teacher == "math" and res.logp_T.dtype == np.float32
        np.testing.assert_allclose(res.logp_T, expected, rtol=1e-6)
        assert res.topk_ids_TK.dtype == np.int32 and res.topk_ids_TK.shape == (len(response), 2)
        assert res.topk_logp_TK.shape == (len(response), 2)
    bodies = state.bodies("/generate")
    assert all(b["sampling_params"] == {"max_new_tokens": 0} for b in bodies)


def test_scores_rollout_samples_and_empty_responses(standin):
    url, state = standin
    prompt = Prompt("p0", "src", "math", np.array([1, 2], np.int32))
    samples = [
        RolloutSample("p0-0", prompt, np.array([5, 6], np.int32), np.zeros(2), np.zeros(2), "stop"),
        RolloutSample("p0-1", prompt, np.zeros(0, np.int32), np.zeros(0), np.zeros(0), "stop"),
    ]

    async def go():
        async with TeacherScorer("math", [url], top_logprobs=3, **FAST) as scorer:
            return await scorer.score_samples(samples)

    full, empty = run(go())
    np.testing.assert_allclose(full.logp_T, [standin_logprob(5, 2), standin_logprob(6, 3)])
    assert empty.logp_T.shape == (0,) and empty.topk_ids_TK.shape == (0, 3)
    assert len(state.bodies("/generate")) == 1  # the empty response never reached the server


def test_batch_is_bounded_by_max_concurrency(standin):
    url, state = standin
    state.prefill_delay_s = 0.05
    scorer = TeacherScorer("math", [url], max_concurrency=2, **FAST)
    results = run(scored(scorer, [([1], [2])] * 8))
    assert len(results) == 8 and state.max_running == 2


def test_retries_with_backoff_then_succeeds(standin):
    url, state = standin
    state.fail_next("/generate", 2, status=503)
    scorer = TeacherScorer("math", [url], max_retries=3, **FAST)
    (result,) = run(scored(scorer, [([1, 2], [3])]))
    np.testing.assert_allclose(result.logp_T, [standin_logprob(3, 2)])
    assert [r for r, _ in state.calls].count("/generate") == 3


def test_a_teacher_that_stays_down_fails_loudly_naming_it(standin):
    url, state = standin
    state.fail_next("/generate", 1000, status=503)
    scorer = TeacherScorer("math-teacher", [url], max_retries=2, **FAST)
    with pytest.raises(TeacherUnavailableError, match="teacher 'math-teacher' is down"):
        run(scored(scorer, [([1], [2]), ([1], [3])]))
    dead = TeacherScorer("code", [f"http://127.0.0.1:{free_port()}"], max_retries=1, **FAST)
    with pytest.raises(TeacherUnavailableError, match=r"teacher 'code' is down.*ConnectError"):
        run(scored(dead, [([1], [2])]))


def test_fails_over_to_another_server_of_the_teacher(standin):
    url, state = standin
    dead = f"http://127.0.0.1:{free_port()}"
    scorer = TeacherScorer("math", [dead, url], max_retries=1, **FAST)
    results = run(scored(scorer, [([1], [2])] * 4))
    assert len(results) == 4 and len(state.bodies("/generate")) == 4


def test_slow_teacher_is_bounded_by_timeouts(standin):
    url, state = standin
    state.prefill_delay_s = 5.0
    scorer = TeacherScorer(
        "slow", [url], timeout_s=0.2, max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.02
    )
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=r"teacher 'slow' is down.*ReadTimeout"):
        run(scored(scorer, [([1], [2])]))
    assert time.monotonic() - t0 < 3.0
    # Each request it gave up on was aborted, so the server stops working on it.
    assert len(state.bodies("/abort_request")) == 2


def test_from_run_config(standin):
    from mopd.config.schema import TeacherConfig

    url, _ = standin
    cfg = TeacherConfig(name="math", model="ckpt", domains=["math"], top_logprobs=2, max_retries=1)
    scorer = TeacherScorer.from_config(cfg, [url], backoff_initial_s=0.01)
    (result,) = run(scored(scorer, [([1], [2, 3])]))
    assert scorer.name == "math" and result.topk_ids_TK.shape == (2, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_concurrency"):
        TeacherScorer("t", ["http://127.0.0.1:1"], max_concurrency=0)
    with pytest.raises(ValueError, match="at least one server"):
        TeacherScorer("t", [])


# ------------------------------------------------------------------------------------------
# The embedded engine: the teacher's log-probs of the student's sampled tokens
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mimo(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "mimo", "mimo_v2_flash")


def test_teacher_logprobs_match_the_samplers_on_the_same_model(tiny_mimo, tmp_path):
    spec = LaunchSpec(model_path=str(tiny_mimo), extra_argv=("--torch-num-threads", "1"))
    server = launch_server(spec, startup_timeout_s=120, log_path=tmp_path / "engine.log")
    prompts = [[10, 20, 30, 40], [50, 60]]

    async def go():
        async with EngineClient(server.url) as student:
            samples = await student.generate(
                [
                    GenerateRequest(
                        input_ids=p,
                        sampling_params=SamplingParams(max_new_tokens=8, temperature=1.0,
                                                       sampling_seed=i),
                        return_logprob=True,
                    )
                    for i, p in enumerate(prompts)
                ]
            )  # fmt: skip
        async with TeacherScorer("self", [server.url], top_logprobs=4) as teacher:
            scores = await teacher.score_batch(
                [(p, s.output_ids) for p, s in zip(prompts, samples, strict=True)]
            )
        return samples, scores

    try:
        samples, scores = run(go())
    finally:
        server.stop()
    for sample, score in zip(samples, scores, strict=True):
        assert score.logp_T.shape == sample.output_logprobs.shape == (8,)
        # Same weights, same tokens: prefill scoring reproduces the sampler's log-probs.
        np.testing.assert_allclose(score.logp_T, sample.output_logprobs, atol=2e-4)
        # Top-K is sorted and bounds the sampled token's log-prob from above.
        assert np.all(np.diff(score.topk_logp_TK, axis=1) <= 1e-6)
        assert np.all(score.topk_logp_TK[:, 0] >= score.logp_T - 1e-5)


def test_tokenizer_check(tiny_mimo, tmp_path):
    check_tokenizer_compatible(tiny_mimo, tiny_mimo, "same")  # identical: passes
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    shutil.copytree(tiny_mimo, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(str(other))
    with pytest.raises(TokenizerMismatchError, match=r"(?s)teacher 'code'.*<\|tool\|>"):
        check_tokenizer_compatible(tiny_mimo, other, "code")
