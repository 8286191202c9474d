"""``python -m rollout.server``: SGLang's HTTP shapes, over a real subprocess and in-process."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
from multiprocessing.reduction import ForkingPickler

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from mopd.inference.client import EngineClient
from mopd.inference.protocol import (
    GenerateRequest,
    ProtocolError,
    SamplingParams,
    decode_routed_experts,
)
from rollout.engine import Engine, EngineConfig
from rollout.server import build_app, parse_args
from tests.rollout.conftest import running_server

PROMPT = list(range(40, 60))  # 20 tokens: longer than the tiny MiMo's sliding window (8)


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    """A real ``python -m rollout.server`` subprocess on a free loopback port."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [
        "--dtype", "float32",
        "--enable-return-routed-experts",
        "--max-running-requests", "8",
        "--random-seed", "7",
        "--torch-num-threads", "1",
        "--tp-size", "1", "--mem-fraction-static", "0.8",  # SGLang flags we ignore
    ]  # fmt: skip
    with running_server(tiny_ckpts["mimo"], args, log) as (base, _):
        yield base, log


def test_subprocess_server_returns_samples_logprobs_and_routes(server, reference):
    base, log = server
    body = {
        "input_ids": [PROMPT, PROMPT[:5]],
        "sampling_params": {"max_new_tokens": 12, "temperature": 0.8, "ignore_eos": True, "n": 2},
        "return_logprob": True,
        "logprob_start_len": 0,
        "return_routed_experts": True,
    }
    results = httpx.post(f"{base}/generate", json=body, timeout=120).json()
    assert isinstance(results, list) and len(results) == 4  # prompt-major: n samples of each
    ref = reference("mimo")
    for i, res in enumerate(results):
        prompt = PROMPT if i < 2 else PROMPT[:5]
        meta = res["meta_info"]
        assert set(res) == {"text", "output_ids", "meta_info"}
        assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == 12
        assert meta["finish_reason"] == {"type": "length", "length": 12}
        assert meta["weight_version"] == "default"
        gen = res["output_ids"]
        # (logprob, token_id, text_or_None) triples; the first prompt position has no log-prob
        assert meta["input_token_logprobs"][0] == [None, prompt[0], None]
        assert [e[1] for e in meta["output_token_logprobs"]] == gen
        logits, routes = ref.forward(prompt + gen)
        logp = torch.log_softmax(logits / 0.8, -1)  # SGLang default: post-temperature
        want = [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(gen)]
        np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]], want, atol=1e-4)
        raw = torch.log_softmax(logits, -1)
        want_in = [float(raw[j - 1, prompt[j]]) for j in range(1, len(prompt))]
        np.testing.assert_allclose(
            [e[0] for e in meta["input_token_logprobs"][1:]], want_in, atol=1e-4
        )
        experts = decode_routed_experts(meta["routed_experts"], ref.num_layers, ref.top_k)
        assert experts.shape == (len(prompt) + len(gen) - 1, ref.num_layers, ref.top_k)
        np.testing.assert_array_equal(np.sort(experts, -1), np.sort(routes[:-1].numpy(), -1))
    assert results[0]["output_ids"] != results[1]["output_ids"]  # the n samples differ
    assert results[0]["meta_info"]["id"].endswith("_0")
    assert "ignoring SGLang flags" in log.read_text() and "--tp-size" in log.read_text()


