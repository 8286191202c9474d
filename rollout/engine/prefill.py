"""Prefill: admit waiting sequences, plan their forward, and read what their prompts produce.

A prefill runs the prompts of newly admitted sequences together in one right-padded forward
into the free slot rows above the running ones (``row0..row0+B-1``). ``take_batch`` admits
while the padded batch stays within ``max_prefill_tokens``; ``plan_prefill`` lays out the
forward (a fresh one from position 0, or an extend one whose session rows first get their
cached prefix restored); after the forward, ``logit_positions`` and ``prompt_logprobs`` read
the positions whose logits are needed, and ``start_rows`` writes each row's first state.

Shape legend:
    B   sequences in the prefill (rows of the batch)
    Q   positions run per row (the longest row; shorter rows are right-padded)
    N   picked positions (keys a ring keeps, new keys of an extend, logits read)
    H   hidden size; V vocabulary; L decoder layers; k experts per token
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import torch

from rollout.engine.attention import AttentionMasks
from rollout.engine.kv_cache import SlotKVCache, StepPlan
from rollout.engine.sampling import top_entries
from rollout.engine.slots import BatchParams, Seq, SlotState

__all__ = [
    "PrefillStep",
    "logit_positions",
    "plan_prefill",
    "prompt_logprobs",
    "start_rows",
    "take_batch",
]


@dataclasses.dataclass
class PrefillStep:
    """One planned prefill forward (``plan_prefill`` builds it; the engine runs it)."""

    batch: list[Seq]
    row0: int  # the slot row of the first sequence
    lens: list[int]  # each row's whole context length
    starts: list[int]  # positions restored from a session (0: prefilled whole)
    longest: int  # Q
    params: BatchParams
    ids_BQ: torch.Tensor  # on the engine's device
    pos_BQ: torch.Tensor
    plan: StepPlan
    masks: Any


def take_batch(waiting: deque[Seq], free: int, max_prefill_tokens: int) -> tuple[list[Seq], int]:
    """Pop the waiting sequences to prefill together (at most ``free``; the padded batch
    within ``max_prefill_tokens`` unless it is one sequence); returns them and Q."""
    batch: list[Seq] = []
    longest = 0
    while waiting and len(batch) < free:
        cand = len(waiting[0].prompt) - waiting[0].cached
        if batch and max(longest, cand) * (len(batch) + 1) > max_prefill_tokens:
            break
        batch.append(waiting.popleft())
        longest = max(longest, cand)
    return batch, longest


def plan_prefill(
    batch: list[Seq],
    longest: int,
    row0: int,
    params: BatchParams,
    cache: SlotKVCache,
    masks: AttentionMasks,
    context_len: int,
) -> PrefillStep:
    """Give each sequence its slot row and lay out the forward of its uncached positions.

    An extend forward (some row restored from a session) writes the restored prefixes into
    their rows here, before the forward reads them.
    """
    device, n = masks.arange.device, len(batch)
    lens = [len(seq.prompt) for seq in batch]
    starts = [seq.cached for seq in batch]  # positions restored from a session
    ids_BQ = torch.zeros((n, longest), dtype=torch.long)
    for b, seq in enumerate(batch):
        ids_BQ[b, : lens[b] - starts[b]] = torch.tensor(seq.prompt[starts[b] :])
        seq.slot = row0 + b
    window = masks.ring
    if any(starts):
        plan, pos_BQ, step_masks = _extend_plan(batch, row0, longest, cache, masks, context_len)
    else:
        plan = StepPlan(prefill=True, row0=row0)
        if window is not None:  # sliding layers keep the last `window` keys of each row
            keep = [(b, q) for b in range(n) for q in range(max(0, lens[b] - window), lens[b])]
            keep_b_N = torch.tensor([b for b, _ in keep], device=device)
            keep_q_N = torch.tensor([q for _, q in keep], device=device)
            plan.keep_b_N, plan.keep_q_N = keep_b_N, keep_q_N
            plan.keep_rows_N, plan.keep_slot_N = keep_b_N + row0, keep_q_N % window
        cache.ensure_capacity(longest, context_len)
        pos_BQ = masks.arange[:longest][None].expand(n, -1)
        step_masks = masks.prefill(longest)
    return PrefillStep(
        batch, row0, lens, starts, longest, params, ids_BQ.to(device), pos_BQ, plan, step_masks
    )


def _extend_plan(
    batch: list[Seq],
    row0: int,
    q_len: int,
    cache: SlotKVCache,
    masks: AttentionMasks,
    context_len: int,
) -> tuple[StepPlan, torch.Tensor, Any]:
    """Restore each session row's cached prefix into its slot, and plan a forward of the
    remaining positions of every row (``start_b..len_b-1``; fresh rows start at 0)."""
    device, window = masks.arange.device, masks.ring
    lens = [len(seq.prompt) for seq in batch]
    starts = [seq.cached for seq in batch]
    kv_len = max(lens)
    cache.ensure_capacity(kv_len, context_len)
    for b, seq in enumerate(batch):
        if seq.cached:
            cache.restore_row(row0 + b, seq.snapshot.layers)
    new = [(b, q) for b in range(len(batch)) for q in range(lens[b] - starts[b])]
    ext_b_N = torch.tensor([b for b, _ in new], device=device)
    ext_q_N = torch.tensor([q for _, q in new], device=device)
    start_B = torch.tensor(starts, device=device)
    plan = StepPlan(prefill=True, extend=True, row0=row0, kv_len=kv_len)
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
    pos_BQ = start_B[:, None] + masks.arange[:q_len][None]
    return plan, pos_BQ, masks.extend(start_B, pos_BQ, kv_len)


def logit_positions(step: PrefillStep) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Where logits are needed: each row's last prompt position (to sample) plus the prompt
    positions whose log-probs were asked for. Returns batch rows [N] and query indices [N]
    into the forward's hidden states, and per row (its first pick, its first position)."""
    picks: list[tuple[int, int]] = []
    spans = []
    for b, seq in enumerate(step.batch):
        start = step.lens[b] - 1
        if seq.req.return_logprob and seq.req.logprob_start_len >= 0:
            start = seq.req.logprob_start_len
        spans.append((len(picks), start))
        picks.extend((b, p) for p in range(start, step.lens[b]))
    device = step.ids_BQ.device
    b_idx = torch.tensor([b for b, _ in picks], device=device)
    p_idx = torch.tensor([p - step.starts[b] for b, p in picks], device=device)
    return b_idx, p_idx, spans


