"""Requests and outputs of the embedded engine, and the checks a request must pass.

What SGLang's ``/generate`` carries, as frozen dataclasses: ``SamplingParams`` (the supported
subset of SGLang's ``sampling_params``, validated with messages naming the field),
``SessionParams`` (continue a session's earlier request), ``Request`` (one sequence to
generate: SGLang expands ``n`` and batches into these) and ``Output`` (what one request
returns). ``validate`` holds a request to what the served model allows (``RequestLimits``),
with SGLang's wording, so the HTTP layer can answer 400 before anything runs.

Shape legend: T positions (rows of ``routed_experts``), L decoder layers, k experts per token.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "TOP_K_ALL",
    "LogprobEntry",
    "Output",
    "Request",
    "RequestError",
    "RequestLimits",
    "SamplingParams",
    "SessionParams",
    "check_submitted",
    "validate",
]

_SAMPLING_EPS = 1e-6
TOP_K_ALL = 1 << 30
MAX_STOP_STRINGS = 256
"""Most stop strings one request may give (each is matched at every decode step)."""
MAX_STOP_CHARS = 4096
"""Longest stop string accepted, in characters (its tokens are re-decoded at every step)."""


class RequestError(ValueError):
    """The request is invalid (the HTTP layer answers 400 with this message)."""


_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
}
_ACCEPTED_NOOP = {"spaces_between_special_tokens", "stream_interval"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """SGLang's ``sampling_params`` (``srt/sampling/sampling_params.py``), the supported subset.

    ``temperature`` 0 (below 1e-6) means greedy: stored as temperature 1 and ``top_k`` 1, as
    SGLang normalises it. ``top_k`` -1 (or absent) means the whole vocabulary.
    ``sampling_seed`` is SGLang's per-request seed; ``seed`` is accepted as an alias.
    Built directly or through ``from_dict``, the same range checks run (``__post_init__``):
    a value out of range raises ``RequestError`` naming the field.
    """

    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    def __post_init__(self) -> None:
        temperature, top_k = self.temperature, self.top_k
        if not math.isfinite(temperature) or temperature < 0.0:
            raise RequestError(
                f"temperature must be a non-negative finite number, got {temperature}."
            )
        if temperature < _SAMPLING_EPS:  # greedy, as SGLang normalises it
            temperature, top_k = 1.0, 1
        if top_k == -1:
            top_k = TOP_K_ALL
        object.__setattr__(self, "temperature", float(temperature))
        object.__setattr__(self, "top_k", top_k)
        if not 0.0 < self.top_p <= 1.0:  # False for NaN too
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}.")
        if top_k < 1:
            raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(
                f"sampling_params.stop holds {len(self.stop)} strings; at most "
                f"{MAX_STOP_STRINGS} are accepted"
            )
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise RequestError(
                f"sampling_params.stop holds a string of {longest} characters; at most "
                f"{MAX_STOP_CHARS} are accepted"
            )

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> SamplingParams:
        """Validate an SGLang ``sampling_params`` dict; raise ``RequestError`` naming the field."""
        raw = dict(raw or {})
        if "seed" in raw:
            seed = raw.pop("seed")
            if raw.get("sampling_seed") is None:
                raw["sampling_seed"] = seed
        for name, default in _UNSUPPORTED_DEFAULTS.items():
            value = raw.pop(name, default)
            if value is not None and value != default and value != {} and value != []:
                raise RequestError(
                    f"sampling_params.{name}={_short(value)} is not supported by the embedded "
                    f"engine server; leave it at {default!r} or use an SGLang server"
                )
        for name in _ACCEPTED_NOOP:
            raw.pop(name, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RequestError(
                f"unknown sampling_params field(s) {unknown}; known fields: {sorted(known)}"
            )

        def get(name: str, default: Any) -> Any:
            value = raw.get(name)
            return default if value is None else value

        max_new = raw.get("max_new_tokens", 128)
        max_new = None if max_new is None else _as_int(max_new, "max_new_tokens")
        temperature = _as_float(get("temperature", 1.0), "temperature")
        top_p = _as_float(get("top_p", 1.0), "top_p")
        top_k = _as_int(get("top_k", -1), "top_k")
        min_p = _as_float(get("min_p", 0.0), "min_p")
        n = _as_int(get("n", 1), "n")
        seed = raw.get("sampling_seed")
        seed = None if seed is None else _as_int(seed, "sampling_seed")
        stop = raw.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestError(
                f"sampling_params.stop must be a string or a list of strings, got {_short(stop)}"
            )
        stop_ids = raw.get("stop_token_ids") or ()
        if not isinstance(stop_ids, (list, tuple, set)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
        ):
            raise RequestError(
                f"sampling_params.stop_token_ids must be a list of integers, got {_short(stop_ids)}"
            )
        flags = {}
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
            default = name == "skip_special_tokens"
            value = get(name, default)
            if not isinstance(value, bool):
                raise RequestError(
                    f"sampling_params.{name} must be true or false, got {_short(value)}"
                )
            flags[name] = value
        return cls(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            stop=tuple(stop),
            stop_token_ids=frozenset(int(t) for t in stop_ids),
            n=n,
            sampling_seed=seed,
            **flags,
        )


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages stay short)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(value: Any, name: str) -> int:
    """An integral JSON number (``2.0`` is accepted, as SGLang does; booleans are not)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise RequestError(f"sampling_params.{name} must be an integer, got {_short(value)}")
    return int(value)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"sampling_params.{name} must be a number, got {_short(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond the float range
        raise RequestError(f"sampling_params.{name} is out of range, got {_short(value)}") from None


