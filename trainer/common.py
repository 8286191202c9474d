"""The half of a training step that does not depend on the backend.

Both trainer backends (``trainer.torch_backend.TorchTrainer`` on transformers models,
``trainer.megatron.backend.MegatronTrainer`` on Megatron-core) run the same step around
their own forward pass::

    step_weights(micro_batches)          each micro-batch's share of the step's aggregation
    for every micro-batch:
        b = to_batch(mb, ...)            MicroBatch -> PackedBatch (device tensors)
        logits_NV = <backend forward>    the only model-specific part (and R3's binding)
        loss_logprobs(logits_NV, b)      log-probs at the loss positions, in [B, T]
        RegistryLoss(cfg)(logp_BT, b)    the registry loss (mopd.algo); no math here
        record_loss_metrics / token_metrics
    gather_metrics(...)                  sums and weighted means over data-parallel ranks

What stays in a backend is what really differs: how the packed row is fed to the model
(batch-of-one with restarting ``position_ids`` vs Megatron's THD layout with ``cu_seqlens``),
how routes are replayed, the optimizer, and the checkpoint format.

Shape suffixes: N tokens of a packed micro-batch, B sequences, T positions of the longest
sequence, V vocabulary, M loss positions, L MoE layers, k experts per token.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mopd.algo import (
    entropy_from_logits,
    gather_log_softmax,
    kl_k1,
    selective_log_softmax,
    train_rollout_mismatch,
)
from mopd.algo.stages import LossInputs, stage_for
from mopd.config.schema import AlgorithmConfig
from mopd.types import MicroBatch

__all__ = [
    "NO_ROUTES_WARNING",
    "PackedBatch",
    "RegistryLoss",
    "StepMetrics",
    "all_reduce_sum",
    "gather_metrics",
    "loss_count",
    "loss_kwargs",
    "loss_logprobs",
    "record_loss_metrics",
    "resolve_dtype",
    "sequence_logprobs",
    "shared_token",
    "step_weights",
    "to_batch",
    "token_metrics",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Loss metrics that are means over samples (the rest are means over valid tokens).
_SAMPLE_MEANS = frozenset({"orm_adv_mean"})
# Loss metrics that add up across micro-batches.
_SUMS = frozenset({"num_tokens", "num_samples"})
# Metrics that are maxima across micro-batches and ranks.
_MAXES = frozenset({"staleness_max"})

NO_ROUTES_WARNING = (
    "routing_replay is on but micro-batches carry no routes: the trainer uses "
    "its own routing (enable rollout.return_routed_experts)"
)


def resolve_dtype(name: str, device: torch.device, *, field: str = "trainer.dtype") -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r}; accepted values: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


# ---------------------------------------------------------------------- the loss


def loss_kwargs(cfg: AlgorithmConfig) -> dict[str, Any]:
    """Keyword arguments of the stage loss ``cfg.loss`` taken from the algorithm config."""
    return stage_for(cfg.loss).loss_kwargs(cfg)


def loss_count(mb: MicroBatch, aggregation: str) -> int:
    """What a micro-batch adds to the step's aggregation denominator: non-empty sequences
    (``seq_mean_token_mean``) or loss tokens (``token_mean``)."""
    if aggregation == "token_mean":
        return int(mb.loss_mask_N.sum())
    per_seq = np.add.reduceat(mb.loss_mask_N.astype(np.int64), mb.cu_seqlens_B1[:-1])
    return int((per_seq > 0).sum())


def step_weights(
    micro_batches: Sequence[MicroBatch],
    aggregation: str,
    sum_over_ranks: Callable[[list[float]], list[float]],
) -> list[float]:
    """Each micro-batch's loss weight: its count / the step's count over all micro-batches of
    all data-parallel ranks (``sum_over_ranks`` all-reduces), so that the accumulated gradient
    is the gradient of the aggregation over the whole step."""
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    counts = [loss_count(mb, aggregation) for mb in micro_batches]
    (denom,) = sum_over_ranks([float(sum(counts))])
    denom = max(denom, 1.0)
    return [c / denom for c in counts]


class RegistryLoss:
    """The loss of the stage ``AlgorithmConfig.loss`` selects (``mopd.algo.stages``), its
    keyword arguments bound from the config, called with the tensors of a ``PackedBatch``.
    Which stage it is, it does not know: the stage reads what it needs from ``LossInputs``."""

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.stage = stage_for(cfg.loss)
        self.kwargs = self.stage.loss_kwargs(cfg)
        self.topk = self.stage.wants_topk(cfg)

    def __call__(
        self, logp_BT: torch.Tensor, b: PackedBatch, logits_MV: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, metrics)`` of the micro-batch for the trained log-probs ``logp_BT``;
        ``logits_MV`` (the logits that predict the loss tokens, from ``loss_logprobs``) feed the
        student's side of ``teacher_kl=topk``."""
        return self.stage.loss(loss_inputs(logp_BT, b, logits_MV, topk=self.topk), **self.kwargs)


