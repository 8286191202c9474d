"""Requests to ``POST /generate``: sampling parameters, sessions, the batched body, scoring.

Field names follow SGLang 0.5.23 (``srt/managers/io_struct.py`` ``GenerateReqInput``,
``srt/sampling/sampling_params.py``); a field left None keeps the server's default and is
omitted from the JSON body.

Scoring. ``input_token_logprobs`` has one entry per prompt position from ``logprob_start_len``
on, and its first entry always has a null log-prob (the position that would predict it was not
computed). Scoring a response of N tokens after a prompt of P tokens is therefore a prefill-only
request (``max_new_tokens = 0``) over prompt + response with ``logprob_start_len = P - 1``:
entries 1..N are the response tokens (``responses.parse_score_output`` cuts them out).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mopd.inference.protocol.common import ProtocolError, int_tuple, json_fields


@dataclass(frozen=True)
class SamplingParams:
    """SGLang ``sampling_params`` (srt/sampling/sampling_params.py). None leaves SGLang's default.

    ``n`` is not offered: a group of samples is sent as separate requests (each with its own
    ``sampling_seed`` when reproducibility matters), so each sample is scheduled, load-balanced
    and cancelled on its own; the radix cache still shares the prompt prefix.
    """

    max_new_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 (or None) = whole vocabulary
    min_p: float | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    min_new_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ProtocolError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ProtocolError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ProtocolError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k != -1 and self.top_k < 1:
            raise ProtocolError(f"top_k must be -1 (all) or >= 1, got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ProtocolError(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            ids = int_tuple("stop_token_ids", self.stop_token_ids)
            object.__setattr__(self, "stop_token_ids", ids)

    def to_json(self) -> dict[str, Any]:
        """The ``sampling_params`` JSON object (unset fields omitted)."""
        return json_fields(self)


@dataclass(frozen=True)
class SessionParams:
    """``GenerateReqInput.session_params`` (io_struct.py ``SessionParams``): continue a turn.

    A session is opened with ``EngineClient.open_session`` and holds its requests on the
    server. With ``rid`` = an earlier (finished) request of session ``id``, the server runs
    that request's prompt + its output tokens + this request's ``input_ids`` (a leading BOS
    of ``input_ids`` is dropped), reusing what it cached of the earlier part. ``rid`` None
    starts a fresh branch. ``offset`` cuts the earlier context to its first ``offset`` tokens
    before appending; ``drop_previous_output`` appends to the earlier prompt only; ``replace``
    discards the requests that had continued ``rid``. The response then counts the whole
    context: ``prompt_tokens``, input log-prob positions and ``routed_experts`` rows (from
    ``routed_experts_start_len``, default 0: the whole sequence) all start at the session's
    first token, while ``output_ids`` / ``output_token_logprobs`` are this turn's tokens only.
    """

    id: str
    rid: str | None = None
    offset: int | None = None
    replace: bool | None = None
    drop_previous_output: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ProtocolError(f"SessionParams.id must be a session id string, got {self.id!r}")
        if self.offset is not None and self.offset < 0:
            raise ProtocolError(f"SessionParams.offset must be >= 0, got {self.offset}")

    def to_json(self) -> dict[str, Any]:
        """The ``session_params`` JSON object (unset fields omitted)."""
        return json_fields(self)


@dataclass(frozen=True)
class GenerateRequest:
    """One ``POST /generate`` request (srt/managers/io_struct.py ``GenerateReqInput``).

    Exactly one of ``input_ids`` / ``text``. ``rid`` is the handle for ``/abort_request``; the
    client fills a fresh one when unset. Streaming is not used: one response per request.
    ``session_params`` continues an earlier request of a session (see ``SessionParams``);
    ``input_ids`` are then only the new tokens (may be empty when ``rid`` is set), and
    ``logprob_start_len`` / ``routed_experts_start_len`` count from the session's first token.
    """

    input_ids: tuple[int, ...] | None = None
    text: str | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int | None = None  # None/-1: output log-probs only
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    session_params: SessionParams | None = None

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.text is None):
            raise ProtocolError("a GenerateRequest needs exactly one of input_ids or text")
        continues = self.session_params is not None and self.session_params.rid is not None
        if self.input_ids is not None:
            ids = int_tuple("input_ids", self.input_ids)
            if not ids and not continues:
                raise ProtocolError("input_ids is empty: SGLang needs at least one prompt token")
            object.__setattr__(self, "input_ids", ids)
        if self.token_ids_logprob is not None:
            ids = int_tuple("token_ids_logprob", self.token_ids_logprob)
            object.__setattr__(self, "token_ids_logprob", ids)
        asks_logprob_detail = (
            self.top_logprobs_num > 0
            or self.token_ids_logprob is not None
            or self.logprob_start_len not in (None, -1)
        )
        if asks_logprob_detail and not self.return_logprob:
            raise ProtocolError(
                "top_logprobs_num, token_ids_logprob and logprob_start_len need "
                "return_logprob=True (SGLang ignores them otherwise)"
            )
        if self.top_logprobs_num < 0:
            raise ProtocolError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")
        # A session request's positions count from the session's first token (unknown here).
        prompt_len = None
        if self.input_ids is not None and self.session_params is None:
            prompt_len = len(self.input_ids)
        if self.logprob_start_len is not None and self.logprob_start_len < -1:
            raise ProtocolError(f"logprob_start_len must be >= -1, got {self.logprob_start_len}")
        if prompt_len is not None and (self.logprob_start_len or 0) > prompt_len:
            raise ProtocolError(
                f"logprob_start_len {self.logprob_start_len} exceeds the prompt ({prompt_len})"
            )
        if self.routed_experts_start_len < 0 or (
            prompt_len is not None and self.routed_experts_start_len > prompt_len
        ):
            raise ProtocolError(
                f"routed_experts_start_len must lie in [0, prompt tokens], got "
                f"{self.routed_experts_start_len}"
            )

    def with_rid(self, rid: str | None = None) -> GenerateRequest:
        """This request with ``rid`` set (a fresh uuid4 hex when None)."""
        return replace(self, rid=rid or uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        """The JSON body, with SGLang's field names; defaults are omitted."""
        body: dict[str, Any] = {}
        if self.rid is not None:
            body["rid"] = self.rid
        if self.input_ids is not None:
            body["input_ids"] = list(self.input_ids)
        else:
            body["text"] = self.text
        body["sampling_params"] = self.sampling_params.to_json()
        if self.return_logprob:
            body["return_logprob"] = True
            if self.logprob_start_len is not None:
                body["logprob_start_len"] = self.logprob_start_len
            if self.top_logprobs_num:
                body["top_logprobs_num"] = self.top_logprobs_num
            if self.token_ids_logprob is not None:
                body["token_ids_logprob"] = list(self.token_ids_logprob)
            if self.return_text_in_logprobs:
                body["return_text_in_logprobs"] = True
        if self.return_routed_experts:
            body["return_routed_experts"] = True
            if self.routed_experts_start_len:
                body["routed_experts_start_len"] = self.routed_experts_start_len
        if self.session_params is not None:
            body["session_params"] = self.session_params.to_json()
        return body


