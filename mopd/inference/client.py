"""Async HTTP client for one SGLang-compatible engine server (SGLang or the embedded engine).

Every role talks to engine servers through this one class: rollout workers generate, teacher
scorers score (prefill-only), the driver syncs weights and reads versions. The wire format lives
in ``mopd.inference.protocol``; this module adds transport concerns:

- Timeouts: connect / read limits per call kind (generation and weight loads may be slow).
- Retries with exponential back-off and jitter (tenacity), by what is safe to resend. A call
  that never reached the server (connection refused, connect timeout) is retried whatever it
  is. Idempotent calls (health, info, scoring, flush, abort, memory release/resume) are also
  retried on read timeouts, dropped connections and 429/5xx answers. Generation and weight
  updates are not resent once the server may have seen them: a second weight load or a
  duplicated sample is not what the caller asked for.
- Cancellation: cancelling the task awaiting ``generate`` sends ``/abort_request`` with the
  request's rid, so the server stops decoding it instead of burning a slot.

``SyncEngineClient`` runs the same client on a private event-loop thread for callers that are
not async (driver code, sync Ray actors).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import httpx
import numpy as np
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    ModelInfo,
    ProtocolError,
    ScoreOutput,
    UpdateWeightVersion,
    WeightUpdateRequest,
    WeightUpdateResult,
    batch_json,
    make_score_request,
    parse_generate_output,
    parse_model_info,
    parse_score_output,
    parse_weight_update_result,
)

__all__ = [
    "ClientConfig",
    "EngineClient",
    "EngineError",
    "EngineUnavailable",
    "SyncEngineClient",
    "WeightUpdateError",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ClientConfig:
    """Transport settings of an ``EngineClient``."""

    connect_timeout_s: float = 5.0
    """Limit for opening a connection."""
    request_timeout_s: float = 600.0
    """Limit for one generate or score request (read side)."""
    admin_timeout_s: float = 600.0
    """Limit for weight updates and memory release/resume (a large checkpoint loads slowly)."""
    info_timeout_s: float = 30.0
    """Limit for health and info calls."""
    max_attempts: int = 4
    """Attempts per call, the first included, for failures that are safe to retry."""
    retry_deadline_s: float = 120.0
    """Stop retrying once this much time has passed since the first attempt."""
    backoff_initial_s: float = 0.2
    """First back-off delay; doubles each attempt, with jitter."""
    backoff_max_s: float = 10.0
    """Largest back-off delay."""
    max_connections: int = 512
    """Connection-pool size (concurrent requests to this server)."""
    keepalive_expiry_s: float = 2.0
    """Idle pooled connections are closed after this long. Keep it below the server's
    keep-alive timeout (uvicorn's default, 5 s): a connection the server closes at the moment
    the client reuses it fails with an empty ReadError after the request was sent."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer`` (SGLang's --api-key); never logged."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in (
            "connect_timeout_s",
            "request_timeout_s",
            "admin_timeout_s",
            "info_timeout_s",
            "keepalive_expiry_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class EngineError(RuntimeError):
    """The server answered a call with an error (names the server, route and its message)."""

    def __init__(self, url: str, route: str, message: str, status: int | None = None):
        self.url, self.route, self.status = url, route, status
        where = f"{url}{route}" + (f" (HTTP {status})" if status is not None else "")
        super().__init__(f"{where}: {message}")


class EngineUnavailable(EngineError):
    """The server could not be reached (or kept failing) within the retry budget."""


class WeightUpdateError(EngineError):
    """A weight-sync route answered ``success: false``."""


def _never_reached_server(exc: BaseException) -> bool:
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


class _RetryableStatus(Exception):
    """An HTTP answer worth retrying for an idempotent call (429, 5xx)."""

    def __init__(self, response: httpx.Response):
        self.response = response
        super().__init__(f"HTTP {response.status_code}")


def _retry_idempotent(exc: BaseException) -> bool:
    retryable = (
        httpx.TimeoutException,
        httpx.NetworkError,
        httpx.RemoteProtocolError,
        _RetryableStatus,
    )
    return isinstance(exc, retryable)


def _error_message(response: httpx.Response) -> str:
    """SGLang's error bodies: ``{"error": {"message": ...}}``, ``{"error": "..."}``, text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or response.reason_phrase
    if isinstance(body, Mapping):
        error = body.get("error", body.get("message", body.get("detail")))
        if isinstance(error, Mapping):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:2000]
    return str(body)[:2000]


class EngineClient:
    """Client of one engine server at ``base_url`` (``http://host:port``).

    Args:
        base_url: the server (or an sglang-router in front of several).
        config: timeouts, retries, pool size, API key.
        routed_experts_shape: (num_hidden_layers, num_experts_per_tok) of the served model,
            needed to decode routed experts (not reported by the server).
        name: how errors name this server (e.g. the teacher's name); defaults to the URL.
    """

    def __init__(
        self,
        base_url: str,
        config: ClientConfig | None = None,
        routed_experts_shape: tuple[int, int] | None = None,
        name: str | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self.routed_experts_shape = routed_experts_shape
        self.name = name or self.base_url
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=cfg.max_connections,
                max_keepalive_connections=cfg.max_connections,
                keepalive_expiry=cfg.keepalive_expiry_s,
            ),
        )
        self._pending_aborts: set[asyncio.Task[None]] = set()

    # -- transport -----------------------------------------------------------------------------

    async def _call(
        self,
        method: Literal["GET", "POST"],
        route: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        idempotent: bool,
        expect_json: bool = True,
        rids: list[Any] | None = None,
    ) -> Any:
        """One call with retries; returns the decoded JSON (or text) of a 2xx answer.

        ``rids`` (generation only) starts as ``[the request's rid]``. SGLang refuses a rid that
        is still in flight, so a retry after a failure the server may have seen (a timeout)
        aborts the previous rid and is sent under a new one, appended to ``rids``.
        """
        cfg = self.config
        timeout = httpx.Timeout(timeout_s or cfg.request_timeout_s, connect=cfg.connect_timeout_s)
        retry_if = _retry_idempotent if idempotent else _never_reached_server

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s%s attempt %d failed (%s); retrying",
                self.name,
                route,
                state.attempt_number,
                exc,
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(retry_if),
            stop=stop_after_attempt(cfg.max_attempts) | stop_after_delay(cfg.retry_deadline_s),
            wait=wait_exponential_jitter(
                multiplier=cfg.backoff_initial_s,
                jitter=cfg.backoff_initial_s,
                max=cfg.backoff_max_s,
            ),
            before_sleep=log_retry,
            reraise=True,
        )
        last_error: BaseException | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    if rids and last_error is not None and not _never_reached_server(last_error):
                        # rids[-1]: the rid (or the batch's list of rids) last sent.
                        sent, suffix = rids[-1], f"-retry{len(rids)}"
                        for rid in sent if isinstance(sent, list) else [sent]:
                            self._abort_in_background(rid)
                        first = rids[0]
                        rids.append(
                            [f"{r}{suffix}" for r in first]
                            if isinstance(first, list)
                            else f"{first}{suffix}"
                        )
                        json = {**json, "rid": rids[-1]}
                    try:
                        response = await self._http.request(
                            method, route, json=json, params=params, timeout=timeout
                        )
                        if idempotent and response.status_code in _RETRYABLE_STATUS:
                            raise _RetryableStatus(response)
                    except Exception as exc:
                        last_error = exc
                        raise
        except _RetryableStatus as exc:
            raise EngineUnavailable(
                self.name, route, _error_message(exc.response), exc.response.status_code
            ) from None
        except httpx.HTTPError as exc:
            raise EngineUnavailable(
                self.name, route, f"{type(exc).__name__}: {exc or 'no response'}"
            ) from exc
        if response.status_code >= 400:
            raise EngineError(self.name, route, _error_message(response), response.status_code)
        if not expect_json:
            return response.text
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except ValueError as exc:
            raise EngineError(
                self.name, route, f"answer is not JSON: {response.text[:200]!r}", 200
            ) from exc

    # -- generation and scoring ----------------------------------------------------------------

    @overload
    async def generate(self, request: GenerateRequest) -> GenerateOutput: ...

    @overload
    async def generate(self, request: Sequence[GenerateRequest]) -> list[GenerateOutput]: ...

    async def generate(
        self, request: GenerateRequest | Sequence[GenerateRequest]
    ) -> GenerateOutput | list[GenerateOutput]:
        """Generate for one request, or for several concurrently (outputs in request order).

        Cancelling the awaiting task aborts the request(s) on the server.
        """
        if isinstance(request, GenerateRequest):
            return await self._generate_one(request)
        return list(await asyncio.gather(*(self._generate_one(r) for r in request)))

    async def _generate_one(
        self, request: GenerateRequest, *, idempotent: bool = False
    ) -> GenerateOutput:
        request = request if request.rid else request.with_rid()
        rids = [request.rid]
        try:
            payload = await self._call(
                "POST", "/generate", json=request.to_json(), idempotent=idempotent, rids=rids
            )
        except asyncio.CancelledError:
            self._abort_in_background(rids[-1])
            raise
        except EngineUnavailable as exc:
            # Given up on (e.g. read timeout): the server may still be decoding it.
            if exc.__cause__ is not None and not _never_reached_server(exc.__cause__):
                self._abort_in_background(rids[-1])
            raise
        if isinstance(payload, list) and len(payload) == 1:
            payload = payload[0]
        return parse_generate_output(payload, request, self.routed_experts_shape)

    async def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for several requests in ONE batched ``/generate`` call (SGLang's batch form;
        see ``batch_json``); outputs in request order. Far fewer HTTP round trips than one call
        per request (e.g. the G samples of a prompt group). Not retried once sent; cancelling
        aborts every request of the batch on the server."""
        requests = [r if r.rid else r.with_rid() for r in requests]
        rids = [r.rid for r in requests]
        try:
            payload = await self._call(
                "POST", "/generate", json=batch_json(requests), idempotent=False
            )
        except (asyncio.CancelledError, EngineUnavailable) as exc:
            self._abort_batch_if_sent(exc, rids)
            raise
        if not isinstance(payload, list) or len(payload) != len(requests):
            got = len(payload) if isinstance(payload, list) else type(payload).__name__
            raise ProtocolError(f"batched /generate of {len(requests)} requests answered {got}")
        return [
            parse_generate_output(p, r, self.routed_experts_shape)
            for p, r in zip(payload, requests, strict=True)
        ]

    async def score_batch(
        self,
        items: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
        top_logprobs_num: int = 0,
    ) -> list[ScoreOutput]:
        """``score`` for several (prompt ids, response ids) pairs in ONE batched ``/generate``
        call (prefill-only, so retried like a read, each retry under new rids); results in
        input order."""
        requests = [make_score_request(p, r, top_logprobs_num).with_rid() for p, r in items]
        rids: list[Any] = [[r.rid for r in requests]]
        try:
            payload = await self._call(
                "POST", "/generate", json=batch_json(requests), idempotent=True, rids=rids
            )
        except (asyncio.CancelledError, EngineUnavailable) as exc:
            self._abort_batch_if_sent(exc, rids[-1])  # the rids of the last attempt
            raise
        if not isinstance(payload, list) or len(payload) != len(requests):
            got = len(payload) if isinstance(payload, list) else type(payload).__name__
            raise ProtocolError(f"batched scoring of {len(requests)} requests answered {got}")
        return [
            parse_score_output(parse_generate_output(p, r, self.routed_experts_shape), r)
            for p, r in zip(payload, requests, strict=True)
        ]

    async def score(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        response_ids: Sequence[int] | np.ndarray,
        top_logprobs_num: int = 0,
        rid: str | None = None,
    ) -> ScoreOutput:
        """Log-probs this server's model gives ``response_ids`` after ``prompt_ids``.

        Prefill-only (``max_new_tokens = 0``), so it is idempotent and retried like a read.

        Returns:
            ScoreOutput with float32 [N] log-probs (N = len(response_ids)) and, when
            ``top_logprobs_num = K > 0``, the top-K log-probs and ids per position [N, K].
        """
        request = make_score_request(prompt_ids, response_ids, top_logprobs_num, rid)
        output = await self._generate_one(request, idempotent=True)
        return parse_score_output(output, request)

    async def abort(self, rid: str | None = None, *, abort_all: bool = False) -> None:
        """Abort one request by rid, or every request on the server."""
        if (rid is None) == (not abort_all):
            raise ValueError("pass exactly one of rid or abort_all=True")
        body = {"abort_all": True} if abort_all else {"rid": rid}
        await self._call(
            "POST",
            "/abort_request",
            json=body,
            idempotent=True,
            timeout_s=self.config.info_timeout_s,
            expect_json=False,
        )

    def _abort_batch_if_sent(self, exc: BaseException, rids: Sequence[str]) -> None:
        """A batched call was cancelled, or given up on after the server may have seen it
        (e.g. read timeouts): abort its requests, which the server may still be running."""
        cause = exc.__cause__
        if isinstance(exc, asyncio.CancelledError) or (
            cause is not None and not _never_reached_server(cause)
        ):
            for rid in rids:
                self._abort_in_background(rid)

    def abort_in_background(self, rid: str | None) -> None:
        """Abort ``rid`` on the server without waiting (``aclose`` waits for it)."""
        self._abort_in_background(rid)

    def _abort_in_background(self, rid: str | None) -> None:
        async def abort_quietly() -> None:
            try:
                await self.abort(rid)
            except Exception as exc:  # the request may already be gone; nothing to undo
                log.warning("%s: abort of cancelled request %s failed: %s", self.name, rid, exc)

        task = asyncio.get_running_loop().create_task(abort_quietly())
        self._pending_aborts.add(task)
        task.add_done_callback(self._pending_aborts.discard)

    # -- sessions (multi-turn prefix reuse) -----------------------------------------------------

    async def open_session(
        self,
        session_id: str | None = None,
        *,
        timeout_s: float | None = None,
        capacity_of_str_len: int = 0,
    ) -> str:
        """Open a session on this server (SGLang's ``/open_session``); returns its id.

        A session keeps each finished turn on the server, so the next turn sends only its new
        tokens (``GenerateRequest.session_params``) and the server reuses the earlier turns:
        their tokens exactly as sent and generated, their KV cache, and the routed experts
        recorded when they ran. All turns of a session must go to the server that opened it
        (``EnginePool`` does that). ``timeout_s``: the server closes the session after this
        much idle time (default: the server's). Close it with ``close_session``.

        A multi-turn loop (the rid of each answer is the turn the next one continues)::

            sid = await client.open_session()
            try:
                parent, new_ids = None, prompt_ids
                for _ in range(max_turns):
                    out = await client.generate(GenerateRequest(
                        input_ids=tuple(new_ids),
                        sampling_params=SamplingParams(max_new_tokens=256, temperature=1.0),
                        return_logprob=True,
                        return_routed_experts=True,  # rows for the whole context so far
                        session_params=SessionParams(id=sid, rid=parent),
                    ))
                    parent = out.rid
                    observation = run_tools(out.output_ids)  # token ids, tokenized once
                    if observation is None:
                        break
                    new_ids = observation
            finally:
                await client.close_session(sid)

        Raises:
            EngineError: the server refused (the id is open already, too many sessions).
        """
        body: dict[str, Any] = {
            "capacity_of_str_len": int(capacity_of_str_len),
            "session_id": session_id or uuid.uuid4().hex,
        }
        if timeout_s is not None:
            body["timeout"] = float(timeout_s)
        payload = await self._call(
            "POST",
            "/open_session",
            json=body,
            idempotent=False,
            timeout_s=self.config.info_timeout_s,
        )
        if not isinstance(payload, str) or not payload:
            raise EngineError(self.name, "/open_session", f"not a session id: {payload!r:.200}")
        return payload

    async def close_session(self, session_id: str) -> None:
        """Close a session and free what the server keeps for it (unknown ids are a no-op,
        as in SGLang)."""
        await self._call(
            "POST",
            "/close_session",
            json={"session_id": session_id},
            idempotent=True,
            timeout_s=self.config.info_timeout_s,
            expect_json=False,
        )

    @contextlib.asynccontextmanager
    async def session(self, timeout_s: float | None = None) -> AsyncIterator[str]:
        """``async with client.session() as sid:`` opens a session and always closes it."""
        sid = await self.open_session(timeout_s=timeout_s)
        try:
            yield sid
        finally:
            try:
                await self.close_session(sid)
            except EngineError as exc:  # the server idles it out anyway
                log.warning("%s: closing session %s failed: %s", self.name, sid, exc)

    # -- weights and memory --------------------------------------------------------------------

    async def update_weights(self, request: WeightUpdateRequest) -> WeightUpdateResult:
        """Send one weight-sync request; raises ``WeightUpdateError`` unless it succeeded."""
        try:
            payload = await self._call(
                "POST",
                request.route,
                json=request.to_json(),
                idempotent=False,
                timeout_s=self.config.admin_timeout_s,
            )
        except EngineError as exc:
            if type(exc) is EngineError:  # an error answer: report it as a failed update
                raise WeightUpdateError(exc.url, exc.route, str(exc), exc.status) from exc
            raise
        if isinstance(request, UpdateWeightVersion):
            payload = {"success": True, "message": "", **(payload or {})}
        result = parse_weight_update_result(payload, request.route)
        if not result.success:
            raise WeightUpdateError(self.name, request.route, result.message or "success: false")
        return result

    async def flush_cache(self) -> bool:
        """Drop the prefix (radix) cache; False when the server refused (requests running)."""
        try:
            await self._call(
                "POST",
                "/flush_cache",
                idempotent=True,
                timeout_s=self.config.info_timeout_s,
                expect_json=False,
            )
        except EngineUnavailable:
            raise
        except EngineError as exc:
            if exc.status == 400:
                return False
            raise
        return True

    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free GPU memory (``weights``, ``kv_cache``) while the trainer runs on the same GPUs."""
        await self._memory_occupation("/release_memory_occupation", tags)

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Take back the memory ``release_memory_occupation`` freed (all tags when None)."""
        await self._memory_occupation("/resume_memory_occupation", tags)

    async def _memory_occupation(self, route: str, tags: Sequence[str] | None) -> None:
        body = {"tags": list(tags)} if tags is not None else {}
        await self._call(
            "POST", route, json=body, idempotent=True, timeout_s=self.config.admin_timeout_s
        )

    async def pause_generation(
        self, mode: Literal["abort", "retract", "in_place"] = "abort"
    ) -> None:
        await self._call(
            "POST",
            "/pause_generation",
            json={"mode": mode},
            idempotent=False,
            timeout_s=self.config.admin_timeout_s,
        )

    async def continue_generation(self) -> None:
        await self._call(
            "POST",
            "/continue_generation",
            json={},
            idempotent=False,
            timeout_s=self.config.admin_timeout_s,
        )

    # -- health and info -----------------------------------------------------------------------

    async def health(self) -> bool:
        """True when ``/health`` answers 200 (one attempt: a probe, not a wait)."""
        return await self._probe("/health")

    async def health_generate(self) -> bool:
        """True when the server generates one token (``/health_generate``)."""
        return await self._probe("/health_generate")

    async def _probe(self, route: str) -> bool:
        try:
            response = await self._http.get(route, timeout=self.config.info_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def wait_until_healthy(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
        """Poll ``/health`` until 200; raises ``EngineUnavailable`` after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.health():
            if loop.time() >= deadline:
                raise EngineUnavailable(self.name, "/health", f"not healthy after {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)

    async def get_model_info(self) -> ModelInfo:
        payload = await self._call(
            "GET", "/get_model_info", idempotent=True, timeout_s=self.config.info_timeout_s
        )
        return parse_model_info(payload)

    async def get_server_info(self) -> dict[str, Any]:
        payload = await self._call(
            "GET", "/get_server_info", idempotent=True, timeout_s=self.config.info_timeout_s
        )
        if not isinstance(payload, dict):
            raise EngineError(self.name, "/get_server_info", f"not an object: {payload!r:.200}")
        return payload

    async def weight_version(self) -> str | None:
        """The version label of the weights the server serves now."""
        return (await self.get_model_info()).weight_version

    # -- lifetime ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Finish pending aborts, then close the connection pool."""
        if self._pending_aborts:
            await asyncio.gather(*self._pending_aborts, return_exceptions=True)
        await self._http.aclose()

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"EngineClient({self.name!r})"


class SyncEngineClient:
    """Blocking facade over an ``EngineClient`` that runs on a private event-loop thread.

    Every public coroutine method of ``EngineClient`` is available with the same arguments,
    returning its result (e.g. ``SyncEngineClient(url).generate(request)``).
    """

    def __init__(self, base_url: str, config: ClientConfig | None = None, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"engine-client-{base_url}", daemon=True
        )
        self._thread.start()

        async def make() -> EngineClient:  # httpx binds its pool to the loop that creates it
            return EngineClient(base_url, config, **kwargs)

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        target = getattr(self._client, name)
        if not inspect.iscoroutinefunction(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(target(*args, **kwargs))

        call.__doc__ = target.__doc__
        return call

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncEngineClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
