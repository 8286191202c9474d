"""EngineClient against a real local HTTP server answering in SGLang's shapes."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mopd.inference.client import (
    ClientConfig,
    EngineClient,
    EngineError,
    EngineUnavailable,
    SyncEngineClient,
    WeightUpdateError,
)
from mopd.inference.protocol import (
    DestroyWeightsUpdateGroup,
    GenerateRequest,
    InitWeightsUpdateGroup,
    SamplingParams,
    SessionParams,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
    UpdateWeightVersion,
)
from tests.inference.sglang_standin import (
    NUM_LAYERS,
    TOP_K,
    VOCAB,
    free_port,
    standin_logprob,
    standin_route,
)

FAST = ClientConfig(backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=4, info_timeout_s=5)


def run(coro):
    return asyncio.run(coro)


def test_generate_with_logprobs_and_routes(standin):
    url, state = standin
    request = GenerateRequest(
        input_ids=[3, 4, 5],
        sampling_params=SamplingParams(max_new_tokens=4, temperature=1.0),
        return_logprob=True,
        top_logprobs_num=2,
        return_routed_experts=True,
    )

    async def go():
        async with EngineClient(url, FAST, routed_experts_shape=(NUM_LAYERS, TOP_K)) as client:
            return await client.generate(request)

    out = run(go())
    assert out.output_ids.tolist() == [6, 7, 8, 9]
    expected = [standin_logprob(t, 3 + i) for i, t in enumerate([6, 7, 8, 9])]
    np.testing.assert_allclose(out.output_logprobs, expected, rtol=1e-6)
    assert out.output_top_ids.shape == (4, 2)
    assert out.routed_experts.shape == (3 + 4 - 1, NUM_LAYERS, TOP_K)
    assert out.routed_experts[5, 2, 1] == standin_route(5, 2, 1)
    assert out.finish_reason.type == "length" and out.weight_version == "0"
    sent = state.bodies("/generate")[0]
    assert len(sent["rid"]) == 32  # the client names every request so it can abort it


def test_generate_batch_keeps_order(standin):
    url, _ = standin
    requests = [
        GenerateRequest(input_ids=[i], sampling_params=SamplingParams(max_new_tokens=2))
        for i in range(10)
    ]

    async def go():
        async with EngineClient(url, FAST) as client:
            return await client.generate(requests)

    outs = run(go())
    assert [o.output_ids.tolist() for o in outs] == [[i + 1, (i + 2) % VOCAB] for i in range(10)]
    assert len({o.rid for o in outs}) == 10


def test_score_returns_logprobs_of_exactly_the_given_tokens(standin):
    url, state = standin

    async def go():
        async with EngineClient(url, FAST) as client:
            return await client.score([1, 2, 3], [40, 41, 9], top_logprobs_num=2)

    score = run(go())
    expected = [standin_logprob(40, 3), standin_logprob(41, 4), standin_logprob(9, 5)]
    assert score.logprobs.dtype == np.float32
    np.testing.assert_allclose(score.logprobs, expected, rtol=1e-6)
    assert score.top_ids.shape == (3, 2) and score.top_ids[0].tolist() == [0, 1]
    body = state.bodies("/generate")[0]
    assert body["sampling_params"] == {"max_new_tokens": 0}
    assert body["logprob_start_len"] == 2 and body["input_ids"] == [1, 2, 3, 40, 41, 9]


def test_score_batch_is_one_call_with_per_prompt_logprob_starts(standin):
    url, state = standin

    async def go():
        async with EngineClient(url, FAST) as client:
            return await client.score_batch([([1, 2, 3], [40, 41]), ([7], [8, 9, 10])], 2)

    first, second = run(go())
    np.testing.assert_allclose(first.logprobs, [standin_logprob(40, 3), standin_logprob(41, 4)])
    np.testing.assert_allclose(second.logprobs, [standin_logprob(t, t - 7) for t in (8, 9, 10)])
    assert first.top_ids.shape == (2, 2) and second.top_ids.shape == (3, 2)
    [batch] = state.bodies("/generate#batch")  # SGLang's batch form, lists where they differ
    assert batch["logprob_start_len"] == [2, 0]
    assert batch["top_logprobs_num"] == 2 and batch["return_logprob"] is True
    assert batch["input_ids"] == [[1, 2, 3, 40, 41], [7, 8, 9, 10]]


def test_score_batch_retries_under_new_rids(standin):
    url, state = standin
    state.fail_next("/generate", 1, status=503)

    async def go():
        async with EngineClient(url, FAST) as client:
            return await client.score_batch([([1], [2]), ([1], [3])])

    assert len(run(go())) == 2
    [batch] = state.bodies("/generate#batch")
    assert all(rid.endswith("-retry1") for rid in batch["rid"])


def test_idempotent_calls_retry_with_backoff(standin):
    url, state = standin
    state.fail_next("/generate", 2, status=503)
    state.fail_next("/get_model_info", 3, status=502)

    async def go():
        async with EngineClient(url, FAST) as client:
            t0 = time.monotonic()
            score = await client.score([1], [2])
            info = await client.get_model_info()
            return score, info, time.monotonic() - t0

    score, info, elapsed = run(go())
    assert len(score.logprobs) == 1 and info.model_path == "standin"
    assert [r for r, _ in state.calls].count("/generate") == 3  # 2 failures + 1 success
    assert [r for r, _ in state.calls].count("/get_model_info") == 4
    assert elapsed >= 0.01  # it backed off between attempts


def test_generation_is_not_resent_after_the_server_saw_it(standin):
    url, state = standin
    state.fail_next("/generate", 1, status=503)

    async def go():
        async with EngineClient(url, FAST) as client:
            await client.generate(GenerateRequest(input_ids=[1]))

    with pytest.raises(EngineError, match="HTTP 503"):
        run(go())
    assert [r for r, _ in state.calls].count("/generate") == 1


def test_retries_are_bounded_and_name_the_server(standin):
    url, state = standin
    state.fail_next("/get_model_info", 10, status=503)

    async def go():
        async with EngineClient(url, FAST, name="teacher-math") as client:
            await client.get_model_info()

    with pytest.raises(EngineUnavailable, match=r"teacher-math/get_model_info.*503"):
        run(go())
    assert [r for r, _ in state.calls].count("/get_model_info") == FAST.max_attempts


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}"

    async def go():
        async with EngineClient(url, FAST) as client:
            assert not await client.health()
            await client.generate(GenerateRequest(input_ids=[1]))

    with pytest.raises(EngineUnavailable, match="ConnectError"):
        run(go())


def test_client_errors_are_not_retried(standin):
    url, state = standin
    state.fail_next("/get_model_info", 1, status=400)

    async def go():
        async with EngineClient(url, FAST) as client:
            await client.get_model_info()

    with pytest.raises(EngineError, match="injected") as info:
        run(go())
    assert not isinstance(info.value, EngineUnavailable) and info.value.status == 400


def test_cancellation_sends_abort_request(standin):
    url, state = standin
    state.delay_s = 0.02

    async def go():
        client = EngineClient(url, FAST)
        request = GenerateRequest(
            input_ids=[1], sampling_params=SamplingParams(max_new_tokens=1000), rid="slow-1"
        )
        task = asyncio.create_task(client.generate(request))
        while "slow-1" not in state.running:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()  # waits for the abort it sent

    run(go())
    assert state.bodies("/abort_request") == [{"rid": "slow-1"}]
    deadline = time.monotonic() + 5
    while state.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not state.running  # the server stopped decoding it


def test_weight_updates_and_versions(standin):
    url, state = standin

    async def go():
        async with EngineClient(url, FAST) as client:
            res = await client.update_weights(
                UpdateWeightsFromDisk(model_path="ckpt-3", weight_version="3")
            )
            v3 = await client.weight_version()
            await client.update_weights(
                UpdateWeightsFromTensor(serialized_named_tensors=(b"abc",), load_format="direct")
            )
            await client.update_weights(
                InitWeightsUpdateGroup("127.0.0.1", 29500, 1, 2, backend="gloo")
            )
            await client.update_weights(
                UpdateWeightsFromDistributed(
                    names=("w",), dtypes=("bfloat16",), shapes=((2, 2),), weight_version="4"
                )
            )
            await client.update_weights(DestroyWeightsUpdateGroup())
            await client.update_weights(UpdateWeightVersion(new_version="5"))
            out = await client.generate(GenerateRequest(input_ids=[1]))
            with pytest.raises(WeightUpdateError, match="no such checkpoint"):
                await client.update_weights(UpdateWeightsFromDisk(model_path="missing"))
            return res, v3, out

    res, v3, out = run(go())
    assert res.success and v3 == "3" and out.weight_version == "5"
    assert state.bodies("/update_weights_from_tensor")[0]["serialized_named_tensors"] == ["YWJj"]
    assert state.bodies("/update_weights_from_distributed")[0]["shapes"] == [[2, 2]]


def test_admin_calls(standin):
    url, state = standin

    async def go():
        async with EngineClient(url, FAST) as client:
            assert await client.health() and await client.health_generate()
            assert await client.flush_cache()
            state.running.add("busy")
            flushed_while_busy = await client.flush_cache()
            state.running.discard("busy")
            await client.release_memory_occupation(["kv_cache"])
            await client.resume_memory_occupation()
            await client.abort(abort_all=True)
            await client.wait_until_healthy(timeout_s=2)
            return flushed_while_busy, await client.get_server_info()

    busy, info = run(go())
    assert busy is False and info["version"] == "standin"
    assert state.bodies("/release_memory_occupation") == [{"tags": ["kv_cache"]}]
    assert state.bodies("/abort_request") == [{"abort_all": True}]


def test_sessions_open_generate_close_in_sglang_fields(standin):
    url, state = standin

    async def go():
        async with EngineClient(url, FAST) as client:
            sid = await client.open_session("conv-1", timeout_s=30)
            with pytest.raises(EngineError, match="same id is still open"):
                await client.open_session("conv-1")
            first = await client.generate(
                GenerateRequest(input_ids=[3, 4], session_params=SessionParams(id=sid))
            )
            second = await client.generate(
                GenerateRequest(
                    input_ids=[],  # a continued turn may add no tokens
                    sampling_params=SamplingParams(max_new_tokens=2),
                    session_params=SessionParams(id=sid, rid=first.rid, offset=1, replace=True),
                )
            )
            async with client.session() as other:
                opened = set(state.sessions)
            await client.close_session(sid)
            with pytest.raises(EngineError, match="does not exist"):
                await client.generate(
                    GenerateRequest(input_ids=[1], session_params=SessionParams(id=sid))
                )
            return sid, second, other, opened

    sid, second, other, opened = run(go())
    assert sid == "conv-1" and opened == {"conv-1", other} and state.sessions == set()
    opens = state.bodies("/open_session")
    assert opens[0] == {"capacity_of_str_len": 0, "session_id": "conv-1", "timeout": 30.0}
    assert len(opens[2]["session_id"]) == 32  # the client names sessions itself (uuid4 hex)
    assert state.bodies("/close_session") == [{"session_id": other}, {"session_id": "conv-1"}]
    sent = state.bodies("/generate")[1]["session_params"]
    assert sent == {"id": "conv-1", "rid": state.bodies("/generate")[0]["rid"], "offset": 1,
                    "replace": True}  # fmt: skip
    assert len(second.output_ids) == 2


def test_wait_until_healthy_times_out():
    async def go():
        async with EngineClient(f"http://127.0.0.1:{free_port()}", FAST) as client:
            await client.wait_until_healthy(timeout_s=0.3, poll_s=0.05)

    with pytest.raises(EngineUnavailable, match="not healthy"):
        run(go())


def test_sync_client(standin):
    url, _ = standin
    with SyncEngineClient(url, FAST) as client:
        out = client.generate(
            GenerateRequest(input_ids=[7], sampling_params=SamplingParams(max_new_tokens=1))
        )
        assert out.output_ids.tolist() == [8]
        assert client.health()
        assert client.base_url == url


def test_bad_config_and_url():
    with pytest.raises(ValueError, match="http://"):
        EngineClient("localhost:30000")
    with pytest.raises(ValueError, match="max_attempts"):
        ClientConfig(max_attempts=0)


def test_timed_out_attempts_are_aborted_and_retried_under_a_new_rid(standin):
    url, state = standin
    state.prefill_delay_s = 2.0
    config = ClientConfig(request_timeout_s=0.2, max_attempts=2, backoff_initial_s=0.01)

    async def go():
        async with EngineClient(url, config) as client:
            await client.score([1, 2], [3], rid="s-1")

    with pytest.raises(EngineUnavailable, match="ReadTimeout"):
        run(go())
    assert [b["rid"] for b in state.bodies("/generate")] == ["s-1", "s-1-retry1"]
    assert sorted(b["rid"] for b in state.bodies("/abort_request")) == ["s-1", "s-1-retry1"]
