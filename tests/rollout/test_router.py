"""EngineRouter over several real local servers answering in SGLang's shapes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mopd.inference.client import ClientConfig, EngineUnavailable, WeightUpdateError
from mopd.inference.protocol import GenerateRequest, SamplingParams, UpdateWeightsFromDisk
from rollout.base import RolloutBackend
from rollout.router import EngineRouter, RouterConfig, request_cost
from tests.inference.sglang_standin import free_port, serve

FAST = ClientConfig(backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=2, info_timeout_s=5)


@pytest.fixture
def three_servers():
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(serve()) for _ in range(3)]
        for _, state in servers:
            state.delay_s = 0.005  # requests overlap, so load is visible to the router
        yield servers


def served_by(servers) -> list[int]:
    return [len(state.bodies("/generate")) for _, state in servers]


def req(prompt_len: int, max_new: int) -> GenerateRequest:
    return GenerateRequest(
        input_ids=list(range(1, prompt_len + 1)),
        sampling_params=SamplingParams(max_new_tokens=max_new),
    )


def test_router_is_a_rollout_backend(three_servers):
    router = EngineRouter([url for url, _ in three_servers], client_config=FAST)
    assert isinstance(router, RolloutBackend)
    asyncio.run(router.aclose())


def test_equal_requests_spread_evenly(three_servers):
    async def go():
        async with EngineRouter([u for u, _ in three_servers], client_config=FAST) as router:
            outs = await router.generate_many([req(4, 3) for _ in range(30)])
            return outs, router.loads()

    outs, loads = asyncio.run(go())
    assert served_by(three_servers) == [10, 10, 10]
    # The 30 requests of one event-loop iteration went as one batched call per server.
    assert [load.served for load in loads] == [1, 1, 1]
    assert [len(s.bodies("/generate#batch")) for _, s in three_servers] == [1, 1, 1]
    assert all(load.requests == 0 and load.tokens == 0 for load in loads)  # all released
    assert all(o.output_ids.tolist() == [5, 6, 7] for o in outs)


def test_token_balancing_keeps_long_requests_apart(three_servers):
    # One long request (cost 1000) then 10 short ones (cost 10): by tokens the long one keeps
    # its server to itself; by request count that server would get its share of short ones.
    requests = [req(10, 990)] + [req(5, 5) for _ in range(10)]

    async def go(balance):
        async with EngineRouter(
            [u for u, _ in three_servers], RouterConfig(balance=balance), FAST
        ) as router:
            for _, state in three_servers:
                state.delay_s = 0.0  # picks all happen before any answer returns
            await router.generate_many(requests)

    asyncio.run(go("tokens"))
    assert sorted(served_by(three_servers)) == [1, 5, 5]
    long_server = next(i for i, (_, s) in enumerate(three_servers) if any(
        b["sampling_params"]["max_new_tokens"] == 990 for b in s.bodies("/generate")))  # fmt: skip
    assert served_by(three_servers)[long_server] == 1
    for _, state in three_servers:
        state.calls.clear()
    asyncio.run(go("requests"))
    assert sorted(served_by(three_servers)) == [3, 4, 4]
    assert request_cost(requests[0]) == 1000


def test_unreachable_server_is_skipped(three_servers):
    dead = f"http://127.0.0.1:{free_port()}"
    urls = [dead] + [u for u, _ in three_servers[:2]]

    async def go():
        async with EngineRouter(urls, RouterConfig(unhealthy_cooldown_s=60), FAST) as router:
            outs = await router.generate_many([req(3, 2) for _ in range(8)])
            return outs, router.loads()

    outs, loads = asyncio.run(go())
    assert len(outs) == 8 and loads[0].served == 0 and loads[0].down_until > 0
    assert sum(served_by(three_servers[:2])) == 8


def test_all_servers_down_is_a_clear_error():
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def go():
        async with EngineRouter(urls, client_config=FAST) as router:
            await router.generate(req(2, 2))

    with pytest.raises(EngineUnavailable, match="no server could take"):
        asyncio.run(go())


def test_front_url_takes_generation_admin_goes_to_each_server(three_servers):
    (front, front_state), *workers = three_servers

    async def go():
        async with EngineRouter(
            [u for u, _ in workers], RouterConfig(front_url=front), FAST
        ) as router:
            await router.generate_many([req(2, 2) for _ in range(4)])
            await router.update_weights(UpdateWeightsFromDisk("ckpt", weight_version="2"))
            return await router.weight_versions()

    versions = asyncio.run(go())
    assert len(front_state.bodies("/generate")) == 4
    assert served_by(workers) == [0, 0]
    assert versions == ["2", "2"] and front_state.weight_version == "0"


def test_weight_sync_reaches_every_server_and_failures_name_it(three_servers):
    urls = [u for u, _ in three_servers]

    async def go():
        async with EngineRouter(urls, client_config=FAST) as router:
            result = await router.update_weights(UpdateWeightsFromDisk("ckpt", weight_version="5"))
            assert result.success and await router.weight_versions() == ["5", "5", "5"]
            assert await router.health()
            three_servers[1][1].fail_next("/update_weights_from_disk", 1, status=400)
            await router.update_weights(UpdateWeightsFromDisk("ckpt", weight_version="6"))

    with pytest.raises(WeightUpdateError, match=urls[1]):
        asyncio.run(go())


def test_router_rejects_bad_setup():
    with pytest.raises(ValueError, match="at least one"):
        EngineRouter([])
    with pytest.raises(ValueError, match="duplicate"):
        EngineRouter(["http://a:1", "http://a:1"])
    with pytest.raises(ValueError, match="balance"):
        RouterConfig(balance="random")