def loss_inputs(
    logp_BT: torch.Tensor, b: PackedBatch, logits_MV: torch.Tensor | None, *, topk: bool
) -> LossInputs:
    """The ``LossInputs`` of a micro-batch: built once, read by whichever stage trains."""
    pair = _topk_pair(b, logits_MV) if topk else {}
    return LossInputs(
        logp_train_BT=logp_BT,
        logp_rollout_BT=b.logp_rollout_BT,
        adv_orm_B=b.adv_B,
        mask_BT=b.mask_BT,
        logp_teacher_BT=b.logp_teacher_BT,
        **pair,
    )


def _topk_pair(b: PackedBatch, logits_MV: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probs [B, T, K] and the student's log-probs at the same ids
    (differentiable, from the loss tokens' logits), for ``teacher_kl=topk``."""
    if b.teacher_topk_logp_BTK is None or b.teacher_topk_ids_BTK is None:
        raise ValueError(
            "algorithm.teacher_kl=topk needs the teacher's top-k log-probs, but a micro-batch "
            "has none; set teachers[*].top_logprobs to k >= 1 so the scorer returns them"
        )
    if logits_MV is None:
        raise ValueError("teacher_kl=topk needs the loss tokens' logits (from loss_logprobs)")
    ids_MK = b.teacher_topk_ids_BTK[b.seq_M, b.pos_M]
    student_MK = gather_log_softmax(logits_MV, ids_MK)  # chunked: no [M, V] fp32 copy
    student_BTK = torch.zeros_like(b.teacher_topk_logp_BTK).index_put(
        (b.seq_M, b.pos_M), student_MK
    )
    return {"teacher_topk_logp_BTK": b.teacher_topk_logp_BTK, "student_topk_logp_BTK": student_BTK}


# ---------------------------------------------------------------------- micro-batch -> tensors


@dataclass
class PackedBatch:
    """One micro-batch on the device: the packed row the forward runs and the [B, T] layout
    the loss and the metrics take. Built by ``to_batch``; consumed by a backend's forward and
    by the functions of this module."""

    tokens_N: torch.Tensor  # int64; the real tokens, then padding up to ``run_tokens``, if any
    positions_N: torch.Tensor  # int64 [num_tokens]: offset of each real token in its sequence
    cu_B1: torch.Tensor  # int32 sequence boundaries, incl. the padding sequence, if any
    num_tokens: int  # real tokens (before padding)
    rows_M: torch.Tensor  # token positions that carry loss (never a sequence start)
    seq_M: torch.Tensor  # their sequence index
    pos_M: torch.Tensor  # their offset inside the sequence
    mask_BT: torch.Tensor
    logp_rollout_BT: torch.Tensor
    logp_teacher_BT: torch.Tensor | None
    teacher_topk_logp_BTK: torch.Tensor | None  # teacher_kl=topk: the teacher's top-k log-probs
    teacher_topk_ids_BTK: torch.Tensor | None  # int64, their token ids
    adv_B: torch.Tensor
    routes_NLk: torch.Tensor | None  # padded like tokens_N
    agree_N: torch.Tensor  # rows whose route is a recorded choice (padded like tokens_N)
    starts_B: torch.Tensor
    domains: tuple[str, ...]


def to_batch(
    mb: MicroBatch,
    device: torch.device,
    vocab_size: int,
    *,
    run_tokens: int | None = None,
    select_routes: Callable[[np.ndarray], np.ndarray] | None = None,
) -> PackedBatch:
    """Check a micro-batch against the model and move it to ``device`` as a ``PackedBatch``.

    Args:
        mb: the micro-batch; its first token of every sequence must carry no loss and every
            token id must be below ``vocab_size`` (a clear error otherwise).
        device: where the tensors go.
        vocab_size: the model's vocabulary (the embedding rows).
        run_tokens: run the row as this many tokens (>= ``mb.num_tokens``): the real ones,
            then one padding sequence that is never scored and whose route rows are never
            measured. Megatron needs it (sequence parallelism splits the row into equal
            parts; see ``MegatronTrainer._run_lengths``); None runs the row as it is.
        select_routes: maps the recorded ``routes_NLk`` to the layout the backend replays,
            after the checks above; None keeps them as recorded.
    """
    if not isinstance(mb, MicroBatch):
        raise ValueError(f"forward_backward expects MicroBatch records, got {type(mb).__name__}")
    cu = mb.cu_seqlens_B1.astype(np.int64)
    B, N = mb.num_sequences, mb.num_tokens
    lengths = np.diff(cu)
    if mb.loss_mask_N[cu[:-1]].any():
        raise ValueError(
            "a sequence's first token carries loss, but it has no preceding context to be "
            "predicted from; the first token of every sequence must be a prompt token"
        )
    if N and (int(mb.tokens_N.min()) < 0 or int(mb.tokens_N.max()) >= vocab_size):
        raise ValueError(
            f"token ids span [{mb.tokens_N.min()}, {mb.tokens_N.max()}] but the model has "
            f"vocab_size={vocab_size}; were the samples tokenized for another model?"
        )
    seq_N = np.repeat(np.arange(B), lengths)
    pos_N = np.arange(N) - cu[seq_N]
    T = int(lengths.max())
    rows = np.flatnonzero(mb.loss_mask_N)

    def padded(x_N: np.ndarray, dtype: type = np.float32) -> torch.Tensor:
        """[N, ...] per-token values at the loss rows -> [B, T, ...], zero elsewhere."""
        out = np.zeros((B, T, *x_N.shape[1:]), dtype=dtype)
        out[seq_N[rows], pos_N[rows]] = x_N[rows]
        return torch.from_numpy(out).to(device)

    mask_BT = np.zeros((B, T), dtype=bool)
    mask_BT[seq_N[rows], pos_N[rows]] = True
    pad = 0 if run_tokens is None else run_tokens - N
    tokens = np.concatenate([mb.tokens_N.astype(np.int64), np.zeros(pad, np.int64)])
    cu_run = np.concatenate([cu, [N + pad]]) if pad else cu
    agree_N = np.zeros(N + pad, dtype=bool)
    agree_N[:N] = True
    agree_N[cu[1:] - 1] = False  # the last token's route row is a copy, not a recorded choice
    routes = None
    if mb.routes_NLk is not None:
        r = mb.routes_NLk if select_routes is None else select_routes(mb.routes_NLk)
        if pad:
            # Distinct ids per row, like any top-k choice (expert 0, 1, ..., k-1).
            fill = np.broadcast_to(np.arange(r.shape[2], dtype=r.dtype), (pad, *r.shape[1:]))
            r = np.concatenate([r, fill])
        routes = torch.from_numpy(r).to(device)
    return PackedBatch(
        tokens_N=torch.from_numpy(tokens).to(device),
        positions_N=torch.from_numpy(pos_N).to(device),
        cu_B1=torch.from_numpy(cu_run.astype(np.int32)).to(device),
        num_tokens=N,
        rows_M=torch.from_numpy(rows).to(device),
        seq_M=torch.from_numpy(seq_N[rows]).to(device),
        pos_M=torch.from_numpy(pos_N[rows]).to(device),
        mask_BT=torch.from_numpy(mask_BT).to(device),
        logp_rollout_BT=padded(mb.logp_rollout_N),
        logp_teacher_BT=None if mb.logp_teacher_N is None else padded(mb.logp_teacher_N),
        teacher_topk_logp_BTK=None
        if mb.teacher_topk_logp_NK is None
        else padded(mb.teacher_topk_logp_NK),
        teacher_topk_ids_BTK=None
        if mb.teacher_topk_ids_NK is None
        else padded(mb.teacher_topk_ids_NK, np.int64),
        adv_B=torch.from_numpy(mb.adv_orm_B).to(device),
        routes_NLk=routes,
        agree_N=torch.from_numpy(agree_N).to(device),
        starts_B=torch.from_numpy(cu[:-1]).to(device),
        domains=mb.domains,
    )


# ---------------------------------------------------------------------- log-probs


def loss_logprobs(logits_NV: torch.Tensor, b: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_MV, logp_BT)``: the logits that predict each loss token (position i - 1 scores
    token i) and their log-probs scattered into the loss's [B, T] layout (0 elsewhere)."""
    logits_MV = logits_NV[b.rows_M - 1]
    logp_M = selective_log_softmax(logits_MV, b.tokens_N[b.rows_M])
    logp_BT = torch.zeros_like(b.logp_rollout_BT).index_put((b.seq_M, b.pos_M), logp_M)
    return logits_MV, logp_BT


def sequence_logprobs(logits_NV: torch.Tensor, b: PackedBatch) -> np.ndarray:
    """float32 [num_tokens]: entry i is log p(tokens_N[i] | the tokens of its sequence before
    i); 0 at the first token of every sequence. ``logits_NV`` covers the real tokens."""
    logp_N = torch.zeros(b.num_tokens, dtype=torch.float32, device=b.tokens_N.device)
    if b.num_tokens > 1:
        logp_N[1:] = selective_log_softmax(logits_NV[:-1], b.tokens_N[1 : b.num_tokens])
    logp_N[b.starts_B] = 0.0
    return logp_N.cpu().numpy()


# ---------------------------------------------------------------------- metrics


class StepMetrics:
    """Sums, maxima and weighted means gathered over micro-batches (and ranks)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.means: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add_sum(self, key: str, value: float) -> None:
        self.sums[key] += float(value)

    def add_max(self, key: str, value: float) -> None:
        """Keep the largest value of ``key`` (one of the maxima ``merge`` knows)."""
        if key not in _MAXES:
            # merge() would add it up over ranks instead of taking the maximum.
            raise ValueError(f"{key!r} is not a known maximum metric; add it to _MAXES")
        self.sums[key] = max(self.sums[key], value)

    def add_mean(self, key: str, value: float, weight: float) -> None:
        acc = self.means[key]
        acc[0] += float(value) * weight
        acc[1] += float(weight)

    def merge(self, sums: dict[str, float], means: dict[str, list[float]]) -> None:
        """Add another accumulator's state (``sums``, ``means`` as gathered from a rank)."""
        for k, v in sums.items():
            if k in _MAXES:
                self.sums[k] = max(self.sums.get(k, v), v)
            else:
                self.sums[k] += v
        for k, (s, w) in means.items():
            self.means[k][0] += s
            self.means[k][1] += w

    def result(self) -> dict[str, float]:
        out = dict(self.sums)
        for k, (s, w) in self.means.items():
            if w > 0:
                out[k] = s / w
        return out


def record_loss_metrics(
    m: StepMetrics, lm: dict[str, float], weight: float, num_tokens: int
) -> float:
    """Add a micro-batch's loss metrics ``lm`` (weighted ``loss``; ``num_tokens`` and
    ``num_samples`` summed; the rest token-weighted, ``orm_adv_mean`` sample-weighted) and the
    tokens it ran. Returns its number of loss tokens (the token-metric weight)."""
    ntok = float(lm.get("num_tokens", 0.0))
    m.add_sum("loss", lm["loss"] * weight)
    m.add_sum("tokens", num_tokens)
    for key, value in lm.items():
        if key == "loss":
            continue
        if key in _SUMS:
            m.add_sum(key, value)
        else:
            m.add_mean(key, value, lm["num_samples"] if key in _SAMPLE_MEANS else ntok)
    return ntok


ENTROPY_ROWS = 2048
"""The ``entropy`` metric of a micro-batch is the mean over at most this many of its loss
tokens, evenly spaced (all of them when it has fewer)."""


@torch.no_grad()
def token_metrics(
    m: StepMetrics,
    mb: MicroBatch,
    b: PackedBatch,
    logits_MV: torch.Tensor,
    logp_BT: torch.Tensor,
    ntok: float,
    cfg: AlgorithmConfig,
    version: int,
) -> None:
    """Add a micro-batch's ``entropy``, ``train_rollout_k3`` (stages that sample: not sft),
    ``staleness_max`` (against the trainer's ``version``), and per domain
    ``teacher_log_ratio/<d>`` (student side: the log-probs ``cfg.student_logprob_source``
    names) and ``orm_adv/<d>``; all token-weighted except ``orm_adv`` (per sample)."""
    if ntok == 0:
        return
    logp_BT = logp_BT.detach()
    # The entropy metric over evenly spaced loss tokens: a full pass over [tokens, vocab] for
    # a logged number cost 10% of a GPU step.
    stride = max(1, -(-logits_MV.shape[0] // ENTROPY_ROWS))
    sample_KV = logits_MV.detach()[::stride]
    m.add_mean("entropy", float(entropy_from_logits(sample_KV).mean()), ntok)
    if stage_for(cfg.loss).measures_train_rollout_mismatch:
        k3 = train_rollout_mismatch(b.logp_rollout_BT, logp_BT, b.mask_BT)
        m.add_mean("train_rollout_k3", float(k3), ntok)
    if mb.versions_N is not None and mb.loss_mask_N.any():
        oldest = int(mb.versions_N[mb.loss_mask_N].min())
        if oldest >= 0:
            m.add_max("staleness_max", version - oldest)
    if not b.domains:
        return
    seq_tokens_B = b.mask_BT.sum(dim=1).cpu().numpy()
    term_B = None
    if b.logp_teacher_BT is not None:
        student_BT = logp_BT if cfg.student_logprob_source == "train" else b.logp_rollout_BT
        term_BT = torch.where(b.mask_BT, kl_k1(b.logp_teacher_BT, student_BT), 0.0)
        term_B = term_BT.sum(dim=1).cpu().numpy()
    for d in sorted(set(b.domains)):
        sel = np.array([x == d for x in b.domains]) & (seq_tokens_B > 0)
        if not sel.any():
            continue
        n = float(seq_tokens_B[sel].sum())
        if term_B is not None:
            m.add_mean(f"teacher_log_ratio/{d}", float(term_B[sel].sum()) / n, n)
        m.add_mean(f"orm_adv/{d}", float(mb.adv_orm_B[sel].mean()), float(sel.sum()))


# ---------------------------------------------------------------------- collectives


def all_reduce_sum(
    values: list[float], *, size: int, device: torch.device, group: Any = None
) -> list[float]:
    """Sum ``values`` over the ``size`` ranks of ``group`` (None: the default group), fp64."""
    if size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def gather_metrics(m: StepMetrics, *, size: int, group: Any = None) -> StepMetrics:
    """The metrics of all ``size`` ranks of ``group`` merged (every rank gets them)."""
    if size == 1:
        return m
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, (dict(m.sums), dict(m.means)), group=group)
    out = StepMetrics()
    for sums, means in gathered:
        out.merge(sums, {k: list(v) for k, v in means.items()})
    return out


def shared_token(world_size: int) -> str:
    """A random hex token, rank 0's on every rank (names a checkpoint's temporary folder)."""
    token = [uuid.uuid4().hex]
    if world_size > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]