def prompt_logprobs(
    step: PrefillStep, logits_NV: torch.Tensor, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Record the prompt log-probs each row asked for (the raw ``log_softmax``); returns the
    pick of each row's last position [B], whose logits sample its first token."""
    device = step.ids_BQ.device
    last_rows = []
    for b, seq in enumerate(step.batch):
        offset, start = spans[b]
        n_in = step.lens[b]
        if seq.req.return_logprob:
            raw_logp_NV = torch.log_softmax(logits_NV[offset : offset + n_in - start - 1], -1)
            # Position p scores token p+1; SGLang pads the first entry with None and drops
            # the last position's (it is the sampling step).
            nxt = seq.prompt[start + 1 : n_in]
            vals = []
            if nxt:
                nxt_N = torch.tensor(nxt, device=device)
                vals = raw_logp_NV.gather(1, nxt_N[:, None])[:, 0].tolist()
            seq.in_lp = [(None, seq.prompt[start]), *zip(vals, nxt, strict=True)]
            if seq.req.top_logprobs_num > 0:
                seq.in_top = [None, *top_entries(raw_logp_NV, seq.req.top_logprobs_num)]
        last_rows.append(offset + n_in - 1 - start)
    return torch.tensor(last_rows, device=device)


def start_rows(
    state: SlotState,
    step: PrefillStep,
    tokens_B: torch.Tensor,
    lp_B: torch.Tensor,
    routes_BQLk: torch.Tensor | None,
    context_len: int,
    routes_shape: tuple[int, int],
) -> None:
    """Write the prefilled rows' first state: the sampled token, positions cached, and the
    routes of every context position (restored ones keep the routes recorded when they first
    ran). ``routes_shape``: (L, k)."""
    batch, row0, lens, starts = step.batch, step.row0, step.lens, step.starts
    device, rows = state.device, slice(row0, row0 + len(batch))
    needs_token_B = torch.tensor([seq.limit > 0 for seq in batch], device=device)
    state.ensure_outputs(max(1, *(seq.limit for seq in batch)), context_len)
    state.tok_S[rows] = tokens_B
    state.pos_S[rows] = torch.tensor(lens, device=device)
    state.nout_S[rows] = needs_token_B.long()
    state.out_ST[rows, 0] = tokens_B
    state.lp_ST[rows, 0] = lp_B
    if routes_BQLk is None:
        return
    state.ensure_routes(max(lens), context_len, *routes_shape)
    if not any(starts):
        state.routes_STLk[rows, : step.longest] = routes_BQLk.to(device)
        return
    for b, seq in enumerate(batch):
        if seq.snapshot is not None and seq.snapshot.routes_TLk is not None:
            state.routes_STLk[row0 + b, : starts[b]] = seq.snapshot.routes_TLk
        new = lens[b] - starts[b]
        state.routes_STLk[row0 + b, starts[b] : lens[b]] = routes_BQLk[b, :new].to(device)
