"""A small real HTTP server that answers in SGLang 0.5.23's shapes, for client-side tests.

It is not a model: token i+1 = (token i + 1) % vocab, and the log-prob of token t at position
p is ``standin_logprob(t, p)``, so tests can assert exact numbers. It is strict where SGLang is
lenient: a body field outside SGLang's published schema is answered with HTTP 400, so every
test that goes through it also holds the client to the schema.

Failure injection (``StandinState``): the next N calls of a route answer an HTTP status;
generation can be slowed so a test can cancel it mid-flight; every body is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mopd.inference.sglang_schema import (
    GENERATE_REQ_INPUT_FIELDS,
    ROUTE_BODY_FIELDS,
    SAMPLING_PARAMS_FIELDS,
    SESSION_PARAMS_FIELDS,
)

VOCAB = 50
NUM_LAYERS, TOP_K, NUM_EXPERTS = 3, 2, 8


def standin_logprob(token: int, position: int) -> float:
    """Log-prob the stand-in assigns to ``token`` at absolute ``position``."""
    return -0.1 * (1 + (token * 7 + position) % 13)


def standin_route(position: int, layer: int, slot: int) -> int:
    return (position * 3 + layer * 5 + slot) % NUM_EXPERTS


@dataclass
class StandinState:
    weight_version: str = "0"
    fail: dict[str, list[int]] = field(default_factory=dict)  # route -> statuses to answer
    delay_s: float = 0.0  # per generated token
    prefill_delay_s: float = 0.0  # once per request
    calls: list[tuple[str, Any]] = field(default_factory=list)  # (route, body)
    aborted: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    max_running: int = 0  # most /generate requests in flight at once
    sessions: set[str] = field(default_factory=set)  # open session ids

    def fail_next(self, route: str, times: int, status: int = 503) -> None:
        self.fail.setdefault(route, []).extend([status] * times)

    def bodies(self, route: str) -> list[Any]:
        return [body for r, body in self.calls if r == route]


def _schema_error(body: dict[str, Any], allowed: frozenset[str], what: str) -> str | None:
    unknown = sorted(set(body) - allowed)
    return f"unknown field(s) {unknown} in {what}" if unknown else None


_PER_PROMPT_LISTS = ("rid", "sampling_params", "return_logprob", "logprob_start_len",
                     "top_logprobs_num")  # fmt: skip


def _batch_item(body: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Prompt ``i`` of a batched body as its own request (a list field holds one entry per
    prompt, as SGLang's ``GenerateReqInput.__getitem__`` reads it)."""
    item = {k: v for k, v in body.items() if k != "input_ids"}
    item["input_ids"] = body["input_ids"][i]
    for key in _PER_PROMPT_LISTS:
        value = body.get(key)
        if isinstance(value, list):
            if len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries for {n} prompts")
            item[key] = value[i]
    return item


