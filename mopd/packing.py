"""Packing: ScoredSamples -> token-balanced MicroBatches (pure numpy, no torch).

One training step takes a list of ScoredSamples and hands every data-parallel rank the same
number of MicroBatches, each a flat row of whole sequences packed back to back (no padding).

Per sequence (prompt P tokens + response T tokens, S = P + T):

    tokens_S       = concat(prompt, response)
    loss_mask_S    = [False] * P + loss_mask_T    (the response tokens the policy generated:
                                                  all of them, or 0 on tool-observation tokens)
    logp_*_S       = [0] * P + logp_*_T           (position i scores tokens_S[i] given tokens < i;
                                                  0 where the loss mask is off)
    versions_S     = [-1] * P + versions_T
    routes_SLk     = routes_(S-1)Lk + its last row repeated: the engine never ran the last
                     sampled token forward, so it has no routing of its own; repeating the
                     previous row keeps the replayed ids real experts (see ``MicroBatch``).

Splitting (``pack_micro_batches``):

1. First-fit decreasing bin packing of the sequences (longest first) into micro-batches of at
   most ``micro_batch_tokens`` tokens. A sequence longer than the limit gets a micro-batch of
   its own, with a warning (it cannot be split: its tokens attend to each other).
2. The number of micro-batches is rounded up to a multiple of ``dp_size`` so every rank runs
   the same number of forward/backward passes (collectives stay in lockstep): the fullest
   micro-batch holding two or more sequences is split in two until the count is reached. If
   there are fewer sequences than needed, the remaining slots get a *filler*: one token, loss
   mask off, no sample id; it costs one token of compute and contributes no gradient.
3. Micro-batches go to ranks heaviest first, each to the rank with the fewest tokens so far
   among the ranks that still need micro-batches (token-balanced).

Every sample must agree on which optional fields it carries (teacher log-probs, routes): a mix
would silently train some sequences with another loss, so it is an error.

Shape suffixes: P prompt tokens, T response tokens, S = P + T, N packed tokens, B sequences,
L MoE layers, k experts per token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mopd.types import FLOAT, INT_TOKENS, MicroBatch, ScoredSample

__all__ = ["build_micro_batch", "pack_micro_batches", "sequence_length"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Seq:
    """One sample laid out as a whole sequence, every field aligned to its token."""

    tokens_S: np.ndarray
    loss_mask_S: np.ndarray
    logp_rollout_S: np.ndarray
    logp_teacher_S: np.ndarray | None
    topk_logp_SK: np.ndarray | None
    topk_ids_SK: np.ndarray | None
    versions_S: np.ndarray
    routes_SLk: np.ndarray | None
    adv: float
    sample_id: str
    domain: str

    @property
    def length(self) -> int:
        return int(self.tokens_S.shape[0])


def sequence_length(sample: ScoredSample) -> int:
    """Tokens the sample occupies in a micro-batch (prompt + response)."""
    return sample.sample.num_tokens


def _layout(scored: ScoredSample, routes_dtype: np.dtype | None) -> _Seq:
    s = scored.sample
    prompt_P = s.prompt.input_ids_P
    P = prompt_P.shape[0]
    zeros_P = np.zeros(P, dtype=FLOAT)
    generated_T = s.generated_mask_T
    teacher_S = None
    if scored.logp_teacher_T is not None:
        teacher_S = np.concatenate(
            [zeros_P, np.where(generated_T, scored.logp_teacher_T, FLOAT(0))]
        )
    topk_logp_SK = topk_ids_SK = None
    if scored.teacher_topk_logp_TK is not None and scored.teacher_topk_ids_TK is not None:
        K = scored.teacher_topk_logp_TK.shape[1]
        on_TK = generated_T[:, None]
        topk_logp_SK = np.concatenate(
            [np.zeros((P, K), FLOAT), np.where(on_TK, scored.teacher_topk_logp_TK, FLOAT(0))]
        )
        topk_ids_SK = np.concatenate(
            [np.zeros((P, K), np.int32), np.where(on_TK, scored.teacher_topk_ids_TK, 0)]
        ).astype(np.int32, copy=False)
    routes_SLk = None
    if s.routes_SLk is not None and routes_dtype is not None:
        r = s.routes_SLk.astype(routes_dtype, copy=False)
        # A one-token sequence has no routed row at all; any valid id will do (no loss there).
        last = r[-1:] if r.shape[0] else np.zeros((1, *r.shape[1:]), dtype=routes_dtype)
        routes_SLk = np.concatenate([r, last], axis=0)
    return _Seq(
        tokens_S=np.concatenate([prompt_P, s.response_ids_T]).astype(INT_TOKENS, copy=False),
        loss_mask_S=np.concatenate([np.zeros(P, dtype=bool), generated_T]),
        logp_rollout_S=np.concatenate([zeros_P, np.where(generated_T, s.logp_rollout_T, FLOAT(0))]),
        logp_teacher_S=teacher_S,
        topk_logp_SK=topk_logp_SK,
        topk_ids_SK=topk_ids_SK,
        versions_S=np.concatenate([np.full(P, -1, dtype=np.int32), s.versions_T]),
        routes_SLk=routes_SLk,
        adv=float(scored.advantage),
        sample_id=s.sample_id,
        domain=s.prompt.domain,
    )


def _check_consistent(samples: Sequence[ScoredSample]) -> np.dtype | None:
    """Validate that optional fields are all-or-none; return the routes dtype (None: no routes)."""
    if not samples:
        raise ValueError("no samples to pack; a training step needs at least one ScoredSample")
    for x in samples:
        if not isinstance(x, ScoredSample):
            raise ValueError(f"pack expects ScoredSample records, got {type(x).__name__}")
    with_teacher = [x.logp_teacher_T is not None for x in samples]
    if any(with_teacher) and not all(with_teacher):
        missing = [x.sample.sample_id for x, t in zip(samples, with_teacher) if not t][:5]
        raise ValueError(
            f"samples {missing} carry no teacher log-probs while others do; score every "
            "sample of a MOPD batch with its domain teacher (or none of them)"
        )
    topk_k = {
        None if x.teacher_topk_logp_TK is None else x.teacher_topk_logp_TK.shape[1] for x in samples
    }
    if len(topk_k) > 1:
        raise ValueError(
            f"samples carry teacher top-k log-probs of different widths {sorted(map(str, topk_k))}"
            "; give every teacher the same top_logprobs (or none of them)"
        )
    routes = [x.sample.routes_SLk for x in samples]
    have = [r is not None for r in routes]
    if not any(have):
        return None
    if not all(have):
        missing = [x.sample.sample_id for x, h in zip(samples, have) if not h][:5]
        raise ValueError(
            f"samples {missing} carry no routes while others do; record routed experts for "
            "every sample (rollout.return_routed_experts) or for none"
        )
    shapes = {r.shape[1:] for r in routes if r is not None}
    if len(shapes) != 1:
        raise ValueError(
            f"samples carry routes of different [L, k] shapes {sorted(shapes)}; were they "
            "generated by different models?"
        )
    wide = any(r.dtype == np.uint16 for r in routes if r is not None)
    return np.dtype(np.uint16 if wide else np.uint8)


def _micro_batch(seqs: Sequence[_Seq]) -> MicroBatch:
    lengths = [q.length for q in seqs]
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    teacher = [q.logp_teacher_S for q in seqs if q.logp_teacher_S is not None]
    topk_logp = [q.topk_logp_SK for q in seqs if q.topk_logp_SK is not None]
    topk_ids = [q.topk_ids_SK for q in seqs if q.topk_ids_SK is not None]
    routes = [q.routes_SLk for q in seqs if q.routes_SLk is not None]
    ids = tuple(q.sample_id for q in seqs)
    return MicroBatch(
        tokens_N=np.concatenate([q.tokens_S for q in seqs]),
        cu_seqlens_B1=cu,
        loss_mask_N=np.concatenate([q.loss_mask_S for q in seqs]),
        logp_rollout_N=np.concatenate([q.logp_rollout_S for q in seqs]),
        adv_orm_B=np.asarray([q.adv for q in seqs], dtype=FLOAT),
        logp_teacher_N=np.concatenate(teacher) if teacher else None,
        teacher_topk_logp_NK=np.concatenate(topk_logp) if topk_logp else None,
        teacher_topk_ids_NK=np.concatenate(topk_ids) if topk_ids else None,
        versions_N=np.concatenate([q.versions_S for q in seqs]),
        routes_NLk=np.concatenate(routes) if routes else None,
        sample_ids=ids if all(ids) else (),
        domains=tuple(q.domain for q in seqs),
    )


def build_micro_batch(samples: Sequence[ScoredSample]) -> MicroBatch:
    """Pack ``samples`` into one MicroBatch, in the given order, whatever their total length."""
    dtype = _check_consistent(samples)
    return _micro_batch([_layout(x, dtype) for x in samples])


def _filler(like: _Seq) -> _Seq:
    """A one-token sequence with the loss off: keeps every rank's micro-batch count equal."""
    return _Seq(
        tokens_S=like.tokens_S[:1].copy(),
        loss_mask_S=np.zeros(1, dtype=bool),
        logp_rollout_S=np.zeros(1, dtype=FLOAT),
        logp_teacher_S=None if like.logp_teacher_S is None else np.zeros(1, dtype=FLOAT),
        topk_logp_SK=None if like.topk_logp_SK is None else np.zeros_like(like.topk_logp_SK[:1]),
        topk_ids_SK=None if like.topk_ids_SK is None else np.zeros_like(like.topk_ids_SK[:1]),
        versions_S=np.full(1, -1, dtype=np.int32),
        routes_SLk=None if like.routes_SLk is None else like.routes_SLk[:1].copy(),
        adv=0.0,
        sample_id="",
        domain=like.domain,
    )


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices, each summing to <= capacity (or one oversized sequence)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def _split(bin_: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Two halves of a bin with about equal tokens (longest first to the lighter half)."""
    halves: tuple[list[int], list[int]] = ([], [])
    load = [0, 0]
    for i in sorted(bin_, key=lambda i: (-lengths[i], i)):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(i)
        load[h] += lengths[i]
    return halves


def pack_micro_batches(
    samples: Sequence[ScoredSample], *, micro_batch_tokens: int, dp_size: int = 1
) -> list[list[MicroBatch]]:
    """Split one step's samples into token-balanced micro-batches per data-parallel rank.

    Args:
        samples: the step's ScoredSamples (all with or all without teacher log-probs/routes).
        micro_batch_tokens: most tokens in one micro-batch (``TrainerConfig.micro_batch_tokens``);
            a longer single sequence gets a micro-batch of its own (with a warning).
        dp_size: data-parallel ranks.

    Returns:
        ``per_rank[r]`` is rank r's list of MicroBatches; every rank gets the same number.
        Sequences keep their sample order inside a micro-batch.
    """
    if isinstance(micro_batch_tokens, bool) or not isinstance(micro_batch_tokens, int):
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens!r} must be a positive int")
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens} must be >= 1")
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size={dp_size!r} must be a positive int")
    dtype = _check_consistent(samples)
    seqs = [_layout(x, dtype) for x in samples]
    lengths = [q.length for q in seqs]
    for q in seqs:
        if q.length > micro_batch_tokens:
            log.warning(
                "sample %s has %d tokens, more than micro_batch_tokens=%d: it gets a "
                "micro-batch of its own (raise trainer.micro_batch_tokens to avoid the peak)",
                q.sample_id,
                q.length,
                micro_batch_tokens,
            )

    bins = _first_fit_decreasing(lengths, micro_batch_tokens)
    per_rank = -(-len(bins) // dp_size)
    target = per_rank * dp_size

    def tokens(b: list[int]) -> int:
        return sum(lengths[i] for i in b)

    while len(bins) < target:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            break
        fullest = max(splittable, key=tokens)
        bins.remove(fullest)
        bins.extend(_split(fullest, lengths))

    batches: list[list[_Seq]] = [[seqs[i] for i in sorted(b)] for b in bins]
    if len(batches) < target:
        log.info(
            "%d sequences for %d ranks x %d micro-batches: adding %d one-token fillers",
            len(seqs),
            dp_size,
            per_rank,
            target - len(batches),
        )
        shortest = min(seqs, key=lambda q: q.length)
        batches.extend([[_filler(shortest)] for _ in range(target - len(batches))])

    # Heaviest first, to the lightest rank that still has room.
    order = sorted(range(len(batches)), key=lambda j: -sum(q.length for q in batches[j]))
    ranks: list[list[MicroBatch]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for j in order:
        r = min((r for r in range(dp_size) if len(ranks[r]) < per_rank), key=lambda r: load[r])
        ranks[r].append(_micro_batch(batches[j]))
        load[r] += sum(q.length for q in batches[j])
    return ranks
