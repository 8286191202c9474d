"""Multi-turn sessions over HTTP: ``EngineClient`` / ``EnginePool`` against embedded servers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from mopd.inference.client import EngineClient, EngineError
from mopd.inference.pool import EnginePool
from mopd.inference.protocol import GenerateRequest, SamplingParams, SessionParams
from rollout.engine import Engine, EngineConfig
from rollout.server import build_app
from tests.inference.sglang_standin import free_port

PROMPT = list(range(40, 53))
OBSERVATIONS = [[250, 251, 252], list(range(200, 211))]


@contextlib.contextmanager
def embedded_server(path, **kw):
    """``rollout.server``'s app over a real socket, in a thread; yields (url, engine)."""
    kw.setdefault("enable_return_routed_experts", True)
    engine = Engine(EngineConfig(model_path=str(path), dtype="float32", **kw))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("embedded server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def turn(new, sid, parent, max_new, moe=True):
    return GenerateRequest(
        input_ids=tuple(new),
        sampling_params=SamplingParams(max_new_tokens=max_new, temperature=0.7, ignore_eos=True),
        return_logprob=True,
        return_routed_experts=moe,
        session_params=SessionParams(id=sid, rid=parent),
    )


def test_three_turns_through_the_http_server(tiny_ckpts, reference):
    ref = reference("mimo")
    shape = (ref.num_layers, ref.top_k)

    async def converse(url):
        async with EngineClient(url, routed_experts_shape=shape) as client:
            outs = []
            async with client.session() as sid:
                parent = None
                for i, new in enumerate([PROMPT, *OBSERVATIONS]):
                    out = await client.generate(turn(new, sid, parent, (6, 5, 7)[i]))
                    outs.append(out)
                    parent = out.rid
            # closed: a later turn is refused with SGLang's message, as HTTP 400
            with pytest.raises(EngineError, match="does not exist") as err:
                await client.generate(turn([7], sid, parent, 2))
            assert err.value.status == 400
            # a rid the session never had
            sid2 = await client.open_session("named")
            assert sid2 == "named"
            with pytest.raises(EngineError, match="same id is still open"):
                await client.open_session("named")
            with pytest.raises(EngineError, match="Invalid request session id"):
                await client.generate(turn([7], sid2, "nope", 2))
            await client.close_session(sid2)
            await client.close_session(sid2)  # unknown ids are a no-op, as in SGLang
            info = await client.get_server_info()
            return outs, info["internal_states"][0]

    with embedded_server(tiny_ckpts["mimo"]) as (url, _engine):
        outs, stats = asyncio.run(converse(url))
    ids = [o.output_ids.tolist() for o in outs]
    full = PROMPT + ids[0] + OBSERVATIONS[0] + ids[1] + OBSERVATIONS[1] + ids[2]
    assert outs[2].prompt_tokens + len(ids[2]) == len(full)
    assert outs[0].cached_tokens == 0
    assert outs[1].cached_tokens == len(PROMPT) + len(ids[0]) - 1
    assert outs[2].cached_tokens == outs[1].prompt_tokens + len(ids[1]) - 1
    assert stats["prefill_tokens"] == len(PROMPT) + 1 + 3 + 1 + 11
    logits, routes = ref.forward(full)
    logp = torch.log_softmax(logits / 0.7, -1)
    for out, gen in zip(outs, ids, strict=True):
        start = out.prompt_tokens
        want = [float(logp[start - 1 + j, t]) for j, t in enumerate(gen)]
        np.testing.assert_allclose(out.output_logprobs, want, atol=1e-4)
    last = outs[2].routed_experts
    assert last.shape == (len(full) - 1, *shape)
    np.testing.assert_array_equal(np.sort(last, -1), np.sort(routes[:-1].numpy(), -1))
    for out in outs[:2]:
        np.testing.assert_array_equal(last[: len(out.routed_experts)], out.routed_experts)


def test_pool_sends_every_turn_of_a_session_to_its_server(tiny_ckpts):
    async def run(urls):
        pool = EnginePool(urls, routed_experts_shape=(2, 2), balance="requests")
        try:
            sids = [await pool.open_session() for _ in range(4)]
            servers = {pool.session_server(s) for s in sids}
            outs = await asyncio.gather(
                *(pool.generate(turn(PROMPT[i:], sid, None, 3, moe=False)) for i, sid in
                  enumerate(sids))
            )  # fmt: skip
            seconds = await asyncio.gather(
                *(
                    pool.generate(turn([9, 10], sid, out.rid, 3, moe=False))
                    for sid, out in zip(sids, outs, strict=True)
                )
            )
            for sid in sids:
                await pool.close_session(sid)
            with pytest.raises(ValueError, match="not opened through this pool"):
                await pool.generate(turn([1], sids[0], None, 1, moe=False))
            return servers, outs, seconds
        finally:
            await pool.aclose()

    with (
        embedded_server(tiny_ckpts["llama"], enable_return_routed_experts=False) as (a, ea),
        embedded_server(tiny_ckpts["llama"], enable_return_routed_experts=False) as (b, eb),
    ):
        servers, outs, seconds = asyncio.run(run([a, b]))
        assert ea.num_sessions == eb.num_sessions == 0
    assert servers == {a, b}  # sessions spread over both servers
    for first, second in zip(outs, seconds, strict=True):
        # the second turn found the first on its server: it reused all but the last token
        assert second.cached_tokens == first.prompt_tokens + len(first.output_ids) - 1
        assert second.prompt_tokens == first.prompt_tokens + len(first.output_ids) + 2


def test_open_session_route_answers_sglang_shapes(tiny_ckpts):
    with embedded_server(tiny_ckpts["llama"], enable_return_routed_experts=False) as (url, _):
        r = httpx.post(f"{url}/open_session", json={"capacity_of_str_len": 100})
        assert r.status_code == 200 and isinstance(r.json(), str) and len(r.json()) == 32
        r = httpx.post(f"{url}/open_session", json={"capacity_of_str_len": 1, "streaming": True})
        assert r.status_code == 400 and "streaming" in r.json()["error"]["message"]
        r = httpx.post(
            f"{url}/generate",
            json={"input_ids": [[1, 2], [3]], "session_params": {"id": "x"}},
        )
        assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/close_session", json={"session_id": "never"})
        assert r.status_code == 200
