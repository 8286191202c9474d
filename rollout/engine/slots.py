"""Per-sequence scheduler state, and the per-slot tensors that change every step.

Per-step state stays on tensors: each slot's last token, position, generated tokens,
log-probs and routed experts live in ``SlotState`` rows that move with the KV rows; Python
work per step is constant plus the rows that finish (finishing by length is known in advance)
or need host-side checks (stop strings, top log-probs). Per-row sampling settings are turned
into tensors once per change of the running set (``batch_params``). A ``Seq`` is one request
as the scheduler sees it; ``build_output`` turns a finished one into its ``Output``.

Shape legend:
    B   rows of the batch (running sequences, in slot order)
    S   KV slots (max running sequences); R rows moved at once
    T   positions kept per slot; M stop token ids per row
    L   decoder layers; k experts per token
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from rollout.engine.kv_cache import SlotKVCache
from rollout.engine.requests import TOP_K_ALL, LogprobEntry, Output, Request

if TYPE_CHECKING:
    from rollout.engine.sessions import KVSnapshot, Session

__all__ = ["BatchParams", "Seq", "SlotState", "batch_params", "build_output", "fill_holes"]


class Seq:
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
        self.session: Session | None = None  # set when the request continues a session
        self.cached = 0  # context positions restored from the session's snapshot
        self.snapshot: KVSnapshot | None = None  # what to restore (cached > 0)


@dataclasses.dataclass
class BatchParams:
    """Sampling and stop settings of consecutive running rows, as tensors (rebuilt only when
    the running set changes). ``None`` fields mean "no row needs this"."""

    temp_B: torch.Tensor | None  # None: every temperature is 1
    greedy_B: torch.Tensor | None  # None: no row is greedy
    all_greedy: bool
    trunc: tuple[torch.Tensor, ...] | None  # rows that truncate, top_k_B, top_p_B, min_p_B
    seeded_rows: torch.Tensor | None  # rows (in the batch) that draw from their own generator
    seeded_gens: list[torch.Generator]
    stop_BM: torch.Tensor | None  # token ids that stop each row (EOS, stop_token_ids), -1 pad
    text_rows: list[tuple[int, Seq]]  # rows with stop strings
    top_rows: list[tuple[int, Seq]]  # rows asking for top log-probs
    routes: bool  # some row asked for routed experts


def batch_params(
    seqs: Sequence[Seq], eos_ids: frozenset[int], vocab_size: int, device: torch.device
) -> BatchParams:
    """The ``BatchParams`` of ``seqs`` as consecutive rows (``eos_ids``: the model's EOS)."""
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
            torch.tensor([min(p.top_k, vocab_size) for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            torch.tensor([p.min_p for p in params], device=device),
        )
    seeded = [(b, s.gen) for b, s in enumerate(seqs) if s.gen is not None and not greedy[b]]
    stops = [() if p.ignore_eos else tuple(eos_ids | p.stop_token_ids) for p in params]
    width = max(len(x) for x in stops)
    stop_BM = None
    if width:
        stop_BM = torch.tensor([[*x, *[-1] * (width - len(x))] for x in stops], device=device)
    return BatchParams(
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


class SlotState:
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

    def record_step(
        self,
        rows_B: torch.Tensor,
        tokens_B: torch.Tensor,
        lp_B: torch.Tensor,
        routes_B1Lk: torch.Tensor | None,
        kv_len: int,
        limit: int,
        routes_shape: tuple[int, int],
    ) -> None:
        """Record a decode step of rows ``0..B-1`` (``rows_B``): the token each sampled, its
        log-prob and the routes of the position it ran (``routes_shape``: (L, k)); every row
        advances one position (``kv_len``: the longest row's keys, ``limit``: the context)."""
        batch = rows_B.shape[0]
        pos_B, nout_B = self.pos_S[:batch], self.nout_S[:batch]
        if routes_B1Lk is not None:
            self.ensure_routes(kv_len, limit, *routes_shape)
            self.routes_STLk[rows_B, pos_B] = routes_B1Lk[:, 0].to(self.device)
        self.out_ST[rows_B, nout_B] = tokens_B
        self.lp_ST[rows_B, nout_B] = lp_B
        self.tok_S[:batch] = tokens_B
        nout_B += 1
        pos_B += 1

    def collect(self, seq: Seq) -> None:
        """Copy a finished row's tokens, log-probs and routes out into ``seq``."""
        row = seq.slot
        count = int(self.nout_S[row])
        seq.out_ids = self.out_ST[row, :count].tolist()
        if seq.req.return_logprob:
            seq.out_lp = list(zip(self.lp_ST[row, :count].tolist(), seq.out_ids, strict=True))
        if seq.req.return_routed_experts and self.routes_STLk is not None:
            ran = len(seq.prompt) + count - 1  # every token the model ran forward on
            seq.routes_TLk = self.routes_STLk[row, :ran].cpu().clone()


def fill_holes(keep: list[Seq], done: list[Seq], cache: SlotKVCache, state: SlotState) -> list[Seq]:
    """Move the survivors (``keep``) sitting above row ``len(keep)`` into the rows that
    finished sequences (``done``) free below it; returns the survivors in row order."""
    movers = sorted((s for s in keep if s.slot >= len(keep)), key=lambda s: s.slot)
    holes = sorted(s.slot for s in done if s.slot < len(keep))
    if movers:
        src_R = torch.tensor([s.slot for s in movers], device=state.device)
        dst_R = torch.tensor(holes[: len(movers)], device=state.device)
        # Every key a survivor holds sits below its position: move only that prefix.
        length = int(state.pos_S[src_R].max()) + 1
        cache.move_rows(src_R, dst_R, length)
        state.move_rows(src_R, dst_R)
        for seq, hole in zip(movers, holes, strict=False):
            seq.slot = hole
    for seq in done:
        seq.slot = -1
    return sorted(keep, key=lambda s: s.slot)


def build_output(
    seq: Seq, tokenizer: Any, weight_version: str, routes_shape: tuple[int, int]
) -> Output:
    """The ``Output`` of a finished (or aborted) sequence; ``routes_shape``: (L, k)."""
    req, sp = seq.req, seq.req.sampling
    finish = seq.finish or {"type": "abort", "message": "unknown"}
    text_ids = seq.out_ids
    matched = finish.get("matched")
    if isinstance(matched, int) and not sp.no_stop_trim and text_ids:
        text_ids = text_ids[:-1]
    text = tokenizer.decode(text_ids, skip_special_tokens=sp.skip_special_tokens)
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
        weight_version=weight_version,
        e2e_latency=time.perf_counter() - seq.t0,
        cached_tokens=seq.cached,
    )
    if req.return_logprob:
        if seq.in_lp is None:  # aborted before prefill
            start = len(seq.prompt) - 1 if req.logprob_start_len < 0 else req.logprob_start_len
            seq.in_lp = [(None, seq.prompt[start])] + [(None, t) for t in seq.prompt[start + 1 :]]
        out.input_token_logprobs = seq.in_lp
        out.output_token_logprobs = list(seq.out_lp)
        if req.top_logprobs_num > 0:
            out.input_top_logprobs = seq.in_top or [None] * len(seq.in_lp)
            out.output_top_logprobs = list(seq.out_top)
    if req.return_routed_experts:
        seqlen = len(seq.prompt) + len(seq.out_ids)
        routes_TLk = seq.routes_TLk
        if routes_TLk is None:
            routes_TLk = torch.zeros((0, *routes_shape), dtype=torch.int32)
        start = min(req.routed_experts_start_len, max(seqlen - 1, 0))
        out.routed_experts = routes_TLk[start : seqlen - 1].numpy()
    return out