@dataclasses.dataclass(frozen=True)
class SessionParams:
    """SGLang's ``GenerateReqInput.session_params`` (``srt/managers/io_struct.py``).

    ``id`` names an open session. ``rid`` is the earlier request of that session to continue:
    the new request's tokens are that request's prompt + its output tokens + ``input_ids``
    (``offset``: that context cut to its first ``offset`` tokens before appending;
    ``drop_previous_output``: its prompt only). ``rid`` None starts a fresh branch in the
    session. ``replace`` first discards the requests that continued ``rid`` (all of the
    session's requests when ``rid`` is None).
    """

    id: str
    rid: str | None = None
    offset: int | None = None
    replace: bool | None = None
    drop_previous_output: bool | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SessionParams:
        """Validate a ``session_params`` dict; raise ``RequestError`` naming the field."""
        if not isinstance(raw, dict):
            raise RequestError(f"session_params must be an object, got {raw!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RequestError(f"unknown session_params field(s) {unknown}; known: {sorted(known)}")
        sid = raw.get("id")
        if not isinstance(sid, str) or not sid:
            raise RequestError(f"session_params.id must be a session id string, got {sid!r}")
        rid, offset = raw.get("rid"), raw.get("offset")
        if rid is not None and not isinstance(rid, str):
            raise RequestError(f"session_params.rid must be a string or null, got {rid!r}")
        if offset is not None and (
            isinstance(offset, bool) or not isinstance(offset, int) or offset < 0
        ):
            raise RequestError(f"session_params.offset must be an integer >= 0, got {offset!r}")
        flags = {}
        for name in ("replace", "drop_previous_output"):
            value = raw.get(name)
            if value is not None and not isinstance(value, bool):
                raise RequestError(f"session_params.{name} must be true, false or null")
            flags[name] = value
        return cls(id=sid, rid=rid, offset=offset, **flags)


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to generate (SGLang expands ``n`` and batches into these).

    ``logprob_start_len`` -1 means only the last prompt position (SGLang's default).
    ``copy_index`` tells apart the parallel samples of one prompt (seed derivation).
    ``session``: continue a session's earlier request (see ``SessionParams``); positions
    ``logprob_start_len`` and ``routed_experts_start_len`` then count from the start of the
    whole context (earlier turns included), as in SGLang.
    """

    input_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    rid: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    copy_index: int = 0
    session: SessionParams | None = None


LogprobEntry = tuple[float | None, int]


@dataclasses.dataclass
class Output:
    """The result of one ``Request``, the fields SGLang puts in a ``/generate`` response.

    Log-prob lists hold ``(logprob, token_id)`` pairs; the server adds the text slot.
    ``input_token_logprobs`` covers prompt positions ``logprob_start_len..P-1`` with ``None``
    first (SGLang pads the first one). ``routed_experts`` is int32 [T, L, k] for rows
    ``routed_experts_start_len..P+N-2`` (every token the model ran forward on).
    For a session request ``P`` is the whole context (earlier turns + this request's tokens),
    ``output_ids`` only this turn's tokens, and ``cached_tokens`` the context positions whose
    keys/values (and routes) came from the session instead of a forward.
    """

    rid: str
    prompt_tokens: int
    output_ids: list[int]
    text: str
    finish_reason: dict[str, Any]
    weight_version: str
    e2e_latency: float
    input_token_logprobs: list[LogprobEntry] | None = None
    output_token_logprobs: list[LogprobEntry] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    output_top_logprobs: list[list[LogprobEntry]] | None = None
    routed_experts: np.ndarray | None = None
    cached_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What the served model allows a request (the engine builds it once at load)."""

    vocab_size: int
    context_len: int
    routes_enabled: bool  # the server flag --enable-return-routed-experts
    is_moe: bool  # the model has an MoE router to record
    model_name: str  # the model's class name, for messages


def _out_of_vocab(ids: Iterable[Any], vocab_size: int) -> list[Any]:
    return [
        t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
    ]


def _check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = _out_of_vocab(ids, vocab_size)
    if bad:
        shown = _short(list(ids)) if len(ids) <= 16 else f"(of {len(ids)} tokens)"
        raise RequestError(
            f"The input_ids {shown} contains values greater than the vocab size "
            f"({vocab_size}) or negative values: {_short(bad[:8])}."
        )


def _check_sampling(sampling: SamplingParams, limits: RequestLimits) -> None:
    """What ``SamplingParams`` cannot check alone: token ids against the vocabulary."""
    bad = _out_of_vocab(sampling.stop_token_ids, limits.vocab_size)
    if bad:
        raise RequestError(
            f"sampling_params.stop_token_ids must be token ids in [0, {limits.vocab_size}), "
            f"got {_short(sorted(bad)[:8])}"
        )


def validate(req: Request, limits: RequestLimits, context: Sequence[int] | None = None) -> None:
    """Raise ``RequestError`` (SGLang's wording) if the request cannot run.

    ``context``: a session request's whole token context (default: ``req.input_ids``).
    """
    ids = req.input_ids if context is None else context
    if len(ids) == 0:
        raise RequestError(
            "input_ids cannot be empty."
            if req.session is None
            else "A session request must contain input tokens after restoring history."
        )
    n_in, context_len = len(ids), limits.context_len
    if n_in >= context_len:
        raise RequestError(
            f"The input ({n_in} tokens) is longer than the model's context length "
            f"({context_len} tokens)."
        )
    _check_token_ids(ids, limits.vocab_size)
    _check_sampling(req.sampling, limits)
    max_new = req.sampling.max_new_tokens
    if max_new is not None and max_new + n_in >= context_len:
        raise RequestError(
            f"Requested token count exceeds the model's maximum context length of "
            f"{context_len} tokens. You requested a total of {max_new + n_in} tokens: "
            f"{n_in} tokens from the input messages and {max_new} tokens for the "
            f"completion. Please reduce the number of tokens in the input messages or the "
            f"completion to fit within the limit."
        )
    if req.logprob_start_len < -1:
        raise RequestError(f"logprob_start_len must be -1 or >= 0, got {req.logprob_start_len}")
    if req.return_logprob and req.logprob_start_len >= n_in:
        raise RequestError(
            f"logprob_start_len ({req.logprob_start_len}) is higher than the number of input "
            f"tokens ({n_in}). Please use a smaller logprob_start_len."
        )
    if req.top_logprobs_num < 0:
        raise RequestError(f"top_logprobs_num must be >= 0, got {req.top_logprobs_num}")
    if req.return_routed_experts:
        if not limits.routes_enabled:
            raise RequestError(
                "return_routed_experts requires the server flag --enable-return-routed-experts"
            )
        if not limits.is_moe:
            raise RequestError(f"return_routed_experts: {limits.model_name} has no MoE router")
        if not 0 <= req.routed_experts_start_len <= n_in:
            raise RequestError(
                f"routed_experts_start_len={req.routed_experts_start_len} must be in [0, "
                f"prompt_tokens] = [0, {n_in}]."
            )


def check_submitted(req: Request, limits: RequestLimits) -> None:
    """The checks ``Engine.submit`` runs on the caller's thread.

    A session request is validated whole only once the engine thread has assembled its
    context (the turn it continues may still be finishing when it is submitted).
    """
    if req.session is None:
        validate(req, limits)
    elif req.sampling.n != 1 or req.copy_index != 0:
        raise RequestError("a session request generates one sequence: use n=1")
    else:
        _check_token_ids(req.input_ids, limits.vocab_size)
        _check_sampling(req.sampling, limits)
