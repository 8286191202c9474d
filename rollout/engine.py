"""The embedded inference engine: continuous batching over a transformers causal LM.

This is the compute behind ``python -m rollout.server`` (SGLang's HTTP protocol). It runs any
local Hugging Face decoder-only model through transformers, MoE included, on CPU or one GPU.

Scheduling (what SGLang's scheduler does, in miniature). One background thread loops:
  1. take new requests, aborts and control calls (weight reload, flush, memory release)
     from a thread-safe queue; control calls run here, between two forward passes;
  2. admit waiting requests while fewer than ``max_running_requests`` run, and prefill them
     together in one right-padded forward;
  3. run one decode step for every running sequence in one batched forward;
  4. retire finished sequences at once, so a long response never holds up a short one.

KV cache. ``SlotKVCache`` is a ``transformers.Cache`` whose layers keep one row (a "slot")
per running sequence in preallocated buffers: ``[S, H_kv, capacity, D]`` for full-attention
layers, a ring ``[S, H_kv, W, D]`` (position p at slot ``p % W``) for sliding-window layers of
window W. Running sequences occupy rows ``0..B-1`` (a retired row is filled by moving the last
one in), so a decode step writes one position per row and reads a plain slice with no copy.
Prefill rows start empty, so attention reads the forward's own keys, and only the last W keys
of each row go into a ring. Sequences of different lengths share a step through an explicit
4-d additive attention mask built from each row's position, per layer type: keys ``0..pos``
for full-attention layers, the ring slots written so far for sliding layers (transformers'
convention: key j is visible from query i iff ``i - window < j <= i``; a ring holds exactly
those keys). MiMo-V2-Flash's sink logits (added inside attention) therefore see exactly the
keys a plain full forward shows them. For the model types listed in
``_GROUPED_ATTENTION_MODELS`` attention runs ``grouped_eager_attention`` (eager attention per
KV head, without copying the cache once per query head). Tests hold every step to a plain
forward of the same tokens.

Sessions (SGLang's ``/open_session`` + ``session_params``, ``srt/session/session_controller.py``).
A request with ``session=SessionParams(id, rid)`` continues request ``rid`` of an open session:
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
values of requests in flight: the next turn continues on the cache its earlier turns built. A turn that needs what a snapshot lacks (input
log-probs or routes of cached positions), or branches off an older turn, is prefilled whole.

Per-step state stays on tensors: each slot's last token, position, generated tokens,
log-probs and routed experts live in ``_SlotState`` rows that move with the KV rows; Python
work per step is constant plus the rows that finish (finishing by length is known in advance)
or need host-side checks (stop strings, top log-probs). Per-row sampling settings are turned
into tensors once per change of the running set.

Log-probs (matching SGLang's defaults, ``srt/layers/sampler.py`` and the logits processor):
  * output tokens: log-probs under the temperature-scaled distribution ``softmax(z / T)``,
    before top-k/top-p/min-p truncation; greedy requests (temperature 0) report the raw
    ``log_softmax(z)``. With ``return_original_logprob=True`` (SGLang's env var
    ``SGLANG_RETURN_ORIGINAL_LOGPROB``) every output log-prob is the raw ``log_softmax(z)``.
  * input (prompt) tokens: always the raw ``log_softmax(z)``, never temperature-scaled. This
    is what teacher scoring reads (prefill-only: ``max_new_tokens=0``).

Sampling draws one uniform ``u`` per row and token and takes the first token whose running
probability sum exceeds ``u`` (inverse CDF over the vocabulary in id order, after the row's own
truncation), which samples exactly from ``p``. A request with ``sampling_seed`` draws its
``u`` from its own ``torch.Generator`` (seeded from the seed and the index of the parallel
sample, so ``n`` copies differ): its tokens do not depend on what else shares its batch, so
the same request and seed give the same tokens alone or in a crowd. Unseeded requests draw
from the engine's generator (``random_seed``), one call for the whole batch.

Shape legend:
    B   sequences in a forward (rows of the batch)
    Q   query positions per row in a forward
    S   KV slots (max running sequences); R rows moved at once
    K   key positions read for a row in this forward (ring slots for sliding layers)
    T   positions kept per slot; N picked positions; M stop token ids per row
    H   hidden size (in attention: query heads; H_kv key/value heads); D head dim
    V   vocabulary; L decoder layers; k experts per token
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from rollout.routing_capture import RoutingCapture

__all__ = [
    "Engine",
    "EngineConfig",
    "Output",
    "Request",
    "RequestError",
    "SamplingParams",
    "SessionParams",
    "SlotKVCache",
]

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-6
TOP_K_ALL = 1 << 30


class RequestError(ValueError):
    """The request is invalid (the HTTP layer answers 400 with this message)."""


# ---------------------------------------------------------------------------------------------
# Requests and outputs
# ---------------------------------------------------------------------------------------------

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

    ``temperature`` 0 means greedy. ``top_k`` -1 (or absent) means the whole vocabulary.
    ``sampling_seed`` is SGLang's per-request seed; ``seed`` is accepted as an alias.
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
                    f"sampling_params.{name}={value!r} is not supported by the embedded engine "
                    f"server; leave it at {default!r} or use an SGLang server"
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

        try:
            max_new = raw.get("max_new_tokens", 128)
            max_new = None if max_new is None else _as_int(max_new, "max_new_tokens")
            temperature = float(get("temperature", 1.0))
            top_p = float(get("top_p", 1.0))
            top_k = _as_int(get("top_k", -1), "top_k")
            min_p = float(get("min_p", 0.0))
            n = _as_int(get("n", 1), "n")
            seed = raw.get("sampling_seed")
            seed = None if seed is None else _as_int(seed, "sampling_seed")
        except (TypeError, ValueError) as exc:
            raise RequestError(f"invalid sampling_params: {exc}") from exc
        stop = raw.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestError(
                f"sampling_params.stop must be a string or a list of strings, got {stop!r}"
            )
        stop_ids = raw.get("stop_token_ids") or ()
        if not isinstance(stop_ids, (list, tuple, set)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
        ):
            raise RequestError(
                f"sampling_params.stop_token_ids must be a list of integers, got {stop_ids!r}"
            )
        flags = {}
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
            default = name == "skip_special_tokens"
            value = get(name, default)
            if not isinstance(value, bool):
                raise RequestError(f"sampling_params.{name} must be true or false, got {value!r}")
            flags[name] = value

        if not math.isfinite(temperature) or temperature < 0.0:
            raise RequestError(
                f"temperature must be a non-negative finite number, got {temperature}."
            )
        if 0.0 <= temperature < _SAMPLING_EPS:  # greedy, as SGLang normalises it
            temperature, top_k = 1.0, 1
        if top_k == -1:
            top_k = TOP_K_ALL
        if not 0.0 < top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}.")
        if not 0.0 <= min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {min_p}.")
        if top_k < 1:
            raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        if max_new is not None and max_new < 0:
            raise RequestError(f"max_new_tokens must be at least 0, got {max_new}.")
        if n < 1:
            raise RequestError(f"n must be at least 1, got {n}.")
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


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


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


# ---------------------------------------------------------------------------------------------
# KV cache with one row per running sequence
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _StepPlan:
    """Where one forward writes its keys/values and what attention reads back.

    Prefill (``prefill=True``): rows ``row0..row0+B-1`` start empty and run positions
    ``0..Q-1``, so attention reads this forward's own keys; full-attention layers store all
    of them, sliding layers only the last ``window`` of each row (``keep_*``). Decode: rows
    ``0..B-1`` run one position each (``pos_B``); full-attention layers read ``kv_len`` key
    positions, sliding layers ``ring_len`` ring slots.
    """

    prefill: bool
    row0: int = 0
    rows_B: torch.Tensor | None = None  # decode: 0..B-1
    pos_B: torch.Tensor | None = None  # decode: the position each row writes
    ring_B: torch.Tensor | None = None  # decode: the ring slot each row writes (pos % window)
    kv_len: int = 0
    ring_len: int = 0
    keep_rows_N: torch.Tensor | None = None  # prefill: slot row of each key a ring keeps
    keep_b_N: torch.Tensor | None = None  # prefill: its batch row in this forward
    keep_q_N: torch.Tensor | None = None  # prefill: its position
    keep_slot_N: torch.Tensor | None = None  # prefill: its ring slot
    # Extend (``extend=True``, a prefill whose rows already hold a cached prefix, restored
    # from a session): row b runs positions ``start_b..start_b+Q-1``. Full-attention layers
    # write the real new keys (``ext_*``) at their positions and read ``kv_len`` positions;
    # sliding layers read the ring as it was plus this forward's keys (``W + Q`` keys), then
    # keep the last ``window`` new keys of each row (``keep_*``).
    extend: bool = False
    ext_rows_N: torch.Tensor | None = None  # slot row of each new key
    ext_b_N: torch.Tensor | None = None  # its batch row in this forward
    ext_q_N: torch.Tensor | None = None  # its query index in this forward
    ext_pos_N: torch.Tensor | None = None  # its position


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's keys/values, lazily allocated.

    Full attention: ``[S, H_kv, capacity, D]``, key position p at index p. Sliding window
    ``W``: a ring ``[S, H_kv, W, D]``, key position p at slot ``p % W``; a decode query at
    position i needs keys ``i-W+1..i``, exactly what the ring holds once i is written.
    """

    is_sliding = False

    def __init__(self, owner: SlotKVCache, window: int | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.window = window
        self.is_sliding = window is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots = self.owner.num_slots
        length = self.window if self.window is not None else self.owner.capacity
        self.device = key_states.device
        self.keys = key_states.new_zeros((slots, key_states.shape[1], length, key_states.shape[3]))
        self.values = value_states.new_zeros(
            (slots, value_states.shape[1], length, value_states.shape[3])
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        keys_BHQD = key_states.to(self.keys.dtype)
        values_BHQD = value_states.to(self.values.dtype)
        if plan.extend:
            rows = slice(plan.row0, plan.row0 + key_states.shape[0])
            if self.window is None:
                where = (plan.ext_rows_N, slice(None), plan.ext_pos_N)
                self.keys[where] = keys_BHQD[plan.ext_b_N, :, plan.ext_q_N]
                self.values[where] = values_BHQD[plan.ext_b_N, :, plan.ext_q_N]
                return self.keys[rows, :, : plan.kv_len], self.values[rows, :, : plan.kv_len]
            # The ring's old keys are read before the new ones overwrite any slot.
            keys = torch.cat([self.keys[rows], keys_BHQD], dim=2)
            values = torch.cat([self.values[rows], values_BHQD], dim=2)
            self.keys[plan.keep_rows_N, :, plan.keep_slot_N] = keys_BHQD[
                plan.keep_b_N, :, plan.keep_q_N
            ]
            self.values[plan.keep_rows_N, :, plan.keep_slot_N] = values_BHQD[
                plan.keep_b_N, :, plan.keep_q_N
            ]
            return keys, values
        if plan.prefill:
            batch, _, q_len, _ = key_states.shape
            if self.window is None:
                rows = slice(plan.row0, plan.row0 + batch)
                self.keys[rows, :, :q_len] = keys_BHQD
                self.values[rows, :, :q_len] = values_BHQD
            else:
                rows_N, slot_N = plan.keep_rows_N, plan.keep_slot_N
                self.keys[rows_N, :, slot_N] = keys_BHQD[plan.keep_b_N, :, plan.keep_q_N]
                self.values[rows_N, :, slot_N] = values_BHQD[plan.keep_b_N, :, plan.keep_q_N]
            return key_states, value_states
        batch = key_states.shape[0]
        where_B = plan.pos_B if self.window is None else plan.ring_B
        self.keys[plan.rows_B, :, where_B] = keys_BHQD[:, :, 0]
        self.values[plan.rows_B, :, where_B] = values_BHQD[:, :, 0]
        length = plan.kv_len if self.window is None else plan.ring_len
        return self.keys[:batch, :, :length], self.values[:batch, :, :length]

    def grow(self, capacity: int) -> None:
        if not self.is_initialized or self.window is not None:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def move_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor, length: int) -> None:
        if self.is_initialized:
            used = slice(None) if self.window is not None else slice(0, length)
            self.keys[dst_R, :, used] = self.keys[src_R, :, used]
            self.values[dst_R, :, used] = self.values[src_R, :, used]

    def snapshot(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of row ``row``'s keys/values: positions ``0..length-1`` (full attention)
        or the whole ring (sliding window)."""
        used = slice(None) if self.window is not None else slice(0, length)
        return self.keys[row, :, used].clone(), self.values[row, :, used].clone()

    def restore(self, row: int, keys_HKD: torch.Tensor, values_HKD: torch.Tensor) -> None:
        self.keys[row, :, : keys_HKD.shape[1]] = keys_HKD
        self.values[row, :, : values_HKD.shape[1]] = values_HKD

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan = self.owner.plan
        if plan.extend:
            return (plan.kv_len if self.window is None else self.window + query_length), 0
        if plan.prefill:
            return query_length, 0
        return (plan.kv_len if self.window is None else plan.ring_len), 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row; the engine always passes position_ids

    def get_max_length(self) -> int:
        return self.window if self.window is not None else self.owner.capacity


class SlotKVCache(Cache):
    """A ``transformers.Cache`` holding one KV row per running sequence (see module doc).

    ``windows[i]`` is layer i's sliding window (``None``: full attention).
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int = 256,
        windows: Sequence[int | None] | None = None,
    ) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.plan: _StepPlan | None = None
        windows = list(windows) if windows is not None else [None] * num_layers
        super().__init__(layers=[_SlotLayer(self, w) for w in windows])

    def ensure_capacity(self, needed: int, limit: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity), max(limit, needed))
        for layer in self.layers:
            layer.grow(new_cap)
        self.capacity = new_cap

    def move_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor, length: int) -> None:
        """Copy key positions ``0..length-1`` of rows ``src_R`` onto rows ``dst_R`` (disjoint)
        in every layer."""
        for layer in self.layers:
            layer.move_rows(src_R, dst_R, length)

    @property
    def allocated(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    def snapshot_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's keys/values of row ``row`` holding positions ``0..length-1``."""
        return [layer.snapshot(row, length) for layer in self.layers]

    def restore_row(self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write a ``snapshot_row`` back into row ``row`` (of any slot)."""
        for layer, (keys_HKD, values_HKD) in zip(self.layers, layers, strict=True):
            layer.restore(row, keys_HKD, values_HKD)

    def drop_buffers(self) -> None:
        """Free every buffer (re-allocated lazily on the next forward)."""
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False


# ---------------------------------------------------------------------------------------------
# Grouped-query attention without repeated keys
# ---------------------------------------------------------------------------------------------

GROUPED_ATTENTION = "mopd_grouped_eager"

# Model types whose eager attention is exactly softmax(q k^T * scaling + mask [+ sink column]) v
# with keys/values shared by groups of query heads (transformers' ``repeat_kv`` convention).
_GROUPED_ATTENTION_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral", "mimo_v2_flash"}
)


def grouped_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, computed per KV head instead of per query head.

    Eager attention copies every key and value once per query head of a group
    (``repeat_kv``), then runs one tiny matmul per head; at decode that copy of the whole
    cache dominates the step. Folding the G query heads of a group into the query axis reads
    the cache slice in place: q ``[B, H_kv, G*Q, D]`` @ k^T ``[B, H_kv, D, K]``. The sums are
    the same as eager's (floats agree to ~1e-7). MiMo-V2-Flash's attention sinks (one logit
    per head, ``module.sinks``) join the softmax as an extra column and are dropped after it,
    as its eager attention does. Registered with ``AttentionInterface`` under
    ``GROUPED_ATTENTION``; shapes: query [B, H, Q, D], key [B, H_kv, K, D], value
    [B, H_kv, K, Dv]; returns output [B, Q, H, Dv] and probabilities [B, H, Q, K].
    """
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q_grouped = query.reshape(batch, kv_heads, group * q_len, query.shape[3])
    scores_BHQK = torch.matmul(q_grouped, key.transpose(2, 3)).view(batch, heads, q_len, k_len)
    scores_BHQK = scores_BHQK * scaling
    if attention_mask is not None:
        scores_BHQK = scores_BHQK + attention_mask[:, :, :, :k_len]
    sinks = getattr(module, "sinks", None)
    if sinks is not None:
        sink_BHQ1 = sinks.reshape(1, -1, 1, 1).expand(batch, -1, q_len, -1)
        scores_BHQK = torch.cat([scores_BHQK, sink_BHQ1.to(scores_BHQK.dtype)], dim=-1)
    probs_BHQK = torch.softmax(scores_BHQK, dim=-1, dtype=torch.float32).to(value.dtype)
    if sinks is not None:
        probs_BHQK = probs_BHQK[..., :-1]
    if dropout and module.training:
        probs_BHQK = torch.nn.functional.dropout(probs_BHQK, p=dropout, training=True)
    out = torch.matmul(probs_BHQK.reshape(batch, kv_heads, group * q_len, k_len), value)
    out_BQHD = out.view(batch, heads, q_len, value.shape[3]).transpose(1, 2).contiguous()
    return out_BQHD, probs_BHQK


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How to build an engine (the server maps SGLang launch flags onto it)."""

    model_path: str
    tokenizer_path: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    max_running_requests: int = 64
    max_prefill_tokens: int = 8192
    context_length: int | None = None
    enable_return_routed_experts: bool = False
    random_seed: int = 0
    weight_version: str = "default"
    return_original_logprob: bool = False
    max_sessions: int = 256  # open sessions at most (each may hold one turn's KV cache)
    session_timeout_s: float | None = 600.0  # idle time before a session is closed, when
    # ``open_session`` names no timeout (None: sessions live until closed)


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclasses.dataclass
class _KVSnapshot:
    """A finished session turn kept for the next one: the keys/values of context positions
    ``0..length-1`` (``tokens[:length]``; the last generated token was never run forward),
    per layer ``[H_kv, length or W, D]`` on the engine's device, and the routes recorded for
    those positions (int32 ``[length, L, k]``; None when the turn did not record routes)."""

    tokens: list[int]
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    routes_TLk: torch.Tensor | None


class _Session:
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
        self.snapshot: _KVSnapshot | None = None
        self.closed = False

    def drop(self, rid: str) -> None:
        """Forget ``rid`` and every request that continued it."""
        for child in self.children.pop(rid, []):
            self.drop(child)
        self.tokens.pop(rid, None)
        self.prompt_lens.pop(rid, None)


class _Seq:
    """Scheduler state of one request (owned by the engine thread).

    While it runs, its tokens, log-probs and routes live in the engine's slot tensors (row
    ``slot``); they are copied out into ``out_ids`` / ``out_lp`` when it finishes.
    """

    def __init__(
        self, req: Request, future: Future, limit: int, gen: torch.Generator | None
    ) -> None:
        self.req = req
        self.future = future
        self.prompt = list(req.input_ids)
        self.limit = limit  # most tokens it may generate (max_new_tokens or the context)
        self.gen = gen  # its own generator when seeded; None draws from the engine's
        self.out_ids: list[int] = []
        self.out_lp: list[LogprobEntry] = []
        self.out_top: list[list[LogprobEntry]] = []
        self.in_lp: list[LogprobEntry] | None = None
        self.in_top: list[list[LogprobEntry] | None] | None = None
        self.text_ids: list[int] = []  # only kept for stop-string matching
        self.stop_tail = 0  # tokens of the longest stop string
        self.routes_TLk: torch.Tensor | None = None
        self.slot = -1
        self.finish: dict[str, Any] | None = None
        self.t0 = time.perf_counter()
        self.session: _Session | None = None  # set when the request continues a session
        self.cached = 0  # context positions restored from the session's snapshot
        self.snapshot: _KVSnapshot | None = None  # what to restore (cached > 0)


@dataclasses.dataclass
class _BatchParams:
    """Sampling and stop settings of consecutive running rows, as tensors (rebuilt only when
    the running set changes). ``None`` fields mean "no row needs this"."""

    temp_B: torch.Tensor | None  # None: every temperature is 1
    greedy_B: torch.Tensor | None  # None: no row is greedy
    all_greedy: bool
    trunc: tuple[torch.Tensor, ...] | None  # rows that truncate, top_k_B, top_p_B, min_p_B
    seeded_rows: torch.Tensor | None  # rows (in the batch) that draw from their own generator
    seeded_gens: list[torch.Generator]
    stop_BM: torch.Tensor | None  # token ids that stop each row (EOS, stop_token_ids), -1 pad
    text_rows: list[tuple[int, _Seq]]  # rows with stop strings
    top_rows: list[tuple[int, _Seq]]  # rows asking for top log-probs
    routes: bool  # some row asked for routed experts


class _SlotState:
    """Per-slot tensors that change every step; rows move together with the KV cache rows.

    ``tok_S`` last token (the next decode input), ``pos_S`` tokens cached (the next position),
    ``nout_S`` tokens generated; ``out_ST`` / ``lp_ST`` the generated tokens and their
    log-probs; ``routes_STLk`` the routed experts of every position run (allocated on first
    use).
    """

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.device = device
        self.tok_S = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.pos_S = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.nout_S = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.out_ST = torch.zeros((num_slots, 0), dtype=torch.long, device=device)
        self.lp_ST = torch.zeros((num_slots, 0), dtype=torch.float32, device=device)
        self.routes_STLk: torch.Tensor | None = None

    @staticmethod
    def _grown(old: torch.Tensor, length: int) -> torch.Tensor:
        new = old.new_zeros((old.shape[0], length, *old.shape[2:]))
        new[:, : old.shape[1]] = old
        return new

    def ensure_outputs(self, length: int, limit: int) -> None:
        if length > self.out_ST.shape[1]:
            length = min(max(length, 2 * self.out_ST.shape[1]), max(limit, length))
            self.out_ST = self._grown(self.out_ST, length)
            self.lp_ST = self._grown(self.lp_ST, length)

    def ensure_routes(self, length: int, limit: int, layers: int, top_k: int) -> None:
        if self.routes_STLk is None:
            self.routes_STLk = torch.zeros(
                (self.tok_S.shape[0], 0, layers, top_k), dtype=torch.int32, device=self.device
            )
        if length > self.routes_STLk.shape[1]:
            length = min(max(length, 2 * self.routes_STLk.shape[1]), max(limit, length))
            self.routes_STLk = self._grown(self.routes_STLk, length)

    def drop_buffers(self) -> None:
        """Free the per-position buffers (only while nothing runs; they grow back on use)."""
        self.out_ST = self.out_ST[:, :0].clone()
        self.lp_ST = self.lp_ST[:, :0].clone()
        self.routes_STLk = None

    def move_rows(self, src_R: torch.Tensor, dst_R: torch.Tensor) -> None:
        for name in ("tok_S", "pos_S", "nout_S", "out_ST", "lp_ST", "routes_STLk"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor[dst_R] = tensor[src_R]


class Engine:
    """Continuous-batching generation over a transformers model (see module docstring).

    Thread-safe entry points: ``submit``, ``generate``, ``abort``, ``call`` (and the
    weight/memory helpers built on it). Everything touching the model runs on the engine's
    own thread, started by ``start()``.
    """

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = torch.device(config.device)
        self.model_path = str(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path or config.model_path)
        dtype = "auto" if config.dtype == "auto" else _DTYPES.get(config.dtype)
        if dtype is None:
            raise ValueError(f"unknown dtype {config.dtype!r}; use one of auto, {sorted(_DTYPES)}")
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype)
        self.model.to(self.device).eval()
        if getattr(self.model.config, "model_type", None) in _GROUPED_ATTENTION_MODELS:
            AttentionInterface.register(GROUPED_ATTENTION, grouped_eager_attention)
            self.model.set_attn_implementation(GROUPED_ATTENTION)
        self.dtype = next(self.model.parameters()).dtype
        self.hf_config = self.model.config
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.vocab_size = int(self.hf_config.vocab_size)
        self.num_layers = int(self.hf_config.num_hidden_layers)
        max_pos = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        self.context_len = int(config.context_length or max_pos)
        self.capture = RoutingCapture(self.model)
        self.eos_ids = self._eos_ids()
        self._mask_layout = self._attention_layout()
        windows = self._layer_windows()
        rings = {w for w in windows if w is not None}
        if len(rings) > 1:
            raise ValueError(
                f"layers with different sliding windows {sorted(rings)} are not supported"
            )
        self._ring_window = rings.pop() if rings else None
        self.cache = SlotKVCache(self.num_layers, config.max_running_requests, windows=windows)
        self.weight_version = str(config.weight_version)
        # Unseeded requests draw from one engine generator (one call per step for the batch).
        self._gen = torch.Generator(device=self.device).manual_seed(config.random_seed)
        self._state = _SlotState(config.max_running_requests, self.device)
        self._arange = torch.arange(max(self.context_len, config.max_running_requests) + 1)
        self._arange = self._arange.to(self.device)
        self._mask_zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._mask_neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype)
        self._mask_neg = self._mask_neg.to(self.device)
        self._params: _BatchParams | None = None  # of the running rows; None when stale
        self._due: dict[int, list[_Seq]] = {}  # decode step -> sequences reaching their limit
        self._steps = 0  # decode steps run
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._memory_released = False
        self._paused = False
        self.num_generated_tokens = 0
        self._sessions: dict[str, _Session] = {}
        self._last_reap = time.monotonic()
        # Scheduling counters: tests and /get_server_info read them. ``prefill_tokens``
        # counts positions run by prefill forwards (padding excluded), ``cached_tokens``
        # positions restored from session snapshots instead.
        self.stats = {
            "prefill_batches": 0,
            "decode_steps": 0,
            "peak_running": 0,
            "prefill_tokens": 0,
            "cached_tokens": 0,
        }

    # -- model facts ----------------------------------------------------------------------------

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        sources = [self.hf_config.eos_token_id, self.tokenizer.eos_token_id]
        gen_config = getattr(self.model, "generation_config", None)
        if gen_config is not None:
            sources.append(gen_config.eos_token_id)
        for src in sources:
            if src is None:
                continue
            ids.update([src] if isinstance(src, int) else list(src))
        return frozenset(int(i) for i in ids)

    def _attention_layout(self) -> tuple[bool, dict[str, int | None]]:
        """(pass a per-layer-type dict?, window per layer type) for the explicit masks."""
        cfg = self.hf_config
        layer_types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if layer_types and len(set(layer_types)) > 1:
            return True, {
                t: (window if t == "sliding_attention" else None) for t in set(layer_types)
            }
        if layer_types:
            only = layer_types[0]
            return False, {"": window if only == "sliding_attention" else None}
        return False, {"": window}

    def _layer_windows(self) -> list[int | None]:
        """Each layer's KV ring size: its sliding window, or None (full attention).

        A window that is not shorter than the context restricts nothing: such a layer keeps
        every key, as a full-attention layer does.
        """
        per_dict, windows = self._mask_layout
        types = getattr(self.hf_config, "layer_types", None) if per_dict else None
        ring = []
        for i in range(self.num_layers):
            window = windows[types[i]] if types else windows[""]
            ring.append(window if window is not None and window < self.context_len else None)
        return ring

    @property
    def top_k_experts(self) -> int:
        return self.capture.top_k

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.config.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "model_type": getattr(self.hf_config, "model_type", None),
            "architectures": getattr(self.hf_config, "architectures", None),
        }

    # -- thread and requests --------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            # The model, tokenizer and imported modules live as long as the process: move them
            # out of the collector's reach, or every full collection rescans them (tens of ms
            # per step it lands on). SGLang's freeze_gc and vLLM's freeze_gc_heap do the same.
            gc.collect()
            gc.freeze()
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            # Frozen objects are never collected: hand them back, or a cycle through this
            # engine's model (e.g. its routing hooks) would keep the whole model alive.
            gc.unfreeze()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def validate(self, req: Request, context: Sequence[int] | None = None) -> None:
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
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in ids):
            raise RequestError(
                f"The input_ids {list(ids)} contains values greater than the vocab size "
                f"({self.vocab_size}) or negative values."
            )
        n_in = len(ids)
        if n_in >= self.context_len:
            raise RequestError(
                f"The input ({n_in} tokens) is longer than the model's context length "
                f"({self.context_len} tokens)."
            )
        max_new = req.sampling.max_new_tokens
        if max_new is not None and max_new + n_in >= self.context_len:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.context_len} tokens. You requested a total of {max_new + n_in} tokens: "
                f"{n_in} tokens from the input messages and {max_new} tokens for the "
                f"completion. Please reduce the number of tokens in the input messages or the "
                f"completion to fit within the limit."
            )
        if req.return_logprob and req.logprob_start_len >= n_in:
            raise RequestError(
                f"logprob_start_len ({req.logprob_start_len}) is higher than the number of input "
                f"tokens ({n_in}). Please use a smaller logprob_start_len."
            )
        if req.logprob_start_len < -1:
            raise RequestError(f"logprob_start_len must be -1 or >= 0, got {req.logprob_start_len}")
        if req.top_logprobs_num < 0:
            raise RequestError(f"top_logprobs_num must be >= 0, got {req.top_logprobs_num}")
        if req.return_routed_experts:
            if not self.config.enable_return_routed_experts:
                raise RequestError(
                    "return_routed_experts requires the server flag --enable-return-routed-experts"
                )
            if not self.capture.is_moe:
                raise RequestError(
                    f"return_routed_experts: {type(self.model).__name__} has no MoE router"
                )
            if not 0 <= req.routed_experts_start_len <= n_in:
                raise RequestError(
                    f"routed_experts_start_len={req.routed_experts_start_len} is higher than the "
                    f"number of input tokens {n_in} (must be in [0, prompt_tokens])."
                )

    def submit(self, req: Request) -> Future:
        """Queue a request; the future resolves to its ``Output`` (or raises RequestError).

        A session request is checked once the engine thread has assembled its context (the
        turn it continues may still be finishing when it is submitted).
        """
        if req.session is None:
            self.validate(req)
        elif req.sampling.n != 1 or req.copy_index != 0:
            raise RequestError("a session request generates one sequence: use n=1")
        elif any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in req.input_ids):
            raise RequestError(
                f"The input_ids {list(req.input_ids)} contains values greater than the vocab "
                f"size ({self.vocab_size}) or negative values."
            )
        seed = req.sampling.sampling_seed
        gen = None
        if seed is not None:
            seed = (seed * 1_000_003 + req.copy_index) % (2**63 - 1)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        limit = req.sampling.max_new_tokens
        if limit is None:
            limit = self.context_len - len(req.input_ids) - 1
        future: Future = Future()
        seq = _Seq(req, future, limit, gen)
        if req.sampling.stop:
            seq.stop_tail = max(
                len(self.tokenizer.encode(s, add_special_tokens=False)) for s in req.sampling.stop
            )
        self._commands.put(("submit", seq))
        return future

    def generate(self, reqs: Sequence[Request], timeout: float | None = None) -> list[Output]:
        """Submit requests together and wait for all of them (a convenience for tests/tools)."""
        futures = [self.submit(r) for r in reqs]
        return [f.result(timeout) for f in futures]

    def abort(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort requests whose rid starts with ``rid`` (SGLang matches by prefix)."""
        self._commands.put(("abort", rid, abort_all))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two forward passes; returns its future."""
        future: Future = Future()
        self._commands.put(("call", fn, future))
        if self._thread is None:  # not started: run inline (single-threaded use)
            self._drain()
        return future

    # -- sessions (SGLang's /open_session, /close_session, session_params) --------------------

    def open_session(
        self,
        session_id: str | None = None,
        capacity_of_str_len: int = 0,
        timeout: float | None = None,
        streaming: bool | None = None,
    ) -> str:
        """Open a session and return its id (a fresh uuid hex when ``session_id`` is None).

        Raises ``RequestError`` if the id is open already, if ``max_sessions`` are open, or
        for ``streaming`` sessions (not implemented here: continue a request by its rid).
        ``capacity_of_str_len`` is accepted for SGLang compatibility (SGLang ignores it too).
        ``timeout``: idle seconds before the engine closes the session (default
        ``EngineConfig.session_timeout_s``).
        """
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

        def run() -> str:
            if sid in self._sessions:
                raise RequestError(
                    f"Failed to open the session. Check if a session with the same id is "
                    f"still open: {sid!r}"
                )
            if len(self._sessions) >= self.config.max_sessions:
                raise RequestError(
                    f"cannot open session {sid!r}: {len(self._sessions)} sessions are open "
                    f"(max_sessions={self.config.max_sessions}); close finished sessions with "
                    "close_session or raise --max-sessions"
                )
            default = self.config.session_timeout_s
            self._sessions[sid] = _Session(sid, timeout if timeout is not None else default)
            return sid

        return self.call(run).result()

    def close_session(self, session_id: str) -> bool:
        """Close a session and free what it holds; False if no such session was open.

        A request of the session still running finishes normally (its KV cache is then
        dropped instead of kept); later requests naming the session are refused.
        """

        def run() -> bool:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return False
            session.closed = True
            session.snapshot = None
            return True

        return self.call(run).result()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def _reap_sessions(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < 1.0:
            return
        self._last_reap = now
        busy = {s.session.id for s in [*self._running, *self._waiting] if s.session is not None}
        for sid, session in list(self._sessions.items()):
            idle = now - session.last_active
            if session.timeout is not None and idle > session.timeout and sid not in busy:
                logger.info("session %s idle for %.0f s: closing it", sid, idle)
                self._sessions.pop(sid)
                session.closed = True
                session.snapshot = None

    def _resolve_session(self, seq: _Seq) -> None:
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
            if parent is None:
                for rid in list(session.children.get(None, [])):
                    session.drop(rid)
                session.children.pop(None, None)
            elif parent in session.tokens:
                for rid in session.children.pop(parent, []):
                    session.drop(rid)
        context = list(req.input_ids)
        if parent is not None:
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
            bos = self.tokenizer.bos_token_id
            new = context[1:] if context and bos is not None and context[0] == bos else context
            start = earlier
            if params.drop_previous_output:
                start = earlier[: session.prompt_lens[parent]]
            if params.offset:
                start = start[: params.offset]
            context = list(start) + new
        self.validate(req, context)
        seq.prompt = context
        if req.sampling.max_new_tokens is None:
            seq.limit = self.context_len - len(context) - 1
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

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- control operations (run on the engine thread via ``call``) -----------------------------

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None, abort_all: bool = False
    ) -> tuple[bool, str]:
        """Reload every weight from an HF checkpoint dir; running requests continue on it."""

        def run() -> tuple[bool, str]:
            from transformers import AutoModelForCausalLM

            if abort_all:
                self._abort_matching("", True)
            path = Path(model_path)
            if not path.is_dir():
                return False, f"model_path {model_path!r} is not a directory"
            try:
                fresh = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
            except Exception as exc:
                return False, f"Failed to load weights from {model_path}: {exc}"
            ok, msg = self._copy_weights(fresh.state_dict().items(), require_all=True)
            if not ok:
                return ok, msg
            self.model_path = str(path)
            if weight_version is not None:
                self.weight_version = str(weight_version)
            return True, "Succeeded to update model weights."

        return self.call(run).result()

    def update_weights_from_tensors(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        weight_version: str | None = None,
        abort_all: bool = False,
    ) -> tuple[bool, str]:
        """Overwrite the named parameters (model ``state_dict`` names) with the given tensors."""
        named = list(named_tensors)

        def run() -> tuple[bool, str]:
            if abort_all:
                self._abort_matching("", True)
            try:
                internal = self._to_state_dict_names(named)
            except ValueError as exc:
                return False, str(exc)
            ok, msg = self._copy_weights(internal, require_all=False)
            if ok and weight_version is not None:
                self.weight_version = str(weight_version)
            return ok, msg

        return self.call(run).result()

    def _to_state_dict_names(
        self, named: list[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        """Accept checkpoint (hub) names too, as SGLang does: convert them as loading would.

        transformers renames and fuses some checkpoint tensors at load time (e.g. per-expert
        MoE weights into one packed tensor). Tensors under checkpoint names are merged into
        the current weights in checkpoint naming and loaded back through ``from_pretrained``,
        which applies exactly the conversions a disk load applies.
        """
        state = self.model.state_dict()
        if all(name in state for name, _ in named):
            return named
        import tempfile

        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import (
            remove_tied_weights_from_state_dict,
            revert_weight_conversion,
        )

        hub = dict(
            revert_weight_conversion(
                self.model, remove_tied_weights_from_state_dict(dict(state), self.model)
            )
        )
        unknown = [name for name, _ in named if name not in hub and name not in state]
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown[:8]}{'...' if len(unknown) > 8 else ''}; "
                f"expected checkpoint names (e.g. {list(hub)[:3]}) or state_dict names"
            )
        merged = {name: t.detach().to("cpu").contiguous() for name, t in hub.items()}
        merged.update({n: t.detach().to("cpu").contiguous() for n, t in named if n in hub})
        with tempfile.TemporaryDirectory() as tmp:
            save_file(merged, f"{tmp}/model.safetensors", metadata={"format": "pt"})
            self.hf_config.save_pretrained(tmp)
            fresh = AutoModelForCausalLM.from_pretrained(tmp, dtype=self.dtype)
        converted = dict(fresh.state_dict())
        converted.update({n: t for n, t in named if n in state and n not in hub})
        return list(converted.items())

    def _copy_weights(
        self, named: Iterable[tuple[str, torch.Tensor]], require_all: bool
    ) -> tuple[bool, str]:
        state = self.model.state_dict()
        named = list(named)
        unknown = [n for n, _ in named if n not in state]
        if unknown:
            return False, (
                f"unknown parameter names {unknown[:8]}{'...' if len(unknown) > 8 else ''}; "
                f"expected names of the served model's state_dict, e.g. {list(state)[:3]}"
            )
        bad = [(n, tuple(t.shape)) for n, t in named if tuple(t.shape) != tuple(state[n].shape)]
        if bad:
            return (
                False,
                "shape mismatch (name, got, expected): "
                f"{[(n, shape, tuple(state[n].shape)) for n, shape in bad[:4]]}",
            )
        if require_all:
            missing = set(state) - {n for n, _ in named}
            if missing:
                return False, f"checkpoint lacks {sorted(missing)[:8]}"
        with torch.no_grad():
            for name, tensor in named:
                state[name].copy_(tensor.to(device=state[name].device, dtype=state[name].dtype))
        return True, "Succeeded to update model weights."

    def set_weight_version(self, version: str, abort_all: bool = True) -> None:
        def run() -> None:
            if abort_all:
                self._abort_matching("", True)
            self.weight_version = str(version)

        self.call(run).result()

    def flush_cache(self) -> bool:
        """SGLang flushes its prefix cache only when idle; we have none: succeed when idle."""
        return self.call(lambda: not self._running and not self._waiting).result()

    def release_memory(self) -> tuple[bool, str]:
        """Free the KV cache and move weights to host memory (a no-op on CPU)."""

        def run() -> tuple[bool, str]:
            if self._running or self._waiting:
                return False, "cannot release memory while requests are running"
            self.cache.drop_buffers()
            self._state.drop_buffers()
            for session in self._sessions.values():  # their next turns prefill again
                session.snapshot = None
            if self.device.type != "cpu":
                self.model.to("cpu")
                torch.cuda.empty_cache()
            self._memory_released = True
            return True, "released"

        return self.call(run).result()

    def pause(self, abort_all: bool = False) -> None:
        """Stop stepping (SGLang's /pause_generation); ``abort_all`` aborts everything first."""

        def run() -> None:
            if abort_all:
                self._abort_matching("", True)
            self._paused = True

        self.call(run).result()

    def resume(self) -> None:
        self.call(lambda: setattr(self, "_paused", False)).result()

    def resume_memory(self) -> tuple[bool, str]:
        def run() -> tuple[bool, str]:
            if self.device.type != "cpu":
                self.model.to(self.device)
            self._memory_released = False
            return True, "resumed"

        return self.call(run).result()

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        # Inference mode (no autograd, no view tracking or version counters): cheaper ops.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                idle = self._memory_released or self._paused
                self._drain(block=idle or not (self._running or self._waiting))
                if self._sessions:
                    self._reap_sessions()
                if self._memory_released or self._paused:
                    continue
                if self._waiting and len(self._running) < self.cache.num_slots:
                    self._prefill()
                if self._running:
                    self._decode()
            except Exception as exc:
                logger.exception("engine step failed")
                for seq in list(self._running) + list(self._waiting):
                    if not seq.future.done():
                        seq.future.set_exception(exc)
                self._running.clear()
                self._waiting.clear()
                self._due.clear()
                self._params = None
        for seq in list(self._running) + list(self._waiting):
            if not seq.future.done():
                seq.future.set_exception(RuntimeError("engine shut down"))

    def _drain(self, block: bool = False) -> None:
        while True:
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            kind = cmd[0]
            if kind == "submit":
                seq = cmd[1]
                if seq.req.session is not None:
                    try:
                        self._resolve_session(seq)
                    except RequestError as exc:
                        seq.future.set_exception(exc)
                        continue
                self._waiting.append(seq)
            elif kind == "abort":
                self._abort_matching(cmd[1], cmd[2])
            elif kind == "call":
                fn, future = cmd[1], cmd[2]
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _abort_matching(self, rid: str, abort_all: bool) -> None:
        hit = lambda s: abort_all or s.req.rid.startswith(rid)  # noqa: E731
        for seq in [s for s in self._waiting if hit(s)]:
            self._waiting.remove(seq)
            seq.finish = {"type": "abort", "message": "Abort in waiting queue"}
            self._complete(seq)
        aborted = [s for s in self._running if hit(s)]
        for seq in aborted:
            seq.finish = {"type": "abort", "message": "Abort by the user"}
        if aborted:
            self._retire()

    # -- forward --------------------------------------------------------------------------------

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed, self._mask_zero, self._mask_neg)

    def _prefill_masks(self, q_len: int):
        """Masks [1, 1, Q, Q]: every prefill row runs positions 0..Q-1 (right padding)."""
        pos_Q = self._arange[:q_len]
        causal_QQ = pos_Q[None, :] <= pos_Q[:, None]
        per_dict, windows = self._mask_layout
        masks = {}
        for layer_type, window in windows.items():
            allowed_QQ = causal_QQ
            if window is not None:
                allowed_QQ = allowed_QQ & (pos_Q[None, :] > pos_Q[:, None] - window)
            masks[layer_type] = self._additive(allowed_QQ)[None, None]
        return masks if per_dict else masks[""]

    def _decode_masks(self, pos_B: torch.Tensor, kv_len: int, ring_len: int):
        """Masks [B, 1, 1, K]: full layers see keys 0..pos, ring layers the slots written."""
        per_dict, windows = self._mask_layout
        masks = {}
        for layer_type, window in windows.items():
            ring = window is not None and window == self._ring_window
            length = ring_len if ring else kv_len
            # A ring slot s holds position pos - ((pos - s) mod W): written iff s <= pos, and
            # then always inside the window. A full row holds position j at j.
            allowed_BK = self._arange[:length][None, :] <= pos_B[:, None]
            masks[layer_type] = self._additive(allowed_BK)[:, None, None, :]
        return masks if per_dict else masks[""]

    def _run_model(
        self, ids_BQ: torch.Tensor, pos_BQ: torch.Tensor, plan: _StepPlan, masks, capture: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the backbone; returns hidden states [B, Q, H] and routes [B, Q, L, k] or None."""
        self.cache.plan = plan
        with self.capture.record(capture):
            out = self.base(
                input_ids=ids_BQ,
                position_ids=pos_BQ,
                attention_mask=masks,
                cache=self.cache,
                use_cache=True,
            )
        routes = self.capture.routes(*ids_BQ.shape) if capture else None
        return out.last_hidden_state, routes

    def _logits(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_NH).float()
        softcap = getattr(self.hf_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _batch_params(self, seqs: Sequence[_Seq]) -> _BatchParams:
        device = self.device
        params = [s.req.sampling for s in seqs]
        temps = [p.temperature for p in params]
        greedy = [p.greedy for p in params]
        # Truncation applies to the rows that ask for it (greedy rows take the argmax), so a
        # row samples from the same numbers alone or next to rows that truncate.
        truncates = [
            not p.greedy and (p.top_k < TOP_K_ALL or p.top_p < 1.0 or p.min_p > 0.0) for p in params
        ]
        trunc = None
        if any(truncates):
            trunc = (
                torch.tensor(truncates, device=device),
                torch.tensor([min(p.top_k, self.vocab_size) for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                torch.tensor([p.min_p for p in params], device=device),
            )
        seeded = [(b, s.gen) for b, s in enumerate(seqs) if s.gen is not None and not greedy[b]]
        stops = [() if p.ignore_eos else tuple(self.eos_ids | p.stop_token_ids) for p in params]
        width = max(len(x) for x in stops)
        stop_BM = None
        if width:
            stop_BM = torch.tensor([[*x, *[-1] * (width - len(x))] for x in stops], device=device)
        return _BatchParams(
            temp_B=None if all(t == 1.0 for t in temps) else torch.tensor(temps, device=device),
            greedy_B=torch.tensor(greedy, device=device) if any(greedy) else None,
            all_greedy=all(greedy),
            trunc=trunc,
            seeded_rows=torch.tensor([b for b, _ in seeded], device=device) if seeded else None,
            seeded_gens=[g for _, g in seeded],
            stop_BM=stop_BM,
            text_rows=[(b, s) for b, s in enumerate(seqs) if s.req.sampling.stop],
            top_rows=[
                (b, s)
                for b, s in enumerate(seqs)
                if s.req.return_logprob and s.req.top_logprobs_num > 0
            ],
            routes=any(s.req.return_routed_experts for s in seqs),
        )

    def _extend_plan(
        self, batch: list[_Seq], row0: int, q_len: int
    ) -> tuple[_StepPlan, torch.Tensor, Any]:
        """Restore each session row's cached prefix into its slot, and plan a forward of the
        remaining positions of every row (``start_b..len_b-1``; fresh rows start at 0)."""
        device, window = self.device, self._ring_window
        lens = [len(seq.prompt) for seq in batch]
        starts = [seq.cached for seq in batch]
        kv_len = max(lens)
        self.cache.ensure_capacity(kv_len, self.context_len)
        for b, seq in enumerate(batch):
            if seq.cached:
                self.cache.restore_row(row0 + b, seq.snapshot.layers)
        new = [(b, q) for b in range(len(batch)) for q in range(lens[b] - starts[b])]
        ext_b_N = torch.tensor([b for b, _ in new], device=device)
        ext_q_N = torch.tensor([q for _, q in new], device=device)
        start_B = torch.tensor(starts, device=device)
        plan = _StepPlan(prefill=True, extend=True, row0=row0, kv_len=kv_len)
        plan.ext_b_N, plan.ext_q_N = ext_b_N, ext_q_N
        plan.ext_rows_N, plan.ext_pos_N = ext_b_N + row0, start_B[ext_b_N] + ext_q_N
        if window is not None:
            keep = [
                (b, p - starts[b])
                for b in range(len(batch))
                for p in range(max(starts[b], lens[b] - window), lens[b])
            ]
            keep_b_N = torch.tensor([b for b, _ in keep], device=device)
            keep_q_N = torch.tensor([q for _, q in keep], device=device)
            plan.keep_b_N, plan.keep_q_N = keep_b_N, keep_q_N
            plan.keep_rows_N = keep_b_N + row0
            plan.keep_slot_N = (start_B[keep_b_N] + keep_q_N) % window
        pos_BQ = start_B[:, None] + self._arange[:q_len][None]
        return plan, pos_BQ, self._extend_masks(start_B, pos_BQ, kv_len)

    def _extend_masks(self, start_B: torch.Tensor, pos_BQ: torch.Tensor, kv_len: int):
        """Masks [B, 1, Q, K] of an extend forward: full layers see keys ``0..pos``; ring
        layers see the ring's slots (slot s of a row with ``start`` cached positions holds
        position ``start-1 - ((start-1-s) mod W)`` when that is >= 0) and this forward's keys,
        within the window."""
        per_dict, windows = self._mask_layout
        masks = {}
        query_BQ1 = pos_BQ[:, :, None]
        for layer_type, window in windows.items():
            if window is not None and window == self._ring_window:
                last_B1 = start_B[:, None] - 1
                ring_BW = last_B1 - torch.remainder(last_B1 - self._arange[:window][None], window)
                keys_BK = torch.cat([ring_BW, pos_BQ], dim=1)
                valid_BK = torch.cat([ring_BW >= 0, torch.ones_like(pos_BQ, dtype=torch.bool)], 1)
                allowed_BQK = (
                    valid_BK[:, None, :]
                    & (keys_BK[:, None, :] <= query_BQ1)
                    & (keys_BK[:, None, :] > query_BQ1 - window)
                )
            else:
                allowed_BQK = self._arange[:kv_len][None, None, :] <= query_BQ1
            masks[layer_type] = self._additive(allowed_BQK)[:, None]
        return masks if per_dict else masks[""]

    def _prefill(self) -> None:
        batch: list[_Seq] = []
        longest = 0
        free = self.cache.num_slots - len(self._running)
        while self._waiting and len(batch) < free:
            cand = len(self._waiting[0].prompt) - self._waiting[0].cached
            if batch and max(longest, cand) * (len(batch) + 1) > self.config.max_prefill_tokens:
                break
            batch.append(self._waiting.popleft())
            longest = max(longest, cand)
        row0, n = len(self._running), len(batch)
        lens = [len(seq.prompt) for seq in batch]
        starts = [seq.cached for seq in batch]  # positions restored from a session
        ids_BQ = torch.zeros((n, longest), dtype=torch.long)
        for b, seq in enumerate(batch):
            ids_BQ[b, : lens[b] - starts[b]] = torch.tensor(seq.prompt[starts[b] :])
            seq.slot = row0 + b
        params = self._batch_params(batch)
        window = self._ring_window
        if any(starts):
            plan, pos_BQ, masks = self._extend_plan(batch, row0, longest)
        else:
            plan = _StepPlan(prefill=True, row0=row0)
            if window is not None:  # sliding layers keep the last `window` keys of each row
                keep = [(b, q) for b in range(n) for q in range(max(0, lens[b] - window), lens[b])]
                keep_b_N = torch.tensor([b for b, _ in keep], device=self.device)
                keep_q_N = torch.tensor([q for _, q in keep], device=self.device)
                plan.keep_b_N, plan.keep_q_N = keep_b_N, keep_q_N
                plan.keep_rows_N, plan.keep_slot_N = keep_b_N + row0, keep_q_N % window
            self.cache.ensure_capacity(longest, self.context_len)
            pos_BQ = self._arange[:longest][None].expand(n, -1)
            masks = self._prefill_masks(longest)
        hidden_BQH, routes_BQLk = self._run_model(
            ids_BQ.to(self.device), pos_BQ, plan, masks, params.routes
        )
        self._running.extend(batch)
        self._params = None
        self.stats["prefill_batches"] += 1
        self.stats["prefill_tokens"] += sum(lens) - sum(starts)
        self.stats["cached_tokens"] += sum(starts)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self._running))

        # Logits only where needed: each row's last prompt position (to sample) plus the
        # prompt positions whose log-probs were asked for.
        picks: list[tuple[int, int]] = []
        spans = []
        for b, seq in enumerate(batch):
            start = lens[b] - 1
            if seq.req.return_logprob and seq.req.logprob_start_len >= 0:
                start = seq.req.logprob_start_len
            spans.append((len(picks), start))
            picks.extend((b, p) for p in range(start, lens[b]))
        b_idx = torch.tensor([b for b, _ in picks], device=self.device)
        p_idx = torch.tensor([p - starts[b] for b, p in picks], device=self.device)
        logits_NV = self._logits(hidden_BQH[b_idx, p_idx])

        last_rows = []
        for b, seq in enumerate(batch):
            offset, start = spans[b]
            n_in = lens[b]
            if seq.req.return_logprob:
                raw_logp_NV = torch.log_softmax(logits_NV[offset : offset + n_in - start - 1], -1)
                # Position p scores token p+1; SGLang pads the first entry with None and drops
                # the last position's (it is the sampling step).
                nxt = seq.prompt[start + 1 : n_in]
                vals = []
                if nxt:
                    nxt_N = torch.tensor(nxt, device=self.device)
                    vals = raw_logp_NV.gather(1, nxt_N[:, None])[:, 0].tolist()
                seq.in_lp = [(None, seq.prompt[start]), *zip(vals, nxt, strict=True)]
                if seq.req.top_logprobs_num > 0:
                    seq.in_top = [None, *_top_entries(raw_logp_NV, seq.req.top_logprobs_num)]
            last_rows.append(offset + n_in - 1 - start)
        last_B = torch.tensor(last_rows, device=self.device)
        tokens_B, lp_B, report_BV = self._sample(logits_NV[last_B], params)

        state, rows = self._state, slice(row0, row0 + n)
        needs_token_B = torch.tensor([seq.limit > 0 for seq in batch], device=self.device)
        state.ensure_outputs(max(1, *(seq.limit for seq in batch)), self.context_len)
        state.tok_S[rows] = tokens_B
        state.pos_S[rows] = torch.tensor(lens, device=self.device)
        state.nout_S[rows] = needs_token_B.long()
        state.out_ST[rows, 0] = tokens_B
        state.lp_ST[rows, 0] = lp_B
        if routes_BQLk is not None:
            state.ensure_routes(max(lens), self.context_len, self.num_layers, self.top_k_experts)
            if not any(starts):
                state.routes_STLk[rows, :longest] = routes_BQLk.to(self.device)
            for b, seq in enumerate(batch) if any(starts) else ():
                # Restored positions keep the routes recorded when they first ran.
                if seq.snapshot is not None and seq.snapshot.routes_TLk is not None:
                    state.routes_STLk[row0 + b, : starts[b]] = seq.snapshot.routes_TLk
                new = lens[b] - starts[b]
                state.routes_STLk[row0 + b, starts[b] : lens[b]] = routes_BQLk[b, :new].to(
                    self.device
                )
        for seq in batch:
            seq.snapshot = None  # restored into the slot; the session keeps its own reference

        finished = False
        for seq in batch:
            if seq.limit <= 1:  # the length check comes first, as in SGLang
                seq.finish = {"type": "length", "length": seq.limit}
                finished = True
            else:
                self._due.setdefault(self._steps + seq.limit - 1, []).append(seq)
        self._record_top(params, report_BV)
        finished |= self._check_stops(batch, params, tokens_B)
        self.num_generated_tokens += int(sum(seq.limit > 0 for seq in batch))
        if finished:
            self._retire()

    def _decode(self) -> None:
        seqs = self._running
        batch = len(seqs)
        if self._params is None:
            self._params = self._batch_params(seqs)
        params, state = self._params, self._state
        self.stats["decode_steps"] += 1
        self._steps += 1
        pos_B = state.pos_S[:batch]
        kv_len = int(pos_B.max()) + 1
        self.cache.ensure_capacity(kv_len, self.context_len)
        plan = _StepPlan(prefill=False, rows_B=self._arange[:batch], pos_B=pos_B, kv_len=kv_len)
        if self._ring_window is not None:
            plan.ring_B = pos_B % self._ring_window
            plan.ring_len = min(self._ring_window, kv_len)
        masks = self._decode_masks(pos_B, kv_len, plan.ring_len)
        hidden_B1H, routes_B1Lk = self._run_model(
            state.tok_S[:batch, None], pos_B[:, None], plan, masks, params.routes
        )
        tokens_B, lp_B, report_BV = self._sample(self._logits(hidden_B1H[:, -1]), params)

        rows_B, nout_B = plan.rows_B, state.nout_S[:batch]
        if routes_B1Lk is not None:
            state.ensure_routes(kv_len, self.context_len, self.num_layers, self.top_k_experts)
            state.routes_STLk[rows_B, pos_B] = routes_B1Lk[:, 0].to(self.device)
        state.out_ST[rows_B, nout_B] = tokens_B
        state.lp_ST[rows_B, nout_B] = lp_B
        state.tok_S[:batch] = tokens_B
        nout_B += 1
        pos_B += 1

        finished = False
        for seq in self._due.pop(self._steps, ()):
            if seq.finish is None and seq.slot >= 0:
                seq.finish = {"type": "length", "length": seq.limit}
                finished = True
        self._record_top(params, report_BV)
        finished |= self._check_stops(seqs, params, tokens_B)
        self.num_generated_tokens += batch
        if finished:
            self._retire()

    # -- sampling -------------------------------------------------------------------------------

    def _sample(
        self, logits_BV: torch.Tensor, params: _BatchParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one token per row; returns tokens [B], their reported log-probs [B] and the
        reported log-prob rows [B, V] (see the module doc for which distribution)."""
        scaled_BV = logits_BV if params.temp_B is None else logits_BV / params.temp_B[:, None]
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        if params.all_greedy:
            tokens_B = torch.argmax(logits_BV, dim=-1)
        else:
            probs_BV = logp_BV.exp()
            u_B = torch.rand(
                logits_BV.shape[0], generator=self._gen, device=self.device, dtype=probs_BV.dtype
            )
            if params.seeded_rows is not None:
                u_B[params.seeded_rows] = torch.cat(
                    [torch.rand(1, generator=g, device=self.device) for g in params.seeded_gens]
                )
            if params.trunc is not None:
                rows_B, *limits = params.trunc
                probs_BV = torch.where(rows_B[:, None], _truncate(probs_BV, *limits), probs_BV)
            tokens_B = _inverse_cdf(probs_BV, u_B)
            if params.greedy_B is not None:
                tokens_B = torch.where(params.greedy_B, torch.argmax(logits_BV, dim=-1), tokens_B)
        report_BV = logp_BV
        if self.config.return_original_logprob and params.temp_B is not None:
            report_BV = torch.log_softmax(logits_BV, dim=-1)
        token_lp_B = report_BV.gather(1, tokens_B[:, None])[:, 0]
        return tokens_B, token_lp_B, report_BV

    def _record_top(self, params: _BatchParams, report_BV: torch.Tensor) -> None:
        for b, seq in params.top_rows:
            if seq.limit == 0:  # prefill-only: no output token
                continue
            seq.out_top.append(_top_entries(report_BV[b : b + 1], seq.req.top_logprobs_num)[0])

    def _check_stops(
        self, seqs: Sequence[_Seq], params: _BatchParams, tokens_B: torch.Tensor
    ) -> bool:
        """Mark rows whose new token is a stop token or completes a stop string."""
        finished = False
        if params.stop_BM is not None:
            hit_B = (tokens_B[:, None] == params.stop_BM).any(dim=1)
            if bool(hit_B.any()):
                for b in hit_B.nonzero()[:, 0].tolist():
                    if seqs[b].finish is None:
                        seqs[b].finish = {"type": "stop", "matched": int(tokens_B[b])}
                        finished = True
        if params.text_rows:
            rows = torch.tensor([b for b, _ in params.text_rows], device=tokens_B.device)
            for (_, seq), token in zip(params.text_rows, tokens_B[rows].tolist(), strict=True):
                seq.text_ids.append(token)
                if seq.finish is None:
                    tail = self.tokenizer.decode(seq.text_ids[-(seq.stop_tail + 1) :])
                    for stop in seq.req.sampling.stop:
                        if stop and stop in tail:
                            seq.finish = {"type": "stop", "matched": stop}
                            finished = True
                            break
        return finished

    # -- retiring -------------------------------------------------------------------------------

    def _retire(self) -> None:
        """Complete finished sequences and keep the running ones in rows 0..B-1."""
        done = [s for s in self._running if s.finish is not None]
        if not done:
            return
        keep = [s for s in self._running if s.finish is None]
        for seq in done:
            self._collect(seq)  # before any row moves over it
            self._complete(seq)
        # Fill holes below len(keep) with the rows of survivors that sit above it.
        movers = sorted((s for s in keep if s.slot >= len(keep)), key=lambda s: s.slot)
        holes = sorted(s.slot for s in done if s.slot < len(keep))
        if movers:
            src_R = torch.tensor([s.slot for s in movers], device=self.device)
            dst_R = torch.tensor(holes[: len(movers)], device=self.device)
            # Every key a survivor holds sits below its position: move only that prefix.
            length = int(self._state.pos_S[src_R].max()) + 1
            self.cache.move_rows(src_R, dst_R, length)
            self._state.move_rows(src_R, dst_R)
            for seq, hole in zip(movers, holes, strict=False):
                seq.slot = hole
        for seq in done:
            seq.slot = -1
        self._running = sorted(keep, key=lambda s: s.slot)
        self._params = None

    def _collect(self, seq: _Seq) -> None:
        """Copy a finished row's tokens, log-probs and routes out of the slot tensors."""
        state, row = self._state, seq.slot
        count = int(state.nout_S[row])
        seq.out_ids = state.out_ST[row, :count].tolist()
        if seq.req.return_logprob:
            seq.out_lp = list(zip(state.lp_ST[row, :count].tolist(), seq.out_ids, strict=True))
        if seq.req.return_routed_experts and state.routes_STLk is not None:
            ran = len(seq.prompt) + count - 1  # every token the model ran forward on
            seq.routes_TLk = state.routes_STLk[row, :ran].cpu().clone()
        session = seq.session
        if session is not None and not session.closed:
            # Keep this turn's cache for the next one: positions 0..pos-1 ran forward (the
            # last sampled token did not), with the routes they ran with when recorded.
            length = int(state.pos_S[row])
            routes = None
            if seq.req.return_routed_experts and state.routes_STLk is not None:
                routes = state.routes_STLk[row, :length].clone()
            session.snapshot = _KVSnapshot(
                tokens=seq.prompt + seq.out_ids,
                length=length,
                layers=self.cache.snapshot_row(row, length),
                routes_TLk=routes,
            )

    def _complete(self, seq: _Seq) -> None:
        if seq.future.done():
            return
        if seq.session is not None:
            session = seq.session
            if seq.req.rid in session.tokens:  # not dropped by a replace meanwhile
                session.tokens[seq.req.rid] = seq.prompt + seq.out_ids
            session.last_active = time.monotonic()
        try:
            seq.future.set_result(self._build_output(seq))
        except Exception as exc:
            seq.future.set_exception(exc)

    def _build_output(self, seq: _Seq) -> Output:
        req, sp = seq.req, seq.req.sampling
        finish = seq.finish or {"type": "abort", "message": "unknown"}
        text_ids = seq.out_ids
        matched = finish.get("matched")
        if isinstance(matched, int) and not sp.no_stop_trim and text_ids:
            text_ids = text_ids[:-1]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=sp.skip_special_tokens)
        if isinstance(matched, str):
            pos = text.find(matched)
            if pos != -1:
                text = text[: pos + len(matched)] if sp.no_stop_trim else text[:pos]
        out = Output(
            rid=req.rid,
            prompt_tokens=len(seq.prompt),
            output_ids=list(seq.out_ids),
            text=text,
            finish_reason=finish,
            weight_version=self.weight_version,
            e2e_latency=time.perf_counter() - seq.t0,
            cached_tokens=seq.cached,
        )
        if req.return_logprob:
            if seq.in_lp is None:  # aborted before prefill
                start = len(seq.prompt) - 1 if req.logprob_start_len < 0 else req.logprob_start_len
                seq.in_lp = [(None, seq.prompt[start])] + [
                    (None, t) for t in seq.prompt[start + 1 :]
                ]
            out.input_token_logprobs = seq.in_lp
            out.output_token_logprobs = list(seq.out_lp)
            if req.top_logprobs_num > 0:
                out.input_top_logprobs = seq.in_top or [None] * len(seq.in_lp)
                out.output_top_logprobs = list(seq.out_top)
        if req.return_routed_experts:
            seqlen = len(seq.prompt) + len(seq.out_ids)
            routes_TLk = seq.routes_TLk
            if routes_TLk is None:
                routes_TLk = torch.zeros(
                    (0, self.num_layers, self.top_k_experts), dtype=torch.int32
                )
            start = min(req.routed_experts_start_len, max(seqlen - 1, 0))
            out.routed_experts = routes_TLk[start : seqlen - 1].numpy()
        return out


