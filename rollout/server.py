"""``python -m rollout.server``: the embedded engine behind SGLang's HTTP API.

A drop-in for ``python -m sglang.launch_server`` on machines without SGLang (CPU, one GPU):
rollout workers and teacher scorers use the same client for both. Routes, request fields,
response shapes and error bodies follow SGLang's ``srt/entrypoints/http_server.py``,
``srt/managers/io_struct.py`` and ``srt/managers/tokenizer_manager.py``:

``/generate`` (POST/PUT)
    ``text`` or ``input_ids``, single or batched; ``sampling_params`` (dict or list);
    ``rid``; ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``,
    ``return_text_in_logprobs``; ``return_routed_experts``, ``routed_experts_start_len``;
    ``stream`` (answered as one final SSE chunk per item, then ``[DONE]``).
    Each result is ``{"text", "output_ids", "meta_info"}``; ``meta_info`` holds ``id``,
    ``finish_reason`` (``{"type": "length", "length": N}``, ``{"type": "stop", "matched":
    token_id_or_str}``, ``{"type": "abort", "message": ...}``), ``prompt_tokens``,
    ``completion_tokens``, ``cached_tokens``, ``weight_version``, ``e2e_latency`` and, when
    asked, ``input_token_logprobs`` / ``output_token_logprobs`` as ``[logprob, token_id,
    text_or_null]`` triples (the first prompt entry's logprob is null), ``input_top_logprobs``
    / ``output_top_logprobs`` and ``routed_experts`` (base64 int32 ``[seqlen - 1 - start,
    num_hidden_layers, num_experts_per_tok]``, dense layers 0). A single prompt with ``n == 1``
    answers a dict, anything else a list (prompt-major: the ``n`` samples of prompt 0 first).
    Parallel samples get rids ``{rid}_{j}``; aborting ``rid`` aborts them all (prefix match).
``/open_session`` (``{"capacity_of_str_len", "session_id", "timeout"}``; answers the id as a
    JSON string) and ``/close_session`` (``{"session_id"}``): multi-turn sessions as SGLang's
    ``Session``. A ``/generate`` with ``session_params`` ``{"id", "rid", "offset", "replace",
    "drop_previous_output"}`` (one prompt, n=1) runs the earlier request ``rid``'s prompt and
    output plus the new ``input_ids``; the engine reuses the keys/values and routes of the
    session's last finished turn, so only the new positions are prefilled (``cached_tokens``
    says how many were reused). ``prompt_tokens``, input log-prob positions and the
    ``routed_experts`` rows count the whole context, ``output_ids`` are this turn's. An unknown
    or closed session, or a rid the session does not hold, answers 400 with SGLang's message.
``/update_weights_from_disk``, ``/update_weights_from_tensor``, ``/update_weight_version``,
``/flush_cache``, ``/abort_request``, ``/health``, ``/health_generate``, ``/get_model_info``,
``/get_weight_version``, ``/get_server_info``, ``/release_memory_occupation``,
``/resume_memory_occupation``, ``/pause_generation``, ``/continue_generation``.

Errors: a body that is not valid JSON (junk bytes, not UTF-8, nested too deeply) or has
wrongly typed fields answers 400 with SGLang's validation body ``{"object": "error",
"message", "type": "Bad Request", "param", "code": 400}``, its message naming the fields (the
first few, cut to a bounded length); a request the engine cannot run (context length, bad
ids, bad sampling params) answers 400 with ``{"error": {"message": ...}}`` as SGLang's
``_create_error_response`` does. Every such request is refused before the engine sees it, so
one bad request never fails or holds up the others.

Hostile clients: a body larger than ``--max-body-bytes`` answers 413, one not fully
received within ``--body-timeout`` seconds (a slow sender) 408 (``BodyLimits``);
``/generate`` asks for at most ``MAX_SEQUENCES`` sequences (prompts x ``n``). Parsing and
tokenizing run on the thread pool, not on the event loop, so a large body never stalls the
other connections. uvicorn's own limits bound the rest: ``--limit-concurrency`` (503 beyond
it) and ``h11_max_incomplete_event_size`` (the request line and headers).

Launch flags: SGLang's names (``--model-path``, ``--tokenizer-path``, ``--host`` (default
127.0.0.1), ``--port``, ``--dtype``, ``--device``, ``--enable-return-routed-experts``,
``--max-running-requests``, ``--max-prefill-tokens``, ``--context-length``,
``--random-seed``, ``--weight-version``, ``--log-level``); other SGLang flags are accepted and
reported as ignored in one log line. ``--torch-num-threads``, ``--max-body-bytes``,
``--body-timeout`` and ``--limit-concurrency`` are ours.

Weight updates run between two engine steps; requests in flight continue on the new weights
with the keys/values they already cached (SGLang's in-place pause/update/continue). The
tensor route takes SGLang's ``serialized_named_tensors`` (base64 of
``MultiprocessingSerializer`` = ``ForkingPickler`` bytes of ``[(name, tensor), ...]``, one
entry per TP rank; we read entry 0), unpickled with an allowlist of torch's tensor-rebuild
functions only. CPU tensors cross processes only with torch's ``file_system`` sharing
strategy on the sender (CUDA tensors use CUDA IPC); names may be checkpoint (hub) names, as
SGLang expects, or the served model's ``state_dict`` names.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import os
import pickle
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mopd.inference.protocol import encode_routed_experts
from rollout.engine import (
    Engine,
    EngineConfig,
    Output,
    RequestError,
    SamplingParams,
    SessionParams,
)
from rollout.engine import Request as EngineRequest
from rollout.engine.requests import check_submitted

__all__ = ["build_app", "main", "output_to_sglang", "parse_args"]

logger = logging.getLogger("rollout.server")

VERSION = "embedded-0.1 (SGLang 0.5.23 HTTP API)"
KEEP_ALIVE_S = 60
"""Seconds an idle client connection stays open (uvicorn's default is 5)."""
MAX_BODY_BYTES = 64 << 20
"""Largest request body accepted (``--max-body-bytes``); larger ones answer 413."""
BODY_TIMEOUT_S = 60.0
"""Seconds a client has to send a whole request body (``--body-timeout``); then 408."""
LIMIT_CONCURRENCY = 4096
"""Connections and requests at once (uvicorn's ``limit_concurrency``); beyond it 503."""
MAX_HEADER_BYTES = 16 << 10
"""Request line and headers at most (uvicorn's ``h11_max_incomplete_event_size``; h11's default)."""
MAX_SEQUENCES = 16384
"""Most sequences one ``/generate`` may ask for (prompts x ``n``)."""
_MAX_ERRORS = 8  # validation errors named in one message (the rest are counted)
_MAX_PART = 200  # characters of one of them


# ---------------------------------------------------------------------------------------------
# Request bodies (SGLang io_struct names; unknown fields are ignored, as SGLang's dataclasses do)
# ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateReqInput(_Body):
    # Strict: a boolean is not a token id, "5" is not an integer, "yes" is not true.
    model_config = ConfigDict(extra="ignore", strict=True)

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    input_embeds: Any = None
    image_data: Any = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: Any = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    return_hidden_states: bool | list[bool] = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    lora_path: Any = None
    session_params: dict[str, Any] | None = None


class OpenSessionReqInput(_Body):
    capacity_of_str_len: int = 0
    session_id: str | None = None
    streaming: bool | None = None
    timeout: float | None = None


class CloseSessionReqInput(_Body):
    session_id: str


class UpdateWeightFromDiskReqInput(_Body):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True


class UpdateWeightsFromTensorReqInput(_Body):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class UpdateWeightVersionReqInput(_Body):
    new_version: str
    abort_all_requests: bool = True


class AbortReq(_Body):
    rid: str | None = None
    abort_all: bool = False


class MemoryReqInput(_Body):
    tags: list[str] | None = None


class PauseGenerationReqInput(_Body):
    mode: str = "abort"


_JSON = "application/json"


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _invalid(parts: list[str]) -> JSONResponse:
    """SGLang's validation error body, naming at most ``_MAX_ERRORS`` problems."""
    shown = [p if len(p) <= _MAX_PART else p[: _MAX_PART - 3] + "..." for p in parts[:_MAX_ERRORS]]
    if len(parts) > _MAX_ERRORS:
        shown.append(f"and {len(parts) - _MAX_ERRORS} more errors")
    body = {
        "object": "error",
        "message": "Invalid request: " + "; ".join(shown),
        "type": "Bad Request",
        "param": None,
        "code": 400,
    }
    return JSONResponse(body, status_code=400)


def _too_large(max_bytes: int) -> JSONResponse:
    return _error(
        f"the request body is larger than this server accepts ({max_bytes} bytes, "
        "--max-body-bytes)",
        413,
    )


class BodyLimits:
    """ASGI middleware: a request body is at most ``max_bytes`` and arrives within
    ``timeout_s`` seconds, or the request is answered without reaching the app.

    A slow sender (a byte a second) would otherwise hold its handler, and the memory of what
    it sent, for as long as it likes: neither uvicorn nor Starlette bounds the time a body
    takes. The body is read here, whole, under one deadline (408 past it) and one size limit
    (413: at once for a declared ``Content-Length`` over it, else once it grows past it; both
    name the flag), then handed to the app; after it only a disconnect can come.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await _too_large(self.max_bytes)(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            message = (
                f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout)"
            )
            await _error(message, 408)(scope, receive, send)
            return
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------
# Normalisation (GenerateReqInput.normalize_batch_and_arguments) and response building
# ---------------------------------------------------------------------------------------------


def _per_item(value: Any, num: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * num
    if isinstance(value, list):
        if len(value) != num:
            raise RequestError(f"{name} has {len(value)} entries for a batch of {num} prompts")
        return [default if v is None else v for v in value]
    return [value] * num


def normalize(obj: GenerateReqInput, engine: Engine) -> tuple[bool, list[EngineRequest]]:
    """Turn a ``/generate`` body into engine requests; returns (is_single, requests)."""
    if obj.input_embeds is not None or obj.image_data is not None:
        raise RequestError("input_embeds and image_data are not supported by the embedded engine")
    if obj.lora_path is not None:
        raise RequestError("lora_path is not supported by the embedded engine")
    if obj.token_ids_logprob:
        raise RequestError("token_ids_logprob is not supported by the embedded engine")
    if obj.return_hidden_states is True or (
        isinstance(obj.return_hidden_states, list) and any(obj.return_hidden_states)
    ):
        raise RequestError("return_hidden_states is not supported by the embedded engine")
    if obj.text is None and obj.input_ids is None:
        raise RequestError("Either text, input_ids or input_embeds should be provided.")
    session = None
    if obj.session_params is not None:
        session = SessionParams.from_dict(obj.session_params)
    if obj.text is not None and obj.input_ids is not None:
        raise RequestError("Provide either text or input_ids, not both.")
    if obj.text is not None:
        is_single = isinstance(obj.text, str)
        texts = [obj.text] if is_single else list(obj.text)
        _check_batch_size(len(texts), 1)
        prompts = [engine.tokenizer.encode(t) for t in texts]
    else:
        ids = obj.input_ids
        if len(ids) == 0 and session is None:
            raise RequestError("input_ids cannot be empty.")
        is_single = len(ids) == 0 or not isinstance(ids[0], list)
        prompts = [list(ids)] if is_single else [list(p) for p in ids]
        _check_batch_size(len(prompts), 1)
    num = len(prompts)
    if num == 0:
        raise RequestError("the batch is empty")
    raw_params = _per_item(obj.sampling_params, num, "sampling_params", {})
    params = [SamplingParams.from_dict(p) for p in raw_params]
    n = params[0].n
    _check_batch_size(num, n)
    if session is not None and (num != 1 or n != 1):
        raise RequestError("session_params takes one prompt and n=1 (one turn per request)")
    if any(p.n != n for p in params):
        raise RequestError(
            "The parallel_sample_num should be the same for all samples in sample params."
        )
    if isinstance(obj.rid, list):
        if len(obj.rid) != num:
            raise RequestError(
                "The specified rids length mismatch with the batch_size for batch processing."
            )
        rids = list(obj.rid)
        if len(set(rids)) != len(rids):
            dup = next(r for r in rids if rids.count(r) > 1)
            raise RequestError(f"Duplicate request ID detected in rid: {dup[:80]!r}")
    elif obj.rid is None:
        rids = [uuid.uuid4().hex for _ in range(num)]
    else:
        rids = [obj.rid] if is_single else [f"{obj.rid}_{i}" for i in range(num)]
    return_logprob = _per_item(obj.return_logprob, num, "return_logprob", False)
    start_len = _per_item(obj.logprob_start_len, num, "logprob_start_len", -1)
    top_num = _per_item(obj.top_logprobs_num, num, "top_logprobs_num", 0)
    requests = []
    for i in range(num):
        for j in range(n):
            requests.append(
                EngineRequest(
                    input_ids=tuple(int(t) for t in prompts[i]),
                    sampling=params[i],
                    rid=rids[i] if n == 1 else f"{rids[i]}_{j}",
                    return_logprob=bool(return_logprob[i]),
                    logprob_start_len=int(start_len[i]),
                    top_logprobs_num=int(top_num[i]),
                    return_routed_experts=obj.return_routed_experts,
                    routed_experts_start_len=obj.routed_experts_start_len,
                    copy_index=j,
                    session=session,
                )
            )
    # Every prompt is checked before any is submitted: a batch runs whole or not at all.
    for req in requests[::n]:
        check_submitted(req, engine.limits)
    return is_single and n == 1, requests


def _check_batch_size(num: int, n: int) -> None:
    if num * n > MAX_SEQUENCES:
        what = f"{num} prompts" if n == 1 else f"{num} prompts x n={n}"
        raise RequestError(
            f"the request asks for {what} = {num * n} sequences; one /generate takes at most "
            f"{MAX_SEQUENCES} (sampling_params.n, or split the batch)"
        )


def _triples(entries, tokenizer, with_text: bool) -> list[tuple[float | None, int, str | None]]:
    if not with_text:
        return [(lp, tid, None) for lp, tid in entries]
    texts = tokenizer.batch_decode([[tid] for _, tid in entries])
    return [(lp, tid, txt) for (lp, tid), txt in zip(entries, texts, strict=True)]


def output_to_sglang(out: Output, req: EngineRequest, tokenizer, with_text: bool = False) -> dict:
    """One ``/generate`` result dict, shaped as SGLang's tokenizer manager builds it."""
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": out.finish_reason,
        "prompt_tokens": out.prompt_tokens,
        "weight_version": out.weight_version,
        "completion_tokens": len(out.output_ids),
        "cached_tokens": out.cached_tokens,
        "e2e_latency": out.e2e_latency,
    }
    if req.return_logprob:
        meta["input_token_logprobs"] = _triples(
            out.input_token_logprobs or [], tokenizer, with_text
        )
        meta["output_token_logprobs"] = _triples(
            out.output_token_logprobs or [], tokenizer, with_text
        )
        meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = [
                None if row is None else _triples(row, tokenizer, with_text)
                for row in out.input_top_logprobs or []
            ]
            meta["output_top_logprobs"] = [
                _triples(row, tokenizer, with_text) for row in out.output_top_logprobs or []
            ]
    if out.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(out.routed_experts)
    return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}


