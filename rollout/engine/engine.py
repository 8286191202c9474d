"""The embedded inference engine: continuous batching over a transformers causal LM.

This is the compute behind ``python -m rollout.server`` (SGLang's HTTP protocol). It runs any
local Hugging Face decoder-only model through transformers, MoE included, on CPU or one GPU.

Scheduling (what SGLang's scheduler does, in miniature). One background thread loops:
  1. take new requests, aborts and control calls (weight reload, flush, memory release)
     from a thread-safe queue; control calls run here, between two forward passes;
  2. admit waiting requests while fewer than ``max_running_requests`` run, and prefill them
     together in one right-padded forward (plan, forward, record);
  3. run one decode step for every running sequence in one batched forward;
  4. retire finished sequences at once, so a long response never holds up a short one.

The engine holds its parts as attributes: the slot KV cache (``kv_cache``) and its masks
(``attention``), the per-slot state (``slots``), the ``Sampler`` (``sampling``), the
``SessionStore`` (``sessions``) and the ``WeightLoader`` (``weights``). Tests hold every step
to a plain forward of the same tokens.

Shape legend:
    B   sequences in a forward (rows of the batch)
    Q   query positions per row in a forward
    S   KV slots (max running sequences); R rows moved at once
    K   key positions read for a row in this forward (ring slots for sliding layers)
    N   picked positions; H hidden size; V vocabulary; L decoder layers; k experts per token
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from itertools import chain
from typing import Any

import torch
from transformers import AttentionInterface

from rollout.engine.attention import (
    GROUPED_ATTENTION,
    AttentionMasks,
    attention_layout,
    grouped_eager_attention,
    layer_windows,
    ring_window,
    uses_grouped_attention,
)
from rollout.engine.kv_cache import SlotKVCache, StepPlan
from rollout.engine.prefill import (
    PrefillStep,
    logit_positions,
    plan_prefill,
    prompt_logprobs,
    start_rows,
    take_batch,
)
from rollout.engine.requests import (
    Output,
    Request,
    RequestError,
    RequestLimits,
    check_submitted,
    validate,
)
from rollout.engine.sampling import Sampler, check_stops, record_top, seed_generator
from rollout.engine.sessions import SessionStore, checked_session_id
from rollout.engine.slots import (
    BatchParams,
    Seq,
    SlotState,
    batch_params,
    build_output,
    fill_holes,
)
from rollout.engine.weights import WeightLoader
from rollout.routing_capture import RoutingCapture

__all__ = ["Engine", "EngineConfig"]

logger = logging.getLogger(__name__)


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


def _load(config: EngineConfig) -> tuple[Any, Any]:
    """The tokenizer and the model (on its device, in eval mode, grouped attention set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path or config.model_path)
    dtype = "auto" if config.dtype == "auto" else _DTYPES.get(config.dtype)
    if dtype is None:
        raise ValueError(f"unknown dtype {config.dtype!r}; use one of auto, {sorted(_DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype)
    model.to(torch.device(config.device)).eval()
    if uses_grouped_attention(model.config):
        AttentionInterface.register(GROUPED_ATTENTION, grouped_eager_attention)
        model.set_attn_implementation(GROUPED_ATTENTION)
    return tokenizer, model


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    sources = [model.config.eos_token_id, tokenizer.eos_token_id]
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        sources.append(gen_config.eos_token_id)
    for src in sources:
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return frozenset(int(i) for i in ids)


class Engine:
    """Continuous-batching generation over a transformers model (see module docstring).

    Thread-safe entry points: ``submit``, ``generate``, ``abort``, ``call`` (and the
    session, weight and memory helpers built on it). Everything touching the model runs on
    the engine's own thread, started by ``start()``.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.tokenizer, self.model = _load(config)
        self.hf_config = self.model.config
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.vocab_size = int(self.hf_config.vocab_size)
        self.num_layers = int(self.hf_config.num_hidden_layers)
        max_pos = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        self.context_len = int(config.context_length or max_pos)
        self.capture = RoutingCapture(self.model)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.weights = WeightLoader(
            self.model, str(config.model_path), str(config.weight_version), self.device
        )
        self.dtype = self.weights.dtype
        self.limits = RequestLimits(
            self.vocab_size,
            self.context_len,
            config.enable_return_routed_experts,
            self.capture.is_moe,
            type(self.model).__name__,
        )
        layout = attention_layout(self.hf_config)
        windows = layer_windows(layout, self.hf_config, self.num_layers, self.context_len)
        self.cache = SlotKVCache(self.num_layers, config.max_running_requests, windows=windows)
        self._arange = torch.arange(max(self.context_len, config.max_running_requests) + 1)
        self._arange = self._arange.to(self.device)
        self.masks = AttentionMasks(
            layout, ring_window(windows), self._arange, self.dtype, self.device
        )
        # Unseeded requests draw from one engine generator (one call per step for the batch).
        gen = torch.Generator(device=self.device).manual_seed(config.random_seed)
        self.sampler = Sampler(gen, self.device, config.return_original_logprob)
        self.sessions = SessionStore(
            config.max_sessions,
            config.session_timeout_s,
            self.limits,
            self.cache,
            self.tokenizer.bos_token_id,
        )
        self._state = SlotState(config.max_running_requests, self.device)
        self._params: BatchParams | None = None  # of the running rows; None when stale
        self._due: dict[int, list[Seq]] = {}  # decode step -> sequences reaching their limit
        self._steps = 0  # decode steps run
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = False
        self.num_generated_tokens = 0
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

    # -- facts ----------------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        return self.weights.path

    @property
    def weight_version(self) -> str:
        return self.weights.version

    @property
    def top_k_experts(self) -> int:
        return self.capture.top_k

    @property
    def alive(self) -> bool:
        """The engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_sessions(self) -> int:
        return len(self.sessions)

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
        validate(req, self.limits, context)

    def submit(self, req: Request) -> Future:
        """Queue a request; the future resolves to its ``Output`` (or raises RequestError).

        A session request is checked once the engine thread has assembled its context (the
        turn it continues may still be finishing when it is submitted).
        """
        check_submitted(req, self.limits)
        seed = req.sampling.sampling_seed
        gen = None if seed is None else seed_generator(seed, req.copy_index, self.device)
        limit = req.sampling.max_new_tokens
        if limit is None:
            limit = self.context_len - len(req.input_ids) - 1
        future: Future = Future()
        seq = Seq(req, future, limit, gen)
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
        sid = checked_session_id(session_id, timeout, streaming)
        return self.call(lambda: self.sessions.open(sid, timeout)).result()

    def close_session(self, session_id: str) -> bool:
        """Close a session and free what it holds; False if no such session was open.

        A request of the session still running finishes normally (its KV cache is then
        dropped instead of kept); later requests naming the session are refused.
        """
        return self.call(lambda: self.sessions.close(session_id)).result()

    # -- control operations (run on the engine thread via ``call``) -----------------------------

    def _on_thread(self, fn: Callable[[], Any], abort_all: bool = False) -> Any:
        """Run ``fn`` on the engine thread (first aborting everything if asked); its result."""

        def run() -> Any:
            if abort_all:
                self._abort_matching("", True)
            return fn()

        return self.call(run).result()

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None, abort_all: bool = False
    ) -> tuple[bool, str]:
        """Reload every weight from an HF checkpoint dir; running requests continue on it."""
        return self._on_thread(
            lambda: self.weights.from_disk(model_path, weight_version), abort_all
        )

    def update_weights_from_tensors(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        weight_version: str | None = None,
        abort_all: bool = False,
    ) -> tuple[bool, str]:
        """Overwrite the named parameters (model ``state_dict`` names) with the given tensors."""
        named = list(named_tensors)
        return self._on_thread(lambda: self.weights.from_tensors(named, weight_version), abort_all)

    def set_weight_version(self, version: str, abort_all: bool = True) -> None:
        self._on_thread(lambda: setattr(self.weights, "version", str(version)), abort_all)

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
            self.sessions.drop_snapshots()
            self.weights.release()
            return True, "released"

        return self.call(run).result()

    def resume_memory(self) -> tuple[bool, str]:
        def run() -> tuple[bool, str]:
            self.weights.resume()
            return True, "resumed"

        return self.call(run).result()

    def pause(self, abort_all: bool = False) -> None:
        """Stop stepping (SGLang's /pause_generation); ``abort_all`` aborts everything first."""
        self._on_thread(lambda: setattr(self, "_paused", True), abort_all)

    def resume(self) -> None:
        self.call(lambda: setattr(self, "_paused", False)).result()

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        # Inference mode (no autograd, no view tracking or version counters): cheaper ops.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                idle = self.weights.released or self._paused
                self._drain(block=idle or not (self._running or self._waiting))
                if self.sessions:
                    self.sessions.reap(chain(self._running, self._waiting))
                if self.weights.released or self._paused:
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
                        self.sessions.resolve(seq)
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

    def _run_model(
        self, ids_BQ: torch.Tensor, pos_BQ: torch.Tensor, plan: StepPlan, masks, capture: bool
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

    def _batch_params(self, seqs: Sequence[Seq]) -> BatchParams:
        return batch_params(seqs, self.eos_ids, self.vocab_size, self.device)

    def _prefill(self) -> None:
        """Admit waiting sequences and prefill them: plan, forward, record."""
        free = self.cache.num_slots - len(self._running)
        batch, longest = take_batch(self._waiting, free, self.config.max_prefill_tokens)
        try:
            params = self._batch_params(batch)
            step = plan_prefill(
                batch, longest, len(self._running), params, self.cache, self.masks, self.context_len
            )
            hidden_BQH, routes_BQLk = self._run_model(
                step.ids_BQ, step.pos_BQ, step.plan, step.masks, params.routes
            )
        except Exception as exc:
            # The batch has left the waiting queue but is not running yet: the loop's handler
            # would not see it, and its callers would wait forever.
            for seq in batch:
                if not seq.future.done():
                    seq.future.set_exception(exc)
            raise
        self._record_prefill(step, hidden_BQH, routes_BQLk)

    def _record_prefill(
        self, step: PrefillStep, hidden_BQH: torch.Tensor, routes_BQLk: torch.Tensor | None
    ) -> None:
        """Make the prefilled sequences running: prompt log-probs, first token, slot state."""
        batch, params = step.batch, step.params
        self._running.extend(batch)
        self._params = None
        self.stats["prefill_batches"] += 1
        self.stats["prefill_tokens"] += sum(step.lens) - sum(step.starts)
        self.stats["cached_tokens"] += sum(step.starts)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self._running))

        b_idx, p_idx, spans = logit_positions(step)
        logits_NV = self._logits(hidden_BQH[b_idx, p_idx])
        last_B = prompt_logprobs(step, logits_NV, spans)
        tokens_B, lp_B, report_BV = self.sampler.sample(logits_NV[last_B], params)
        routes_shape = (self.num_layers, self.top_k_experts)
        start_rows(self._state, step, tokens_B, lp_B, routes_BQLk, self.context_len, routes_shape)
        for seq in batch:
            seq.snapshot = None  # restored into the slot; the session keeps its own reference

        finished = False
        for seq in batch:
            if seq.limit <= 1:  # the length check comes first, as in SGLang
                seq.finish = {"type": "length", "length": seq.limit}
                finished = True
            else:
                self._due.setdefault(self._steps + seq.limit - 1, []).append(seq)
        generated = int(sum(seq.limit > 0 for seq in batch))
        self._end_step(batch, params, tokens_B, report_BV, finished, generated)

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
        plan = StepPlan(prefill=False, rows_B=self._arange[:batch], pos_B=pos_B, kv_len=kv_len)
        window = self.masks.ring
        if window is not None:
            plan.ring_B = pos_B % window
            plan.ring_len = min(window, kv_len)
        masks = self.masks.decode(pos_B, kv_len, plan.ring_len)
        hidden_B1H, routes_B1Lk = self._run_model(
            state.tok_S[:batch, None], pos_B[:, None], plan, masks, params.routes
        )
        tokens_B, lp_B, report_BV = self.sampler.sample(self._logits(hidden_B1H[:, -1]), params)

        routes_shape = (self.num_layers, self.top_k_experts)
        state.record_step(
            plan.rows_B, tokens_B, lp_B, routes_B1Lk, kv_len, self.context_len, routes_shape
        )

        finished = False
        for seq in self._due.pop(self._steps, ()):
            if seq.finish is None and seq.slot >= 0:
                seq.finish = {"type": "length", "length": seq.limit}
                finished = True
        self._end_step(seqs, params, tokens_B, report_BV, finished, batch)

    def _end_step(
        self,
        seqs: Sequence[Seq],
        params: BatchParams,
        tokens_B: torch.Tensor,
        report_BV: torch.Tensor,
        finished: bool,
        generated: int,
    ) -> None:
        """After sampling: top log-probs, stop checks, and retiring what finished."""
        record_top(params, report_BV)
        finished |= check_stops(seqs, params, tokens_B, self.tokenizer)
        self.num_generated_tokens += generated
        if finished:
            self._retire()

    # -- retiring -------------------------------------------------------------------------------

    def _retire(self) -> None:
        """Complete finished sequences and keep the running ones in rows 0..B-1."""
        done = [s for s in self._running if s.finish is not None]
        if not done:
            return
        keep = [s for s in self._running if s.finish is None]
        for seq in done:
            # Before any row moves over it: its outputs, and the turn a session keeps.
            self._state.collect(seq)
            self.sessions.keep_turn(seq, self._state)
            self._complete(seq)
        self._running = fill_holes(keep, done, self.cache, self._state)
        self._params = None

    def _complete(self, seq: Seq) -> None:
        if seq.future.done():
            return
        if seq.session is not None:
            seq.session.finish_turn(seq.req.rid, seq.prompt + seq.out_ids)
        try:
            routes_shape = (self.num_layers, self.top_k_experts)
            seq.future.set_result(
                build_output(seq, self.tokenizer, self.weight_version, routes_shape)
            )
        except Exception as exc:
            seq.future.set_exception(exc)