def _inverse_cdf(weights_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's (unnormalised, non-negative) weights, given u ~ U[0, 1).

    The first index whose running sum exceeds ``u * total``; the target is kept strictly
    below the total, so an index with zero weight is never returned.
    """
    cum_BV = weights_BV.cumsum(dim=-1)
    total_B1 = cum_BV[:, -1:]
    target_B1 = torch.minimum(
        u_B[:, None] * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1))
    )
    return torch.searchsorted(cum_BV, target_B1, right=True)[:, 0]


def _truncate(
    probs_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, min_p_B: torch.Tensor
) -> torch.Tensor:
    """Zero the tokens top-k / top-p / min-p exclude (SGLang's torch sampling fallback)."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    cum_BV = sorted_BV.cumsum(dim=-1)
    rank_V = torch.arange(probs_BV.shape[1], device=probs_BV.device)
    drop_BV = (cum_BV - sorted_BV) > top_p_B[:, None]
    drop_BV |= rank_V[None, :] >= top_k_B[:, None]
    drop_BV |= sorted_BV < (sorted_BV[:, :1] * min_p_B[:, None])
    drop_BV[:, 0] = False  # the most likely token always stays
    kept_BV = sorted_BV.masked_fill(drop_BV, 0.0)
    return torch.zeros_like(probs_BV).scatter_(1, order_BV, kept_BV)


def _top_entries(logp_NV: torch.Tensor, k: int) -> list[list[LogprobEntry]]:
    if logp_NV.shape[0] == 0:
        return []
    vals, idx = logp_NV.topk(min(k, logp_NV.shape[1]), dim=-1)
    return [list(zip(v, i, strict=True)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]