def build_app(state: StandinState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def inject_failures(request: Request, call_next: Any) -> Any:
        statuses = state.fail.get(request.url.path)
        if statuses:
            state.calls.append((request.url.path, "<failed>"))
            return JSONResponse({"error": {"message": "injected"}}, status_code=statuses.pop(0))
        return await call_next(request)

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        state.calls.append(("/get_model_info", None))
        return {
            "model_path": "standin",
            "tokenizer_path": "standin",
            "is_generation": True,
            "weight_version": state.weight_version,
        }

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        return {"version": "standin", "internal_states": []}

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        error = _schema_error(body, GENERATE_REQ_INPUT_FIELDS, "GenerateReqInput")
        ids = body.get("input_ids")
        if error is None and isinstance(ids, list) and ids and isinstance(ids[0], list):
            # SGLang's batch form: per-prompt lists; answered with a list in prompt order.
            state.calls.append(("/generate#batch", body))
            items = [_batch_item(body, i, len(ids)) for i in range(len(ids))]
            results = await asyncio.gather(*(one(item) for item in items))
            failed = [r for r in results if isinstance(r, Response)]
            return failed[0] if failed else results
        return await one(body)

    async def one(body: dict[str, Any]) -> Any:
        state.calls.append(("/generate", body))
        error = _schema_error(body, GENERATE_REQ_INPUT_FIELDS, "GenerateReqInput") or (
            _schema_error(body.get("sampling_params") or {}, SAMPLING_PARAMS_FIELDS, "sampling")
        )
        session = body.get("session_params")
        if session is not None and not error:
            error = _schema_error(session, SESSION_PARAMS_FIELDS, "session_params")
            if not error and session.get("id") not in state.sessions:
                error = f"Invalid request: session id {session.get('id')} does not exist"
        if error:
            return JSONResponse({"error": {"message": error}}, status_code=400)
        rid = body.get("rid") or "anon"
        prompt = list(body["input_ids"])
        params = body.get("sampling_params") or {}
        max_new = params.get("max_new_tokens", 128)
        output: list[int] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        state.running.add(rid)
        state.max_running = max(state.max_running, len(state.running))
        try:
            prefill_end = time.monotonic() + state.prefill_delay_s
            while time.monotonic() < prefill_end and rid not in state.aborted:
                await asyncio.sleep(0.005)
            for _ in range(max_new):
                if rid in state.aborted:
                    finish = {"type": "abort", "message": "Abort in waiting queue"}
                    break
                if state.delay_s:
                    await asyncio.sleep(state.delay_s)
                output.append(((output or prompt or [0])[-1] + 1) % VOCAB)
        finally:
            state.running.discard(rid)
        seq = prompt + output
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(output),
            "cached_tokens": 0,
            "weight_version": state.weight_version,
        }
        if body.get("return_logprob"):
            k = body.get("top_logprobs_num") or 0
            meta["output_token_logprobs"] = [
                [standin_logprob(t, len(prompt) + i), t, None] for i, t in enumerate(output)
            ]
            start = body.get("logprob_start_len")
            if start is not None and start >= 0:
                meta["input_token_logprobs"] = [
                    [None if p == start else standin_logprob(prompt[p], p), prompt[p], None]
                    for p in range(start, len(prompt))
                ]
            if k:

                def top(p: int) -> list[list[Any]]:
                    return [[standin_logprob(j, p), j, None] for j in range(k)]

                meta["output_top_logprobs"] = [top(len(prompt) + i) for i in range(len(output))]
                if start is not None and start >= 0:
                    meta["input_top_logprobs"] = [
                        None if p == start else top(p) for p in range(start, len(prompt))
                    ]
        if body.get("return_routed_experts"):
            start = body.get("routed_experts_start_len", 0)
            routes = np.array(
                [
                    [
                        [standin_route(p, layer, s) for s in range(TOP_K)]
                        for layer in range(NUM_LAYERS)
                    ]
                    for p in range(start, len(seq) - 1)
                ],
                dtype=np.int32,
            ).reshape(-1, NUM_LAYERS, TOP_K)
            meta["routed_experts"] = base64.b64encode(routes.tobytes()).decode()
        return {"text": "", "output_ids": output, "meta_info": meta}

    @app.post("/abort_request")
    async def abort(request: Request) -> Response:
        body = await request.json()
        state.calls.append(("/abort_request", body))
        error = _schema_error(body, ROUTE_BODY_FIELDS["/abort_request"], "AbortReq")
        if error:
            return JSONResponse({"error": {"message": error}}, status_code=400)
        state.aborted.add(body.get("rid", ""))
        return Response(status_code=200)

    @app.api_route("/open_session", methods=["GET", "POST"])
    async def open_session(request: Request) -> Any:
        body = await request.json()
        state.calls.append(("/open_session", body))
        error = _schema_error(body, ROUTE_BODY_FIELDS["/open_session"], "/open_session")
        sid = body.get("session_id") or f"s{len(state.sessions)}"
        if not error and sid in state.sessions:
            error = "Failed to open the session. Check if a session with the same id is still open."
        if error:
            return JSONResponse({"error": {"message": error}}, status_code=400)
        state.sessions.add(sid)
        return JSONResponse(sid)

    @app.api_route("/close_session", methods=["GET", "POST"])
    async def close_session(request: Request) -> Any:
        body = await request.json()
        state.calls.append(("/close_session", body))
        error = _schema_error(body, ROUTE_BODY_FIELDS["/close_session"], "/close_session")
        if error:
            return JSONResponse({"error": {"message": error}}, status_code=400)
        state.sessions.discard(body["session_id"])
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush() -> Response:
        state.calls.append(("/flush_cache", None))
        if state.running:
            return Response("requests running", status_code=400)
        return Response("Cache flushed.\n", status_code=200)

    def weight_route(route: str) -> None:
        @app.post(route)
        async def handler(request: Request) -> Any:
            body = await request.json()
            state.calls.append((route, body))
            error = _schema_error(body, ROUTE_BODY_FIELDS[route], route)
            if error:
                return JSONResponse({"error": {"message": error}}, status_code=400)
            if route == "/update_weights_from_disk" and body["model_path"] == "missing":
                return JSONResponse(
                    {"success": False, "message": "no such checkpoint", "num_paused_requests": 0},
                    status_code=400,
                )
            version = body.get("weight_version") or body.get("new_version")
            if version is not None:
                state.weight_version = version
            if route == "/update_weight_version":
                return {"success": True, "message": "ok", "new_version": version}
            return {"success": True, "message": "ok"}

    for route in (
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/update_weights_from_distributed",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/update_weight_version",
    ):
        weight_route(route)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def memory(request: Request) -> Any:
        body = await request.json()
        state.calls.append((request.url.path, body))
        return None

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    state: StandinState | None = None, port: int | None = None
) -> Iterator[tuple[str, StandinState]]:
    """Run the stand-in on 127.0.0.1 in a thread; yields (url, state)."""
    state = state or StandinState()
    port = port or free_port()
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stand-in server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.inference.sglang_standin --host H --port P [SGLang flags...]``.

    Takes SGLang's core flags and ignores the others, like the embedded server. Test hooks:
    ``--model-path crash`` exits at start-up with a message; ``--ignore-sigterm`` makes the
    process survive SIGTERM (to test the SIGKILL fallback); ``--weight-version V``.
    """
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model-path", default="standin")
    parser.add_argument("--weight-version", default="0")
    parser.add_argument("--ignore-sigterm", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    print(f"standin: starting with {sys.argv[1:]}", flush=True)
    if args.model_path == "crash":
        print("boom: cannot load checkpoint 'crash'", file=sys.stderr, flush=True)
        raise SystemExit(3)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = StandinState(weight_version=args.weight_version)
    server = uvicorn.Server(
        uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="warning")
    )
    if args.ignore_sigterm:
        server.capture_signals = contextlib.nullcontext  # keep SIGTERM ignored
    server.run()


if __name__ == "__main__":
    main()