def test_subprocess_server_errors_reload_and_info(server, tiny_ckpts):
    base, _ = server
    bad = httpx.post(
        f"{base}/generate",
        content=b'{"input_ids": [1, 2',
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["message"]
    too_long = httpx.post(f"{base}/generate", json={"input_ids": [5] * 600})
    assert too_long.status_code == 400
    assert "longer than the model's context length" in too_long.json()["error"]["message"]
    greedy = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    before = httpx.post(f"{base}/generate", json=greedy, timeout=60).json()
    upd = httpx.post(
        f"{base}/update_weights_from_disk",
        json={"model_path": str(tiny_ckpts["mimo_teacher"]), "weight_version": "7"},
        timeout=60,
    )
    assert upd.status_code == 200 and upd.json()["success"] is True
    after = httpx.post(f"{base}/generate", json=greedy, timeout=60).json()
    assert after["meta_info"]["weight_version"] == "7"
    assert after["output_ids"] != before["output_ids"]
    assert httpx.get(f"{base}/get_model_info").json()["weight_version"] == "7"
    info = httpx.get(f"{base}/get_server_info").json()
    assert info["enable_return_routed_experts"] is True and info["max_running_requests"] == 8
    assert httpx.get(f"{base}/health_generate", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def client(tiny_ckpts):
    engine = Engine(
        EngineConfig(
            model_path=str(tiny_ckpts["mimo"]), dtype="float32", enable_return_routed_experts=True
        )
    )
    with TestClient(build_app(engine, {"model_path": str(tiny_ckpts["mimo"])})) as c:
        yield c


def test_single_and_batch_shapes(client):
    one = client.post(
        "/generate",
        json={
            "text": "hi",
            "rid": "r1",
            "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 3,
            "return_text_in_logprobs": True,
        },
    ).json()
    assert isinstance(one, dict) and one["meta_info"]["id"] == "r1"
    meta = one["meta_info"]
    assert meta["input_token_logprobs"] == [[None, ord("i") + 3, "i"]]
    assert meta["input_top_logprobs"] == [None]
    assert len(meta["output_top_logprobs"]) == 3 and len(meta["output_top_logprobs"][0]) == 3
    top = meta["output_top_logprobs"][0][0]
    assert top[0] == pytest.approx(meta["output_token_logprobs"][0][0])  # greedy: top-1 sampled
    batch = client.post(
        "/generate",
        json={"text": ["a", "b"], "rid": "batch", "sampling_params": {"max_new_tokens": 2}},
    ).json()
    assert [r["meta_info"]["id"] for r in batch] == ["batch_0", "batch_1"]
    assert "routed_experts" not in batch[0]["meta_info"]  # only when asked


def test_bad_requests_answer_400_with_a_message(client):
    cases = [
        ({"input_ids": "abc"}, "input_ids"),
        ({"sampling_params": {"max_new_tokens": 2}}, "Either text, input_ids"),
        ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "top_k"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
        ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
        ({"input_ids": [1, 2], "return_routed_experts": True, "routed_experts_start_len": 9}, "routed_experts_start_len"),
        ({"input_ids": [[1], [2]], "rid": ["x"]}, "rids length"),
    ]  # fmt: skip
    for body, needle in cases:
        resp = client.post("/generate", json=body)
        assert resp.status_code == 400, body
        payload = resp.json()
        message = payload["error"]["message"] if "error" in payload else payload["message"]
        assert needle in message, (body, message)
    assert client.post("/generate", content=b"[1,2]").status_code == 400
    assert client.post("/update_weights_from_distributed", json={}).status_code == 400


def test_update_weights_from_tensor_route(client, tiny_ckpts):
    from transformers import AutoModelForCausalLM

    greedy = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    before = client.post("/generate", json=greedy).json()["output_ids"]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_ckpts["mimo_teacher"], dtype=torch.float32)
    buf = io.BytesIO()
    ForkingPickler(buf).dump(
        list(teacher.state_dict().items())
    )  # SGLang's MultiprocessingSerializer
    payload = {
        "serialized_named_tensors": [base64.b64encode(buf.getvalue()).decode()],
        "weight_version": "t1",
    }
    resp = client.post("/update_weights_from_tensor", json=payload)
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    after = client.post("/generate", json=greedy).json()
    assert after["meta_info"]["weight_version"] == "t1" and after["output_ids"] != before
    evil = base64.b64encode(b"cos\nsystem\n(S'true'\ntR.").decode()
    resp = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [evil]})
    assert resp.status_code == 400 and "blocked" in resp.json()["message"]
    ver = client.post("/update_weight_version", json={"new_version": "v9"}).json()
    assert ver == {"success": True, "message": "Weight version updated to v9", "new_version": "v9"}
    assert client.get("/get_weight_version").json() == {"weight_version": "v9"}


def test_control_routes(client):
    assert client.post("/abort_request", json={"rid": "nothing"}).status_code == 200
    assert client.post("/flush_cache").status_code == 200
    assert client.post("/release_memory_occupation", json={}).status_code == 200
    assert client.post("/resume_memory_occupation", json={}).status_code == 200
    assert client.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
    assert client.post("/continue_generation").json()["status"] == "ok"
    stream = client.post(
        "/generate",
        json={"input_ids": [5, 6], "stream": True, "sampling_params": {"max_new_tokens": 2}},
    )
    chunks = [line for line in stream.text.split("\n\n") if line]
    assert chunks[-1] == "data: [DONE]" and len(json.loads(chunks[0][6:])["output_ids"]) == 2


def test_launch_flags_follow_sglang():
    args, ignored = parse_args(
        ["--model-path", "m", "--port", "1234", "--enable-return-routed-experts", "--tp-size", "2"]
    )
    assert args.host == "127.0.0.1" and args.port == 1234 and args.enable_return_routed_experts
    assert args.weight_version == "default" and ignored == ["--tp-size", "2"]


def test_a_batched_generate_equals_its_requests_sent_alone(server):
    """``EngineClient.generate_batch`` (one SGLang batch body for a prompt group) gives each
    request exactly what it gets alone: seeded samples, log-probs and routes, in order."""
    base, _ = server

    def req(i: int, seed: int) -> GenerateRequest:
        params = SamplingParams(max_new_tokens=6, temperature=1.0, sampling_seed=seed)
        return GenerateRequest(
            input_ids=PROMPT[: 5 + i],
            sampling_params=params,
            rid=f"group/{i}",
            return_logprob=True,
            return_routed_experts=True,
        )

    requests = [req(i, seed=100 + i) for i in range(4)]

    async def go():
        async with EngineClient(base, routed_experts_shape=(4, 2)) as client:
            together = await client.generate_batch(requests)
            alone = [
                await client.generate(r.with_rid(f"alone/{i}")) for i, r in enumerate(requests)
            ]
            mixed = [requests[0], dataclasses.replace(requests[1], return_routed_experts=False)]
            with pytest.raises(ProtocolError, match="differ in"):
                await client.generate_batch(mixed)
            return together, alone

    together, alone = asyncio.run(go())
    assert [o.rid for o in together] == [r.rid for r in requests]
    for t, a, r in zip(together, alone, requests):
        assert t.prompt_tokens == len(r.input_ids)
        np.testing.assert_array_equal(t.output_ids, a.output_ids)
        np.testing.assert_allclose(t.output_logprobs, a.output_logprobs, atol=1e-5)
        np.testing.assert_array_equal(np.sort(t.routed_experts, -1), np.sort(a.routed_experts, -1))
    assert len({tuple(o.output_ids) for o in together}) > 1  # different seeds, different samples