def make_score_request(
    prompt_ids: Sequence[int] | np.ndarray,
    response_ids: Sequence[int] | np.ndarray,
    top_logprobs_num: int = 0,
    rid: str | None = None,
) -> GenerateRequest:
    """A prefill-only request scoring ``response_ids`` after ``prompt_ids`` (see module doc)."""
    prompt = int_tuple("prompt_ids", prompt_ids)
    response = int_tuple("response_ids", response_ids)
    if not prompt:
        raise ProtocolError("scoring needs a non-empty prompt (the first token has no log-prob)")
    return GenerateRequest(
        input_ids=prompt + response,
        sampling_params=SamplingParams(max_new_tokens=0),
        rid=rid,
        return_logprob=True,
        logprob_start_len=len(prompt) - 1,
        top_logprobs_num=top_logprobs_num,
    )


_PER_PROMPT = ("rid", "input_ids", "text", "sampling_params")
# Fields SGLang also takes per prompt in the batch form (a list), with their defaults.
_PER_PROMPT_LISTS = {"return_logprob": False, "logprob_start_len": -1, "top_logprobs_num": 0}


def batch_key(request: GenerateRequest) -> tuple:
    """The fields the requests of one batched ``/generate`` must share (``batch_json``):
    requests with equal keys batch together."""
    body = request.to_json()
    skip = {*_PER_PROMPT, *_PER_PROMPT_LISTS}
    return ("input_ids" in body, *sorted((k, repr(v)) for k, v in body.items() if k not in skip))


def batch_json(requests: Sequence[GenerateRequest]) -> dict[str, Any]:
    """One batched ``/generate`` body for ``requests`` (SGLang's batch form: ``input_ids`` a
    list of lists, ``sampling_params`` and ``rid`` lists, and ``return_logprob``,
    ``logprob_start_len``, ``top_logprobs_num`` lists where they differ). The server answers a
    list in request order. Every other field must be the same for all requests (``batch_key``),
    and none may continue a session (SGLang takes one session request at a time)."""
    if not requests:
        raise ProtocolError("a batched /generate needs at least one request")
    bodies = [r.to_json() for r in requests]
    if any(r.session_params is not None for r in requests):
        raise ProtocolError("session requests cannot be batched: send each turn on its own")
    if any(r.rid is None for r in requests):
        raise ProtocolError("every request of a batch needs a rid (GenerateRequest.with_rid)")
    kinds = {"input_ids" in b for b in bodies}
    if len(kinds) != 1:
        raise ProtocolError("a batch mixes input_ids and text requests")
    skip = {*_PER_PROMPT, *_PER_PROMPT_LISTS}
    shared = {k: v for k, v in bodies[0].items() if k not in skip}
    for b in bodies[1:]:
        other = {k: v for k, v in b.items() if k not in skip}
        if other != shared:
            differ = sorted(k for k in {*other, *shared} if other.get(k) != shared.get(k))
            raise ProtocolError(
                f"requests of one batch differ in {differ}; only input_ids/text, "
                f"sampling_params, rid and {', '.join(_PER_PROMPT_LISTS)} may differ"
            )
    for k, default in _PER_PROMPT_LISTS.items():
        values = [b.get(k, default) for b in bodies]
        if any(k in b for b in bodies):
            shared[k] = values[0] if all(v == values[0] for v in values) else values
    key = "input_ids" if "input_ids" in bodies[0] else "text"
    return {
        "rid": [b["rid"] for b in bodies],
        key: [b[key] for b in bodies],
        "sampling_params": [b["sampling_params"] for b in bodies],
        **shared,
    }
