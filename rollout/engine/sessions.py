"""Sessions: multi-turn requests that continue on the KV cache of their earlier turns.

SGLang's ``/open_session`` + ``session_params`` (``srt/session/session_controller.py``). A
request with ``session=SessionParams(id, rid)`` continues request ``rid`` of an open session:
its context is that request's prompt + output tokens + the new ``input_ids``. When a session
request finishes, the engine keeps a snapshot of its slot row (keys/values of every position
run forward, the routes recorded for them) in the session; the next turn whose context starts
with those tokens restores the snapshot into its slot and prefills only the rest (the last
sampled token of the turn before and the new tokens): an "extend" forward whose rows start at
their cached length. Restored positions keep the routes recorded when they first ran, so the
routes an earlier turn returned are the rows a later turn returns for the same positions.

Memory: one snapshot per session (the latest finished turn), ``max_sessions`` sessions, closed
by ``close_session`` or after ``session_timeout_s`` idle; ``release_memory`` drops snapshots
(later turns prefill everything again). A weight update keeps them, as it keeps the keys and
values of requests in flight: the next turn continues on the cache its earlier turns built. A
turn that needs what a snapshot lacks (input log-probs or routes of cached positions), or
branches off an older turn, is prefilled whole.

``SessionStore`` holds the open sessions of one engine; it is owned by the engine thread (the
engine's ``open_session`` / ``close_session`` hop onto it).

Shape legend: H_kv key/value heads, D head dim, W sliding window, L decoder layers, k experts
per token.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from rollout.engine.kv_cache import SlotKVCache
from rollout.engine.requests import RequestError, RequestLimits, validate

if TYPE_CHECKING:
    from rollout.engine.slots import Seq, SlotState

__all__ = ["KVSnapshot", "Session", "SessionStore", "checked_session_id"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class KVSnapshot:
    """A finished session turn kept for the next one: the keys/values of context positions
    ``0..length-1`` (``tokens[:length]``; the last generated token was never run forward),
    per layer ``[H_kv, length or W, D]`` on the engine's device, and the routes recorded for
    those positions (int32 ``[length, L, k]``; None when the turn did not record routes)."""

    tokens: list[int]
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    routes_TLk: torch.Tensor | None


class Session:
    """One open session (SGLang's ``Session``): its requests as a tree keyed by rid, each
    with its whole token context once finished (None while it runs), and the KV cache of
    the latest finished turn. Owned by the engine thread."""

    def __init__(self, session_id: str, timeout: float | None) -> None:
        self.id = session_id
        self.timeout = timeout
        self.last_active = time.monotonic()
        self.tokens: dict[str, list[int] | None] = {}  # rid -> prompt + output, when finished
        self.prompt_lens: dict[str, int] = {}  # rid -> tokens of its context before its output
        self.children: dict[str | None, list[str]] = {}  # rid (None: root) -> continuing rids
        self.snapshot: KVSnapshot | None = None
        self.closed = False

    def drop(self, rid: str) -> None:
        """Forget ``rid`` and every request that continued it."""
        for child in self.children.pop(rid, []):
            self.drop(child)
        self.tokens.pop(rid, None)
        self.prompt_lens.pop(rid, None)

    def close(self) -> None:
        """Refuse later turns; a turn still running finishes without keeping its cache."""
        self.closed = True
        self.snapshot = None

    def finish_turn(self, rid: str, tokens: list[int]) -> None:
        """Record the whole context of a finished request (unless a replace dropped it)."""
        if rid in self.tokens:
            self.tokens[rid] = tokens
        self.last_active = time.monotonic()


def checked_session_id(
    session_id: str | None, timeout: float | None, streaming: bool | None
) -> str:
    """The id ``open_session`` opens (a fresh uuid hex when None); raise ``RequestError`` for
    a bad id or timeout, or for ``streaming`` sessions (not implemented here)."""
    if streaming:
        raise RequestError(
            "streaming sessions are not supported by the embedded engine; open a plain "
            "session and continue each turn with session_params.rid = the previous rid"
        )
    if timeout is not None and not (timeout > 0):
        raise RequestError(f"timeout must be a positive number of seconds, got {timeout!r}")
    sid = session_id if session_id is not None else uuid.uuid4().hex
    if not isinstance(sid, str) or not sid:
        raise RequestError(f"session_id must be a non-empty string, got {sid!r}")
    return sid


class SessionStore:
    """The open sessions of one engine, and the snapshots of their latest turns.

    ``limits`` validates a turn's assembled context; ``cache`` is the engine's KV cache
    (snapshots are copied out of and restored into its rows); ``bos_token_id`` is dropped
    from the front of a continuing turn's tokens, as SGLang does.
    """

    def __init__(
        self,
        max_sessions: int,
        default_timeout: float | None,
        limits: RequestLimits,
        cache: SlotKVCache,
        bos_token_id: int | None,
    ) -> None:
        self.max_sessions = max_sessions
        self.default_timeout = default_timeout
        self.limits = limits
        self.cache = cache
        self.bos_token_id = bos_token_id
        self._sessions: dict[str, Session] = {}
        self._last_reap = time.monotonic()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, sid: str, timeout: float | None) -> str:
        """Open session ``sid`` (``timeout`` None: the default); raise ``RequestError``."""
        if sid in self._sessions:
            raise RequestError(
                f"Failed to open the session. Check if a session with the same id is "
                f"still open: {sid!r}"
            )
        if len(self._sessions) >= self.max_sessions:
            raise RequestError(
                f"cannot open session {sid!r}: {len(self._sessions)} sessions are open "
                f"(max_sessions={self.max_sessions}); close finished sessions with "
                "close_session or raise --max-sessions"
            )
        default = self.default_timeout
        self._sessions[sid] = Session(sid, timeout if timeout is not None else default)
        return sid

    def close(self, session_id: str) -> bool:
        """Close a session; False if no such session was open."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.close()
        return True

    def reap(self, active: Iterable[Seq]) -> None:
        """Close sessions idle past their timeout (at most once a second), except those with
        a request among ``active`` (running or waiting)."""
        now = time.monotonic()
        if now - self._last_reap < 1.0:
            return
        self._last_reap = now
        busy = {s.session.id for s in active if s.session is not None}
        for sid, session in list(self._sessions.items()):
            idle = now - session.last_active
            if session.timeout is not None and idle > session.timeout and sid not in busy:
                logger.info("session %s idle for %.0f s: closing it", sid, idle)
                self._sessions.pop(sid)
                session.close()

    def drop_snapshots(self) -> None:
        """Free every kept turn (their sessions' next turns prefill again)."""
        for session in self._sessions.values():
            session.snapshot = None

    def resolve(self, seq: Seq) -> None:
        """Assemble a session request's context (SGLang's ``Session.create_req``), pick the
        cached prefix it can reuse, and register it in the session; raise ``RequestError``."""
        req, params = seq.req, seq.req.session
        session = self._sessions.get(params.id)
        if session is None:
            raise RequestError(
                f"Invalid request: session id {params.id} does not exist (open it with "
                "/open_session; it may have been closed or timed out)"
            )
        if req.rid in session.tokens:
            raise RequestError(
                f"rid {req.rid!r} is already a request of session {params.id}; give every "
                "turn its own rid"
            )
        parent = params.rid
        if params.replace:
            _replace(session, parent)
        context = list(req.input_ids)
        if parent is not None:
            context = self._continued(session, seq, context)
        validate(req, self.limits, context)
        seq.prompt = context
        if req.sampling.max_new_tokens is None:
            seq.limit = self.limits.context_len - len(context) - 1
        snap = session.snapshot
        # Reuse the kept turn when its cached positions open this context, unless this
        # request needs what a snapshot lacks (input log-probs or routes of those positions).
        if (
            snap is not None
            and self.cache.allocated
            and snap.length <= len(context) - 1
            and context[: snap.length] == snap.tokens[: snap.length]
            and not (req.return_logprob and 0 <= req.logprob_start_len < snap.length)
            and not (req.return_routed_experts and snap.routes_TLk is None)
        ):
            seq.cached, seq.snapshot = snap.length, snap
        seq.session = session
        session.tokens[req.rid] = None
        session.prompt_lens[req.rid] = len(context)
        session.children.setdefault(parent, []).append(req.rid)
        session.last_active = time.monotonic()

    def _continued(self, session: Session, seq: Seq, context: list[int]) -> list[int]:
        """The earlier request's context (cut as ``session_params`` asks) + the new tokens."""
        params = seq.req.session
        parent = params.rid
        if parent not in session.tokens:
            raise RequestError(
                f"Invalid request session id: rid {parent!r} is not a request of session "
                f"{params.id} (continue the rid of one of its earlier requests)"
            )
        earlier = session.tokens[parent]
        if earlier is None:
            raise RequestError(
                f"Session request is appending to a request that hasn't finished: "
                f"{parent!r}; wait for its response first"
            )
        bos = self.bos_token_id
        new = context[1:] if context and bos is not None and context[0] == bos else context
        start = earlier
        if params.drop_previous_output:
            start = earlier[: session.prompt_lens[parent]]
        if params.offset:
            start = start[: params.offset]
        return list(start) + new

    def keep_turn(self, seq: Seq, state: SlotState) -> None:
        """Keep a finished session turn's cache for the next one (its row still holds it).

        Positions 0..pos-1 ran forward (the last sampled token did not), with the routes they
        ran with when recorded.
        """
        session, row = seq.session, seq.slot
        if session is None or session.closed:
            return
        length = int(state.pos_S[row])
        routes = None
        if seq.req.return_routed_experts and state.routes_STLk is not None:
            routes = state.routes_STLk[row, :length].clone()
        session.snapshot = KVSnapshot(
            tokens=seq.prompt + seq.out_ids,
            length=length,
            layers=self.cache.snapshot_row(row, length),
            routes_TLk=routes,
        )


def _replace(session: Session, parent: str | None) -> None:
    """Discard the requests that continued ``parent`` (all of them when None)."""
    if parent is None:
        for rid in list(session.children.get(None, [])):
            session.drop(rid)
        session.children.pop(None, None)
    elif parent in session.tokens:
        for rid in session.children.pop(parent, []):
            session.drop(rid)