# ---------------------------------------------------------------------------------------------
# Tensor payloads of /update_weights_from_tensor
# ---------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    "torch._utils": None,  # _rebuild_tensor_v2, _rebuild_parameter, ...
    "torch.multiprocessing.reductions": None,  # rebuild_tensor, rebuild_storage_fd, cuda ...
    "torch.storage": None,
    "multiprocessing.resource_sharer": {"DupFd"},
    "multiprocessing.reduction": {"rebuild_ctype", "DupFd"},
    "collections": {"OrderedDict"},
    "builtins": {"list", "tuple", "dict", "set", "int", "float", "str", "bytes", "bytearray"},
    "torch": None,  # dtypes, Size, device, storage classes (checked below)
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles ``[(name, tensor), ...]`` and nothing else that could run code."""

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get(module, False)
        if allowed is False or (allowed is not None and name not in allowed):
            raise pickle.UnpicklingError(f"blocked {module}.{name} in a weight payload")
        obj = super().find_class(module, name)
        if module == "torch" and not (
            isinstance(obj, (torch.dtype, torch.device))
            or obj in (torch.Size, torch.Tensor)
            or name.endswith("Storage")
        ):
            raise pickle.UnpicklingError(f"blocked torch.{name} in a weight payload")
        return obj


def decode_named_tensors(
    serialized: list[str], load_format: str | None
) -> list[tuple[str, torch.Tensor]]:
    """Decode SGLang's ``serialized_named_tensors`` (entry 0: this server is one TP rank)."""
    if load_format not in (None, "direct"):
        raise RequestError(
            f"load_format={load_format!r} is not supported by the embedded engine; send "
            "serialized [(name, tensor), ...] with load_format null"
        )
    if not serialized:
        raise RequestError("serialized_named_tensors is empty")
    try:
        raw = base64.b64decode(serialized[0], validate=True)
        import torch.multiprocessing

        named = _TensorUnpickler(io.BytesIO(raw)).load()
    except (binascii.Error, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise RequestError(f"could not decode serialized_named_tensors[0]: {exc}") from exc
    if not isinstance(named, (list, tuple)) or not all(
        isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[1], torch.Tensor)
        for x in named
    ):
        raise RequestError("serialized_named_tensors[0] must hold a list of (name, tensor) pairs")
    return [(str(name), tensor) for name, tensor in named]


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def build_app(
    engine: Engine,
    server_args: dict[str, Any] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (started or not: it is started on app startup).

    ``max_body_bytes``: larger request bodies answer 413; ``body_timeout_s``: a body not
    received whole in that time answers 408.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("The server is fired up and ready to roll!")
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="mopd embedded engine (SGLang HTTP API)", lifespan=lifespan)
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    server_args = dict(server_args or {})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
            elif not loc and err.get("type") in ("model_attributes_type", "dict_type"):
                kind = request.headers.get("content-type")
                if kind is None or "json" not in kind:
                    parts.append(
                        "the body must be JSON sent with content-type application/json, "
                        f"got content-type {kind!r}"
                    )
                else:
                    parts.append("the body must be a JSON object")
            else:
                parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return _invalid(parts)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's json.loads failed on something other than a syntax error.
            cause = exc.__cause__
            if isinstance(cause, RecursionError):
                reason = "it is nested too deeply"
            elif isinstance(cause, UnicodeDecodeError):
                reason = "it is not UTF-8"
            else:
                reason = f"{type(cause).__name__}: {cause}"[:_MAX_PART]
            return _invalid([f"the body is not valid JSON ({reason})"])
        return await http_exception_handler(request, exc)

    async def _run(reqs: list[EngineRequest]) -> list[Output]:
        futures = await run_in_threadpool(lambda: [engine.submit(r) for r in reqs])
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(obj: GenerateReqInput):
        try:
            # Off the event loop: tokenizing a large batch must not stall other connections.
            is_single, reqs = await run_in_threadpool(normalize, obj, engine)
            outs = await _run(reqs)
        except RequestError as exc:
            logger.info("[http_server] Error: %s", exc)
            return _error(str(exc))
        results = [
            output_to_sglang(o, r, engine.tokenizer, obj.return_text_in_logprobs)
            for o, r in zip(outs, reqs, strict=True)
        ]
        if obj.stream:

            async def events() -> AsyncIterator[bytes]:
                for index, result in enumerate(results):
                    if not is_single:
                        result = {**result, "index": index}
                    yield b"data: " + json.dumps(result).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        # Already plain JSON types: orjson writes them directly (no jsonable_encoder walk over
        # every log-prob entry, and several times faster than the json module on the top-k).
        return Response(orjson.dumps(results[0] if is_single else results), media_type=_JSON)

    # Blocking engine calls: plain handlers, which FastAPI runs on its thread pool.
    @app.api_route("/open_session", methods=["GET", "POST"])
    def open_session(obj: OpenSessionReqInput):
        try:
            sid = engine.open_session(
                obj.session_id, obj.capacity_of_str_len, obj.timeout, obj.streaming
            )
        except RequestError as exc:
            return _error(str(exc))
        return JSONResponse(sid)

    @app.api_route("/close_session", methods=["GET", "POST"])
    def close_session(obj: CloseSessionReqInput) -> Response:
        engine.close_session(obj.session_id)
        return Response(status_code=200)

    @app.get("/health")
    async def health() -> Response:
        alive = engine.alive
        return Response(status_code=200 if alive else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        req = EngineRequest(
            input_ids=(0,),
            sampling=SamplingParams.from_dict({"max_new_tokens": 1, "temperature": 0.0}),
            rid=f"HEALTH_CHECK_{time.time()}",
        )
        try:
            await asyncio.wait_for(asyncio.wrap_future(engine.submit(req)), timeout=20)
        except Exception:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info() -> dict:
        return engine.model_info()

    @app.get("/get_weight_version")
    async def get_weight_version() -> dict:
        return {"weight_version": engine.weight_version}

    @app.get("/get_server_info")
    async def get_server_info() -> dict:
        return {
            **server_args,
            "weight_version": engine.weight_version,
            "max_req_input_len": engine.context_len - 1,
            "context_length": engine.context_len,
            "internal_states": [
                {
                    "num_running_reqs": engine.num_running,
                    "num_waiting_reqs": engine.num_waiting,
                    "num_generated_tokens": engine.num_generated_tokens,
                    **engine.stats,
                }
            ],
            "version": VERSION,
        }

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    def flush_cache() -> Response:
        ok = engine.flush_cache()
        return Response(
            content="Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n",
            status_code=200 if ok else 400,
        )

    @app.post("/abort_request")
    def abort_request(obj: AbortReq) -> Response:
        engine.abort(obj.rid or "", abort_all=obj.abort_all)
        return Response(status_code=200)

    @app.post("/update_weights_from_disk")
    def update_weights_from_disk(obj: UpdateWeightFromDiskReqInput) -> JSONResponse:
        if obj.load_format not in (None, "auto", "safetensors"):
            ok, msg = False, f"load_format={obj.load_format!r} is not supported; use safetensors"
        else:
            ok, msg = engine.update_weights_from_disk(
                obj.model_path, obj.weight_version, obj.abort_all_requests
            )
        if ok and obj.weight_version is not None:
            msg += f" Weight version updated to {obj.weight_version}."
        content = {"success": ok, "message": msg, "num_paused_requests": 0}
        return JSONResponse(content, status_code=200 if ok else 400)

    @app.post("/update_weights_from_tensor")
    def update_weights_from_tensor(obj: UpdateWeightsFromTensorReqInput) -> JSONResponse:
        try:
            named = decode_named_tensors(obj.serialized_named_tensors, obj.load_format)
        except RequestError as exc:
            return JSONResponse({"success": False, "message": str(exc)}, status_code=400)
        ok, msg = engine.update_weights_from_tensors(
            named, obj.weight_version, obj.abort_all_requests
        )
        if ok and obj.weight_version is not None:
            msg += f" Weight version updated to {obj.weight_version}."
        return JSONResponse({"success": ok, "message": msg}, status_code=200 if ok else 400)

    @app.post("/update_weight_version")
    def update_weight_version(obj: UpdateWeightVersionReqInput) -> JSONResponse:
        engine.set_weight_version(obj.new_version, obj.abort_all_requests)
        return JSONResponse(
            {
                "success": True,
                "message": f"Weight version updated to {obj.new_version}",
                "new_version": obj.new_version,
            }
        )

    for unsupported in (
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/update_weights_from_distributed",
        "/update_weights_from_ipc",
    ):

        def _unsupported(route: str = unsupported) -> JSONResponse:
            return JSONResponse(
                {
                    "success": False,
                    "message": f"{route} is not supported by the embedded engine server; use "
                    "/update_weights_from_disk or /update_weights_from_tensor",
                },
                status_code=400,
            )

        app.add_api_route(unsupported, _unsupported, methods=["POST"])

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    def release_memory_occupation(obj: MemoryReqInput | None = None):
        ok, msg = engine.release_memory()
        return None if ok else _error(msg)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    def resume_memory_occupation(obj: MemoryReqInput | None = None):
        ok, msg = engine.resume_memory()
        return None if ok else _error(msg)

    @app.post("/pause_generation")
    def pause_generation(obj: PauseGenerationReqInput | None = None) -> JSONResponse:
        mode = obj.mode if obj is not None else "abort"
        if mode not in ("abort", "retract", "in_place"):
            return _error(
                f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', 'in_place']."
            )
        engine.pause(abort_all=mode == "abort")
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    def continue_generation() -> JSONResponse:
        engine.resume()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    return app


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """SGLang's core launch flags; returns (args, ignored SGLang flags)."""
    p = argparse.ArgumentParser(
        prog="python -m rollout.server",
        description="Embedded engine server speaking SGLang's HTTP API (transformers backend).",
    )
    p.add_argument("--model-path", required=True)
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float", "float16", "half", "bfloat16"],
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--log-level", default="info")
    p.add_argument("--torch-num-threads", type=int, default=None, help="(ours) torch CPU threads")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help="(ours) largest request body accepted; larger ones answer 413",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT_S,
        help="(ours) seconds a client has to send a whole request body; then 408",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=LIMIT_CONCURRENCY,
        help="(ours) connections and requests at once (uvicorn); beyond it 503",
    )
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args, ignored = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="[%(asctime)s] %(name)s %(levelname)s: %(message)s"
    )
    if ignored:
        logger.warning(
            "ignoring SGLang flags the embedded engine does not use: %s", " ".join(ignored)
        )
    if args.torch_num_threads:
        torch.set_num_threads(args.torch_num_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(
        model_path=args.model_path,
        tokenizer_path=args.tokenizer_path,
        dtype=args.dtype,
        device=device,
        max_running_requests=args.max_running_requests,
        max_prefill_tokens=args.max_prefill_tokens,
        context_length=args.context_length,
        enable_return_routed_experts=args.enable_return_routed_experts,
        random_seed=args.random_seed,
        weight_version=args.weight_version,
        return_original_logprob=os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower()
        in ("1", "true", "yes"),
    )
    engine = Engine(config)
    server_args = {k: v for k, v in vars(args).items()}
    server_args["device"] = device
    server_args["served_model_name"] = args.served_model_name or args.model_path
    app = build_app(engine, server_args, args.max_body_bytes, args.body_timeout)
    # Idle keep-alive connections live longer than the clients keep them (ClientConfig.
    # keepalive_expiry_s), so the client, never the server, closes an idle connection.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


if __name__ == "__main__":
    main()
