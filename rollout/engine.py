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
per running sequence in preallocated buffers ``[S, H_kv, capacity, D]``. Each forward writes
the new keys/values at each row's own positions and reads the rows it runs on; running
sequences occupy rows ``0..B-1`` (a retired row is filled by moving the last one in), so a
decode step reads a plain slice with no copy. Sequences of different lengths share a step
through an explicit 4-d additive attention mask built from each row's positions, per layer
type: a causal mask for full-attention layers and a causal band of ``sliding_window`` keys
for sliding layers (transformers' convention: key j is visible from query i iff
``i - window < j <= i``). Sliding layers keep every key; the band mask alone restricts them,
so MiMo-V2-Flash's sink logits (added inside the model's attention) see exactly the keys a
plain full forward shows them. Tests hold every step to a plain forward of the same tokens.

Log-probs (matching SGLang's defaults, ``srt/layers/sampler.py`` and the logits processor):
  * output tokens: log-probs under the temperature-scaled distribution ``softmax(z / T)``,
    before top-k/top-p/min-p truncation; greedy requests (temperature 0) report the raw
    ``log_softmax(z)``. With ``return_original_logprob=True`` (SGLang's env var
    ``SGLANG_RETURN_ORIGINAL_LOGPROB``) every output log-prob is the raw ``log_softmax(z)``.
  * input (prompt) tokens: always the raw ``log_softmax(z)``, never temperature-scaled. This
    is what teacher scoring reads (prefill-only: ``max_new_tokens=0``).

Sampling draws, per sequence, from its own ``torch.Generator``: seeded from
``sampling_seed`` (and the index of the parallel sample, so ``n`` copies differ) when given,
else from the engine's RNG (``random_seed``). A sequence's samples therefore do not depend
on what else shares its batch: the same request and seed give the same tokens alone or in a
crowd. A token is drawn by the exponential race ``argmax(p_i / E_i)``, ``E_i ~ Exp(1)``,
which samples exactly from ``p``.

Shape legend:
    B   sequences in a forward (rows of the batch)
    Q   query positions per row in a forward
    S   KV slots (max running sequences)
    K   key positions held for a row in this forward (kv length)
    H   hidden size; V vocabulary; L decoder layers; k experts per token
"""

from __future__ import annotations

import dataclasses
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
from transformers.cache_utils import Cache, CacheLayerMixin

from rollout.routing_capture import RoutingCapture

__all__ = [
    "Engine",
    "EngineConfig",
    "Output",
    "Request",
    "RequestError",
    "SamplingParams",
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
class Request:
    """One sequence to generate (SGLang expands ``n`` and batches into these).

    ``logprob_start_len`` -1 means only the last prompt position (SGLang's default).
    ``copy_index`` tells apart the parallel samples of one prompt (seed derivation).
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


LogprobEntry = tuple[float | None, int]


@dataclasses.dataclass
class Output:
    """The result of one ``Request``, the fields SGLang puts in a ``/generate`` response.

    Log-prob lists hold ``(logprob, token_id)`` pairs; the server adds the text slot.
    ``input_token_logprobs`` covers prompt positions ``logprob_start_len..P-1`` with ``None``
    first (SGLang pads the first one). ``routed_experts`` is int32 [T, L, k] for rows
    ``routed_experts_start_len..P+N-2`` (every token the model ran forward on).
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


# ---------------------------------------------------------------------------------------------
# KV cache with one row per running sequence
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _StepPlan:
    row0: int  # first slot row of this forward
    rows_BQ: torch.Tensor  # slot row of every query position
    pos_BQ: torch.Tensor  # cache position written by every query position
    kv_len: int  # key positions read per row


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's keys/values: [S, H_kv, capacity, D] buffers, lazily allocated."""

    is_sliding = False

    def __init__(self, owner: SlotKVCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, cap = self.owner.num_slots, self.owner.capacity
        self.device = key_states.device
        self.keys = key_states.new_zeros((slots, key_states.shape[1], cap, key_states.shape[3]))
        self.values = value_states.new_zeros(
            (slots, value_states.shape[1], cap, value_states.shape[3])
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        # key_states [B, H, Q, D] -> written at [row, :, pos] for every (b, q)
        self.keys[plan.rows_BQ, :, plan.pos_BQ] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[plan.rows_BQ, :, plan.pos_BQ] = value_states.transpose(1, 2).to(
            self.values.dtype
        )
        rows = slice(plan.row0, plan.row0 + key_states.shape[0])
        return self.keys[rows, :, : plan.kv_len], self.values[rows, :, : plan.kv_len]

    def grow(self, capacity: int) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def move_row(self, src: int, dst: int) -> None:
        if self.is_initialized:
            self.keys[dst] = self.keys[src]
            self.values[dst] = self.values[src]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row; the engine always passes position_ids

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotKVCache(Cache):
    """A ``transformers.Cache`` holding one KV row per running sequence (see module doc)."""

    def __init__(self, num_layers: int, num_slots: int, capacity: int = 256) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.plan: _StepPlan | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def ensure_capacity(self, needed: int, limit: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity), max(limit, needed))
        for layer in self.layers:
            layer.grow(new_cap)
        self.capacity = new_cap

    def move_row(self, src: int, dst: int) -> None:
        for layer in self.layers:
            layer.move_row(src, dst)

    def drop_buffers(self) -> None:
        """Free every buffer (re-allocated lazily on the next forward)."""
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False


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


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


class _Seq:
    """Scheduler state of one running request (owned by the engine thread)."""

    def __init__(self, req: Request, future: Future, seed: int, device: torch.device) -> None:
        self.req = req
        self.future = future
        self.prompt = list(req.input_ids)
        self.out_ids: list[int] = []
        self.out_lp: list[LogprobEntry] = []
        self.out_top: list[list[LogprobEntry]] = []
        self.in_lp: list[LogprobEntry] | None = None
        self.in_top: list[list[LogprobEntry] | None] | None = None
        self.routes: list[torch.Tensor] = []
        self.num_cached = 0  # tokens whose KV is in the slot
        self.slot = -1
        self.finish: dict[str, Any] | None = None
        self.t0 = time.perf_counter()
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.aborted = False

    @property
    def last_token(self) -> int:
        return self.out_ids[-1] if self.out_ids else self.prompt[-1]


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
        self.cache = SlotKVCache(self.num_layers, config.max_running_requests)
        self.weight_version = str(config.weight_version)
        self._rng = np.random.default_rng(config.random_seed)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._memory_released = False
        self._paused = False
        self.num_generated_tokens = 0
        # Scheduling counters: tests and /get_server_info read them.
        self.stats = {"prefill_batches": 0, "decode_steps": 0, "peak_running": 0}

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
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def validate(self, req: Request) -> None:
        """Raise ``RequestError`` (SGLang's wording) if the request cannot run."""
        ids = req.input_ids
        if len(ids) == 0:
            raise RequestError("input_ids cannot be empty.")
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
        """Queue a request; the future resolves to its ``Output`` (or raises RequestError)."""
        self.validate(req)
        seed = req.sampling.sampling_seed
        if seed is None:
            seed = int(self._rng.integers(0, 2**62))
        else:
            seed = (seed * 1_000_003 + req.copy_index) % (2**63 - 1)
        future: Future = Future()
        self._commands.put(("submit", _Seq(req, future, seed, self.device)))
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
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                idle = self._memory_released or self._paused
                self._drain(block=idle or not (self._running or self._waiting))
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
                self._waiting.append(cmd[1])
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

    def _masks(self, pos_BQ: torch.Tensor, kv_len: int):
        key_pos = torch.arange(kv_len, device=self.device)
        causal_BQK = key_pos[None, None, :] <= pos_BQ[:, :, None]
        neg = torch.finfo(self.dtype).min
        per_dict, windows = self._mask_layout
        masks = {}
        for layer_type, window in windows.items():
            allowed = causal_BQK
            if window is not None:
                allowed = allowed & (key_pos[None, None, :] > pos_BQ[:, :, None] - window)
            mask_BQK = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            masks[layer_type] = mask_BQK.masked_fill_(~allowed, neg)[:, None]
        return masks if per_dict else masks[""]

    def _forward(
        self, ids_BQ: torch.Tensor, pos_BQ: torch.Tensor, row0: int, kv_len: int, capture: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the backbone; returns hidden states [B, Q, H] and routes [B, Q, L, k] or None."""
        batch, q_len = ids_BQ.shape
        self.cache.ensure_capacity(kv_len, self.context_len)
        rows_BQ = torch.arange(row0, row0 + batch, device=self.device)[:, None].expand(-1, q_len)
        self.cache.plan = _StepPlan(row0, rows_BQ, pos_BQ, kv_len)
        with self.capture.record(capture):
            out = self.base(
                input_ids=ids_BQ,
                position_ids=pos_BQ,
                attention_mask=self._masks(pos_BQ, kv_len),
                cache=self.cache,
                use_cache=True,
            )
        routes = self.capture.routes(batch, q_len) if capture else None
        return out.last_hidden_state, routes

    def _logits(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_NH).float()
        softcap = getattr(self.hf_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _wants_routes(self, seqs: Iterable[_Seq]) -> bool:
        return any(s.req.return_routed_experts for s in seqs)

    def _prefill(self) -> None:
        batch: list[_Seq] = []
        longest = 0
        free = self.cache.num_slots - len(self._running)
        while self._waiting and len(batch) < free:
            cand = len(self._waiting[0].prompt)
            if batch and max(longest, cand) * (len(batch) + 1) > self.config.max_prefill_tokens:
                break
            batch.append(self._waiting.popleft())
            longest = max(longest, cand)
        row0 = len(self._running)
        ids_BQ = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, seq in enumerate(batch):
            ids_BQ[b, : len(seq.prompt)] = torch.tensor(seq.prompt)
            seq.slot = row0 + b
        pos_BQ = torch.arange(longest)[None].expand(len(batch), -1)
        hidden_BQH, routes = self._forward(
            ids_BQ.to(self.device), pos_BQ.to(self.device), row0, longest, self._wants_routes(batch)
        )
        self._running.extend(batch)
        self.stats["prefill_batches"] += 1
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self._running))

        # Logits only where needed: each row's last prompt position (to sample) plus the
        # prompt positions whose log-probs were asked for.
        picks: list[tuple[int, int]] = []
        spans = []
        for b, seq in enumerate(batch):
            n_in = len(seq.prompt)
            start = n_in - 1
            if seq.req.return_logprob and seq.req.logprob_start_len >= 0:
                start = seq.req.logprob_start_len
            spans.append((len(picks), start, n_in))
            picks.extend((b, p) for p in range(start, n_in))
            seq.num_cached = n_in
            if routes is not None:
                seq.routes.append(routes[b, :n_in])
        b_idx = torch.tensor([b for b, _ in picks], device=self.device)
        p_idx = torch.tensor([p for _, p in picks], device=self.device)
        logits_NV = self._logits(hidden_BQH[b_idx, p_idx])
        raw_logp_NV = torch.log_softmax(logits_NV, dim=-1)

        last_rows = []
        for b, seq in enumerate(batch):
            offset, start, n_in = spans[b]
            if seq.req.return_logprob:
                # Position p scores token p+1; SGLang pads the first entry with None and drops
                # the last position's (it is the sampling step).
                rows = torch.arange(offset, offset + n_in - start - 1, device=self.device)
                nxt = torch.tensor(seq.prompt[start + 1 : n_in], device=self.device)
                vals = raw_logp_NV[rows, nxt].tolist() if len(rows) else []
                seq.in_lp = [
                    (None, seq.prompt[start]),
                    *list(zip(vals, seq.prompt[start + 1 : n_in], strict=True)),
                ]
                if seq.req.top_logprobs_num > 0:
                    seq.in_top = [None, *_top_entries(raw_logp_NV[rows], seq.req.top_logprobs_num)]
            last_rows.append(offset + n_in - 1 - start)
        needs_token = [s for s in batch if s.req.sampling.max_new_tokens != 0]
        if needs_token:
            idx = torch.tensor([last_rows[batch.index(s)] for s in needs_token])
            self._sample_and_append(needs_token, logits_NV[idx.to(self.device)])
        for seq in batch:
            if seq.req.sampling.max_new_tokens == 0:
                seq.finish = {"type": "length", "length": 0}
        self._retire()

    def _decode(self) -> None:
        seqs = self._running
        self.stats["decode_steps"] += 1
        ids_B1 = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        pos_B1 = torch.tensor([[s.num_cached] for s in seqs], device=self.device)
        kv_len = int(pos_B1.max()) + 1
        hidden_B1H, routes = self._forward(ids_B1, pos_B1, 0, kv_len, self._wants_routes(seqs))
        for b, seq in enumerate(seqs):
            seq.num_cached += 1
            if routes is not None:
                seq.routes.append(routes[b])
        self._sample_and_append(seqs, self._logits(hidden_B1H[:, -1]))
        self._retire()

    # -- sampling -------------------------------------------------------------------------------

    def _sample_and_append(self, seqs: list[_Seq], logits_BV: torch.Tensor) -> None:
        params = [s.req.sampling for s in seqs]
        temps_B = torch.tensor([p.temperature for p in params], device=logits_BV.device)
        raw_logp_BV = torch.log_softmax(logits_BV, dim=-1)
        scaled_logp_BV = torch.log_softmax(logits_BV / temps_B[:, None], dim=-1)
        greedy_B = torch.tensor([p.greedy for p in params], device=logits_BV.device)
        tokens_B = torch.argmax(logits_BV, dim=-1)
        if not bool(greedy_B.all()):
            probs_BV = _truncate(scaled_logp_BV.exp(), params)
            noise_BV = torch.stack(
                [
                    torch.empty(logits_BV.shape[1], device=logits_BV.device).exponential_(
                        generator=s.gen
                    )
                    for s in seqs
                ]
            )
            sampled_B = torch.argmax(probs_BV / noise_BV, dim=-1)
            tokens_B = torch.where(greedy_B, tokens_B, sampled_B)
        report_BV = raw_logp_BV if self.config.return_original_logprob else scaled_logp_BV
        token_lp_B = report_BV.gather(1, tokens_B[:, None])[:, 0]
        tokens = tokens_B.tolist()
        token_lps = token_lp_B.tolist()
        want_top = [s.req.return_logprob and s.req.top_logprobs_num > 0 for s in seqs]
        for b, seq in enumerate(seqs):
            token = tokens[b]
            seq.out_ids.append(token)
            if seq.req.return_logprob:
                seq.out_lp.append((token_lps[b], token))
                if want_top[b]:
                    seq.out_top.append(
                        _top_entries(report_BV[b : b + 1], seq.req.top_logprobs_num)[0]
                    )
            seq.finish = self._check_finish(seq, token)
        self.num_generated_tokens += len(seqs)

    def _check_finish(self, seq: _Seq, token: int) -> dict[str, Any] | None:
        sp = seq.req.sampling
        max_new = sp.max_new_tokens
        if max_new is None:
            max_new = self.context_len - len(seq.prompt) - 1
        if len(seq.out_ids) >= max_new:
            return {"type": "length", "length": max_new}
        if not sp.ignore_eos and (token in sp.stop_token_ids or token in self.eos_ids):
            return {"type": "stop", "matched": token}
        if sp.stop:
            tail_len = max(len(self.tokenizer.encode(s, add_special_tokens=False)) for s in sp.stop)
            tail = self.tokenizer.decode(seq.out_ids[-(tail_len + 1) :])
            for stop in sp.stop:
                if stop and stop in tail:
                    return {"type": "stop", "matched": stop}
        if len(seq.prompt) + len(seq.out_ids) >= self.context_len:
            return {"type": "length", "length": len(seq.out_ids)}
        return None

    # -- retiring -------------------------------------------------------------------------------

    def _retire(self) -> None:
        """Complete finished sequences and keep the running ones in rows 0..B-1."""
        if not any(s.finish is not None for s in self._running):
            return
        keep = [s for s in self._running if s.finish is None]
        done = [s for s in self._running if s.finish is not None]
        free_rows = sorted(s.slot for s in done)
        # Fill holes below len(keep) with the rows of survivors that sit above it.
        movers = sorted((s for s in keep if s.slot >= len(keep)), key=lambda s: s.slot)
        holes = [r for r in free_rows if r < len(keep)]
        for seq, hole in zip(movers, holes, strict=False):
            self.cache.move_row(seq.slot, hole)
            seq.slot = hole
        self._running = sorted(keep, key=lambda s: s.slot)
        for seq in done:
            self._complete(seq)

    def _complete(self, seq: _Seq) -> None:
        if seq.future.done():
            return
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
            if seq.routes:
                routes_TLk = torch.cat(seq.routes, dim=0)
            else:
                routes_TLk = torch.zeros(
                    (0, self.num_layers, self.top_k_experts), dtype=torch.int32
                )
            start = min(req.routed_experts_start_len, max(seqlen - 1, 0))
            out.routed_experts = routes_TLk[start : seqlen - 1].numpy()
        return out


def _truncate(probs_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the tokens top-k / top-p / min-p exclude (SGLang's torch sampling fallback)."""
    need = any(p.top_k < TOP_K_ALL or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
    if not need:
        return probs_BV
    device = probs_BV.device
    top_k = torch.tensor([min(p.top_k, probs_BV.shape[1]) for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    cum_BV = sorted_BV.cumsum(dim=-1)
    rank_V = torch.arange(probs_BV.shape[1], device=device)
    drop_BV = (cum_BV - sorted_BV) > top_p[:, None]
    drop_BV |= rank_V[None, :] >= top_k[:, None]
    drop_BV |= sorted_BV < (sorted_BV[:, :1] * min_p[:, None])
    drop_BV[:, 0] = False  # the most likely token always stays
    kept_BV = sorted_BV.masked_fill(drop_BV, 0.0)
    return torch.zeros_like(probs_BV).scatter_(1, order_BV, kept_BV)


def _top_entries(logp_NV: torch.Tensor, k: int) -> list[list[LogprobEntry]]:
    if logp_NV.shape[0] == 0:
        return []
    vals, idx = logp_NV.topk(min(k, logp_NV.shape[1]), dim=-1)
    return [list(zip(v, i, strict=True)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]
