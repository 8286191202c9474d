"""``python -m rollout.server`` under malformed and hostile requests (issue 20, item 10).

Every bad ``/generate`` body gets a 4xx naming the offending field, within a bounded time and
with a bounded message; none reaches the engine to fail or hold up the requests it batches
with; oversize bodies answer 413 and slow senders 408; afterwards the server still serves,
with nothing left running. One real server subprocess for the module.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from rollout.engine import Engine, EngineConfig, Request, RequestError, SamplingParams
from rollout.engine.requests import RequestLimits, validate
from tests.rollout.conftest import running_server

PROMPT = [40, 41, 42, 43]
BODY_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 4_000_000
ANSWER_WITHIN_S = 5.0  # every bad request is answered within this
MAX_MESSAGE = 2000  # characters of an error message at most


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    """A real server on loopback with a small body limit and a short body deadline."""
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    args = [
        "--dtype", "float32",
        "--enable-return-routed-experts",
        "--max-running-requests", "4",
        "--torch-num-threads", "1",
        "--max-body-bytes", str(MAX_BODY_BYTES),
        "--body-timeout", str(BODY_TIMEOUT_S),
    ]  # fmt: skip
    with running_server(tiny_ckpts["mimo"], args, log) as (base, port):
        yield base, log, port


def _sp(**params) -> dict:
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, **params}}


def _raw_sp(fragment: str) -> bytes:
    return f'{{"input_ids": [40, 41], "sampling_params": {{"max_new_tokens": 2, {fragment}}}}}'.encode()


# (case id, body: a JSON value or raw bytes, text the error message must contain)
CORPUS = [
    ("text-int", {"text": 5}, "text"),
    ("text-list-of-ints", {"text": [1, 2]}, "text"),
    ("text-and-ids", {"text": "a", "input_ids": PROMPT}, "either text or input_ids"),
    ("ids-strings", {"input_ids": [["a", "b"]]}, "input_ids"),
    ("ids-floats", {"input_ids": [1.5, 2.0]}, "input_ids"),
    ("ids-bools", {"input_ids": [True, False]}, "input_ids"),
    ("ids-negative", {"input_ids": [-1, 2]}, "input_ids"),
    ("ids-out-of-vocab", {"input_ids": [10**6]}, "input_ids"),
    ("ids-huge-int", {"input_ids": [10**30]}, "input_ids"),
    ("ids-empty", {"input_ids": []}, "input_ids"),
    ("ids-empty-batch-item", {"input_ids": [PROMPT, []]}, "input_ids"),
    ("ids-nested-3", {"input_ids": [[[1]]]}, "input_ids"),
    ("ids-too-long", {"input_ids": [5] * 600}, "context length"),
    ("ids-many-strings", {"input_ids": ["x"] * 50_000}, "input_ids"),
    ("max-new-huge", _sp(max_new_tokens=10**18), "tokens for the completion"),
    ("max-new-float", _sp(max_new_tokens=2.5), "max_new_tokens"),
    ("max-new-string", _sp(max_new_tokens="5"), "max_new_tokens"),
    ("max-new-bool", _sp(max_new_tokens=True), "max_new_tokens"),
    ("max-new-negative", _sp(max_new_tokens=-3), "max_new_tokens"),
    ("top-k-negative", _sp(top_k=-5), "top_k"),
    ("top-k-zero", _sp(top_k=0), "top_k"),
    ("temperature-string", _sp(temperature="hot"), "temperature"),
    ("temperature-bool", _sp(temperature=True), "temperature"),
    ("temperature-negative", _sp(temperature=-1), "temperature"),
    ("temperature-nan", _raw_sp('"temperature": NaN'), "temperature"),
    ("temperature-inf", _raw_sp('"temperature": Infinity'), "temperature"),
    ("top-p-nan", _raw_sp('"top_p": NaN'), "top_p"),
    ("top-p-zero", _sp(top_p=0), "top_p"),
    ("min-p-string", _sp(min_p="x"), "min_p"),
    ("min-p-above-one", _sp(min_p=2), "min_p"),
    ("n-huge", _sp(n=10**9), "sampling_params.n"),
    ("n-zero", _sp(n=0), "n must be"),
    ("seed-float", _sp(sampling_seed=1.5), "sampling_seed"),
    ("seed-string", _sp(seed="s"), "sampling_seed"),
    ("unknown-sampling-field", _sp(beam_width=4), "unknown sampling_params"),
    ("regex", _sp(regex="a+"), "regex"),
    ("json-schema", _sp(json_schema="{}"), "json_schema"),
    ("stop-huge-string", _sp(stop=["x" * 100_000]), "stop"),
    ("stop-many-strings", _sp(stop=["a"] * 100_000), "stop"),
    ("stop-int", _sp(stop=5), "stop"),
    ("stop-ids-negative", _sp(stop_token_ids=[-1]), "stop_token_ids"),
    ("stop-ids-huge", _sp(stop_token_ids=[10**30]), "stop_token_ids"),
    ("stop-ids-out-of-vocab", _sp(stop_token_ids=[10**6]), "stop_token_ids"),
    ("stop-ids-strings", _sp(stop_token_ids=["a"]), "stop_token_ids"),
    ("logprob-start-negative", {"input_ids": PROMPT, "logprob_start_len": -7}, "logprob_start_len"),
    ("logprob-start-huge", {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 10**30}, "logprob_start_len"),
    ("logprob-start-string", {"input_ids": PROMPT, "logprob_start_len": "x"}, "logprob_start_len"),
    ("top-logprobs-negative", {"input_ids": PROMPT, "return_logprob": True, "top_logprobs_num": -3}, "top_logprobs_num"),
    ("return-logprob-string", {"input_ids": PROMPT, "return_logprob": "yes"}, "return_logprob"),
    ("return-logprob-list-length", {"input_ids": [PROMPT, PROMPT], "return_logprob": [True]}, "return_logprob"),
    ("sampling-list-length", {"input_ids": [PROMPT, PROMPT], "sampling_params": [{}]}, "sampling_params"),
    ("sampling-list-for-one", {"input_ids": PROMPT, "sampling_params": [{}, {}]}, "sampling_params"),
    ("sampling-list-of-ints", {"input_ids": PROMPT, "sampling_params": [1]}, "sampling_params"),
    ("sampling-string", {"input_ids": PROMPT, "sampling_params": "x"}, "sampling_params"),
    ("session-list", {"input_ids": PROMPT, "session_params": [1]}, "session_params"),
    ("session-unknown", {"input_ids": PROMPT, "session_params": {"id": "nope"}}, "session id"),
    ("session-id-int", {"input_ids": PROMPT, "session_params": {"id": 5}}, "session_params.id"),
    ("session-offset-negative", {"input_ids": PROMPT, "session_params": {"id": "x", "offset": -1}}, "session_params.offset"),
    ("rid-list-too-long", {"input_ids": [PROMPT, PROMPT], "rid": ["a", "b", "c"]}, "rids length"),
    ("rid-int", {"input_ids": PROMPT, "rid": 5}, "rid"),
    ("rid-duplicates", {"input_ids": [PROMPT, PROMPT], "rid": ["a", "a"]}, "Duplicate request ID"),
    ("routes-string", {"input_ids": PROMPT, "return_routed_experts": "yes"}, "return_routed_experts"),
    ("routes-start-negative", {"input_ids": PROMPT, "return_routed_experts": True, "routed_experts_start_len": -5}, "routed_experts_start_len"),
    ("stream-string", {"input_ids": PROMPT, "stream": "x"}, "stream"),
    ("lora", {"input_ids": PROMPT, "lora_path": "x"}, "lora_path"),
    ("body-list", [1, 2], "JSON object"),
    ("body-null", None, "JSON object"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("deep-nesting-in-field", b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("junk-bytes", bytes(range(256)) * 4, "not valid JSON"),
    ("not-utf8", b'{"text": "\xff\xfe"}', "UTF-8"),
    ("empty-body", b"", "body"),
    ("whitespace-body", b"   ", "not valid JSON"),
    ("huge-number-literal", b'{"input_ids": [1' + b"0" * 100_000 + b"]}", "not valid JSON"),
]  # fmt: skip


def _message(resp: httpx.Response) -> str:
    try:
        payload = resp.json()
    except ValueError:
        return resp.text
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))
    if isinstance(payload, dict) and "message" in payload:
        return str(payload["message"])
    return resp.text


def _post(base: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if headers is None else headers
    return httpx.post(f"{base}/generate", content=content, headers=headers, timeout=ANSWER_WITHIN_S)


def _assert_refused(resp: httpx.Response, needle: str, elapsed: float, status=(400,)) -> None:
    message = _message(resp)
    assert resp.status_code in status, (resp.status_code, message[:300])
    assert needle in message, message[:300]
    assert len(message) <= MAX_MESSAGE, len(message)
    assert elapsed < ANSWER_WITHIN_S


@pytest.mark.parametrize(("body", "needle"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_a_bad_generate_body_answers_400_naming_the_field(server, body, needle):
    base, _, _ = server
    t0 = time.monotonic()
    resp = _post(base, body)
    _assert_refused(resp, needle, time.monotonic() - t0)


@pytest.mark.parametrize(
    ("content_type", "needle"),
    [("text/plain", "content-type"), (None, "content-type"), ("application/x-www-form-urlencoded", "content-type")],
)  # fmt: skip
def test_a_body_that_is_not_declared_json_is_refused_naming_the_content_type(
    server, content_type, needle
):
    base, _, _ = server
    headers = {} if content_type is None else {"content-type": content_type}
    t0 = time.monotonic()
    resp = _post(base, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}}, headers)
    _assert_refused(resp, needle, time.monotonic() - t0)


def test_an_oversize_body_answers_413_naming_the_limit(server):
    base, _, _ = server
    big = b'{"text": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    t0 = time.monotonic()
    resp = _post(base, big)  # Content-Length declared: refused before it is read
    _assert_refused(resp, "--max-body-bytes", time.monotonic() - t0, status=(413,))

    def chunks():  # no Content-Length: refused once it grows past the limit
        yield b'{"text": "'
        for _ in range(MAX_BODY_BYTES // 100_000 + 2):
            yield b"a" * 100_000
        yield b'"}'

    t0 = time.monotonic()
    resp = httpx.post(
        f"{base}/generate",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=ANSWER_WITHIN_S,
    )
    _assert_refused(resp, "--max-body-bytes", time.monotonic() - t0, status=(413,))


def test_a_slow_sender_gets_408_and_does_not_hold_up_others(server):
    base, _, port = server
    body = json.dumps({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}}).encode()
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.settimeout(0.5)
        t0 = time.monotonic()
        for byte in body:  # two bytes a second: the body would take ~20 s
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                break
            if answer or time.monotonic() - t0 > BODY_TIMEOUT_S + ANSWER_WITHIN_S:
                break
            # Meanwhile the server answers everyone else.
            good = httpx.post(
                f"{base}/generate", json=_sp(max_new_tokens=1), timeout=ANSWER_WITHIN_S
            )
            assert good.status_code == 200
        elapsed = time.monotonic() - t0
        sock.settimeout(ANSWER_WITHIN_S)
        while answer and b"--body-timeout" not in answer:  # the rest of the response
            more = sock.recv(4096)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--body-timeout" in answer
    assert elapsed < BODY_TIMEOUT_S + 2.0


def _greedy_reference(reference, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        logits, _ = reference("mimo").forward(tokens)
        tokens.append(int(torch.argmax(logits[-1])))
    return tokens[len(prompt) :]


def test_bad_requests_never_fail_or_hold_up_good_ones_in_flight(server):
    """Good requests running while the whole corpus arrives all finish, whole and on time."""
    base, log, _ = server
    results: list[httpx.Response] = []

    def good() -> None:
        body = _sp(max_new_tokens=40, ignore_eos=True, temperature=0.7)
        results.append(httpx.post(f"{base}/generate", json=body, timeout=60))

    threads = [threading.Thread(target=good) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    for _, body, needle in CORPUS:
        t0 = time.monotonic()
        _assert_refused(_post(base, body), needle, time.monotonic() - t0)
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["meta_info"]["completion_tokens"] == 40 for r in results)
    assert "engine step failed" not in log.read_text()


def test_after_the_corpus_the_server_still_serves(server, reference):
    base, log, _ = server
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    resp = httpx.post(f"{base}/generate", json=body, timeout=30)
    assert resp.status_code == 200
    assert resp.json()["output_ids"] == _greedy_reference(reference, PROMPT, 3)
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 5
    while True:
        state = httpx.get(f"{base}/get_server_info", timeout=5).json()["internal_states"][0]
        if state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert "engine step failed" not in log.read_text()
    assert "Traceback" not in log.read_text()


# ---------------------------------------------------------------------------------------------
# The engine's own request types
# ---------------------------------------------------------------------------------------------


def test_sampling_params_built_directly_normalise_greedy_as_the_http_path():
    direct = SamplingParams(max_new_tokens=3, temperature=0.0)
    parsed = SamplingParams.from_dict({"max_new_tokens": 3, "temperature": 0})
    assert direct == parsed
    assert direct.greedy and direct.temperature == 1.0 and direct.top_k == 1
    assert SamplingParams(top_k=-1) == SamplingParams()  # -1: the whole vocabulary
    for bad, field in [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": 0}, "top_k"),
        ({"n": 0}, "n must"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"stop": ("x",) * 1000}, "stop"),
    ]:
        with pytest.raises(RequestError, match=field):
            SamplingParams(**bad)


def test_a_directly_built_greedy_request_runs_greedy(tiny_ckpts, reference):
    """``SamplingParams(temperature=0.0)`` used to divide the logits by zero."""
    engine = Engine(EngineConfig(model_path=str(tiny_ckpts["mimo"]), dtype="float32"))
    req = Request(
        input_ids=tuple(PROMPT),
        sampling=SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True),
        return_logprob=True,
    )
    with engine:
        (out,) = engine.generate([req], timeout=60)
    assert out.output_ids == _greedy_reference(reference, PROMPT, 4)
    logprobs = [lp for lp, _ in out.output_token_logprobs]
    assert all(lp is not None and lp == lp and lp <= 0.0 for lp in logprobs)  # finite, no NaN


def test_return_routed_experts_on_a_dense_model_is_refused():
    limits = RequestLimits(259, 512, routes_enabled=True, is_moe=False, model_name="Llama")
    with pytest.raises(RequestError, match="return_routed_experts: Llama has no MoE router"):
        validate(Request(input_ids=(1, 2), return_routed_experts=True), limits)
    bad_stop = Request(input_ids=(1, 2), sampling=SamplingParams(stop_token_ids=frozenset({259})))
    with pytest.raises(RequestError, match="stop_token_ids"):
        validate(bad_stop, limits)
