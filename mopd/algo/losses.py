"""Token-level losses for the three training stages (algorithms.md, stages 1-3).

MOPD (stage 3, eq. 7-9 of the MiMo-V2-Flash report). Per response token t of sample y:

    r_t  = exp(logp_train_t - logp_rollout_t)                    pi_theta / mu_theta
    w_t  = sg[r_t] if eps_low <= r_t <= eps_high else 0           mask (IcePop), never clip
    A_t  = sg[logp_teacher_t - logp_student_t] + alpha * A_orm(y)
    loss = -mean_over_samples( (1/|y|) sum_t w_t * A_t * logp_train_t )

``sg`` is stop-gradient: the gradient flows only through the last ``logp_train_t``. The student
log-prob inside A_t is ``logp_train`` (``student_logprob_source="train"``, eq. 8) or the rollout
engine's ``logp_rollout`` (``"rollout"``).

Top-k variant (``teacher_kl="topk"``): at each response position the teacher term is the reverse
KL(student || teacher) over the teacher's top-k token ids, both sides renormalised there, and it
is a differentiable loss term of its own (the student's log-probs at those ids carry the
gradient), so the position's whole distribution moves towards the teacher's:

    loss_t = w_t * KL_topk,t  -  w_t * alpha * A_orm(y) * logp_train_t

It is deliberately not a stop-gradient advantage on the sampled token: -KL_t depends only on
the prefix, not on the token sampled at t, so as a weight on logp_train_t its expected gradient
is zero (pure noise). The reported ``teacher_log_ratio`` is -KL_topk (an estimate of -KL).

Teacher RL (stage 2) is the same estimator with A_t = A_orm and an importance correction of
choice (``mask`` as above, ``truncate``, or a PPO clipped surrogate), plus an optional k3 penalty
to a reference policy. MOPD with alpha = 1 and a zero teacher term equals it with ``mask``.

SFT (stage 1) is the token cross-entropy -logp on response tokens.

Aggregation (all losses): ``seq_mean_token_mean`` (eq. 7, default) averages tokens inside each
sample, then samples; ``token_mean`` sums all valid tokens of the batch and divides by their
count. Samples with an empty mask are left out; an all-empty batch gives loss 0 with a zero (not
NaN) gradient. Values at mask-off positions are never read, so padding may hold -inf or NaN.
Inputs in bf16/fp16 are upcast: all math, the loss and the metrics are fp32.

Every loss returns ``(loss, metrics)``: a 0-dim fp32 tensor and a dict of python floats. Their
option strings and argument checks live in ``mopd.algo.loss_args`` (a ValueError naming the
argument for a bad input); ``mopd.algo.stages`` calls them from a ``LossInputs`` record.

Shape suffixes: B sequences, T response tokens, K top-k entries per position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mopd.algo._check import check_choice, check_same_shape, check_tensor
from mopd.algo.kl import kl_k3
from mopd.algo.loss_args import (
    AGGREGATIONS,
    IS_CORRECTIONS,
    STUDENT_LOGPROB_SOURCES,
    TEACHER_KL_MODES,
    check_mopd_args,
    check_pg_args,
    check_sft_args,
)

__all__ = [
    "AGGREGATIONS",
    "IS_CORRECTIONS",
    "STUDENT_LOGPROB_SOURCES",
    "TEACHER_KL_MODES",
    "aggregate",
    "mopd_loss",
    "policy_gradient_loss",
    "sft_loss",
    "topk_reverse_kl",
]

Metrics = dict[str, float]


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _clean(x_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """fp32 copy with mask-off entries set to 0. ``where`` (not a product) keeps an inf/NaN in
    padding out of both the forward value and the gradient."""
    zero = torch.zeros((), dtype=torch.float32, device=x_BT.device)
    return torch.where(valid_BT, x_BT.float(), zero)


def aggregate(per_token_BT: torch.Tensor, valid_BT: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce a per-token loss (already 0 at mask-off positions) to a scalar.

    ``seq_mean_token_mean``: mean over the tokens of each non-empty sample, then over those
    samples. ``token_mean``: sum over valid tokens / number of valid tokens. Empty -> 0.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    tokens_B = valid_BT.sum(dim=1).to(torch.float32)
    if aggregation == "token_mean":
        return per_token_BT.sum() / tokens_B.sum().clamp_min(1.0)
    per_sample_B = per_token_BT.sum(dim=1) / tokens_B.clamp_min(1.0)
    return per_sample_B.sum() / (tokens_B > 0).sum().clamp_min(1).to(torch.float32)


def _masked_mean(x_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    return _clean(x_BT, valid_BT).sum() / valid_BT.sum().clamp_min(1).to(torch.float32)


def _orm_mean(adv: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """Mean A_orm over non-empty samples ([B] input) or valid tokens ([B, T] input)."""
    if adv.ndim == 1:
        nonempty_B = valid_BT.any(dim=1)
        adv_B = torch.where(nonempty_B, adv.float(), torch.zeros_like(adv, dtype=torch.float32))
        return adv_B.sum() / nonempty_B.sum().clamp_min(1).to(torch.float32)
    return _masked_mean(adv, valid_BT)


def _to_floats(**scalars: torch.Tensor | float) -> Metrics:
    """Turn metric tensors into python floats with a single device sync."""
    names = list(scalars)
    values = [
        v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        for v in scalars.values()
    ]
    devices = {v.device for v in values}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    return dict(zip(names, torch.stack([v.to(device) for v in values]).tolist()))


def _is_mask_weights(
    log_ratio_BT: torch.Tensor, valid_BT: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_BT, w_BT, zeroed_BT) for the masked importance weight; all detached, fp32."""
    r_BT = torch.exp(log_ratio_BT.detach())
    keep_BT = (r_BT >= eps_low) & (r_BT <= eps_high) & valid_BT
    w_BT = torch.where(keep_BT, r_BT, torch.zeros_like(r_BT))
    return r_BT, w_BT, valid_BT & ~keep_BT


# ---------------------------------------------------------------------------------------------
# Stage 3: MOPD
# ---------------------------------------------------------------------------------------------


def topk_reverse_kl(
    teacher_topk_logp_BTK: torch.Tensor, student_topk_logp_BTK: torch.Tensor
) -> torch.Tensor:
    """Reverse KL(student || teacher) over the teacher's top-k support, both renormalised.

    teacher_topk_logp_BTK: the teacher's log-probs (over its full vocabulary) of its K most
    likely tokens at each position; student_topk_logp_BTK: the student's log-probs of the same
    token ids. Entries where the teacher log-prob is -inf are padding and leave the support.
    Both distributions are renormalised over the support (q = softmax(student), p =
    softmax(teacher) over the K entries) and the result is sum_k q_k (log q_k - log p_k) >= 0,
    shape [B, T], fp32. Differentiable with respect to the student's log-probs (the teacher's are
    constants); wrap it in ``torch.no_grad()`` for a metric.
    """
    check_tensor("teacher_topk_logp_BTK", teacher_topk_logp_BTK, ndim=3)
    check_tensor("student_topk_logp_BTK", student_topk_logp_BTK, ndim=3)
    check_same_shape(
        "student_topk_logp_BTK",
        student_topk_logp_BTK,
        "teacher_topk_logp_BTK",
        teacher_topk_logp_BTK,
    )
    t_BTK = teacher_topk_logp_BTK.detach().float()
    s_BTK = student_topk_logp_BTK.float()
    support_BTK = torch.isfinite(t_BTK)
    neg_inf = torch.full((), -math.inf, device=t_BTK.device)
    t_BTK = torch.where(support_BTK, t_BTK, neg_inf)
    s_BTK = torch.where(support_BTK, s_BTK, neg_inf)
    logp_BTK = torch.log_softmax(t_BTK, dim=-1)
    logq_BTK = torch.log_softmax(s_BTK, dim=-1)
    # q = 0 entries (padding, or a student prob that underflowed) contribute 0, not 0 * inf;
    # the -inf entries are replaced before the product so that no NaN reaches the gradient.
    live_BTK = logq_BTK > -math.inf
    zero = torch.zeros((), device=t_BTK.device)
    logq_c = torch.where(live_BTK, logq_BTK, zero)
    logp_c = torch.where(live_BTK, logp_BTK, zero)
    contrib_BTK = torch.where(live_BTK, logq_c.exp() * (logq_c - logp_c), zero)
    return contrib_BTK.sum(dim=-1)


def mopd_loss(
    logp_train_BT: torch.Tensor,
    logp_rollout_BT: torch.Tensor,
    logp_teacher_BT: torch.Tensor | None,
    adv_orm_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    alpha: float = 1.0,
    eps_low: float = 0.5,
    eps_high: float = 2.0,
    aggregation: str = "seq_mean_token_mean",
    student_logprob_source: str = "train",
    teacher_kl: str = "sampled",
    teacher_topk_logp_BTK: torch.Tensor | None = None,
    student_topk_logp_BTK: torch.Tensor | None = None,
    domains_B: Sequence[str] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Multi-teacher on-policy distillation loss (eq. 7-9), see the module docstring.

    Args:
        logp_train_BT: [B, T] trainer log-probs of the sampled tokens (the only input that
            receives a gradient).
        logp_rollout_BT: [B, T] rollout-engine log-probs of the same tokens (mu_theta).
        logp_teacher_BT: [B, T] log-probs of the same tokens under the sample's domain teacher.
            Required for ``teacher_kl="sampled"``; unused (may be None) for ``"topk"``.
        adv_orm_B: [B] outcome advantage per sample (or [B, T] per token), broadcast to tokens.
        mask_BT: [B, T] bool or 0/1 float, on for tokens the policy generated.
        alpha: weight of the ORM advantage.
        eps_low, eps_high: tokens with r_t outside [eps_low, eps_high] (inclusive) get w_t = 0.
        aggregation: ``seq_mean_token_mean`` (eq. 7) or ``token_mean``.
        student_logprob_source: ``train`` (eq. 8) or ``rollout``: the student log-prob used in
            the sampled teacher term. Ignored by ``teacher_kl="topk"``, whose student side is
            ``student_topk_logp_BTK`` as given.
        teacher_kl: ``sampled`` (default, the report's term logp_teacher - logp_student at the
            sampled token, inside the stop-gradient advantage) or ``topk``: the loss adds
            w_t * topk_reverse_kl(teacher_topk_logp_BTK, student_topk_logp_BTK) per token, the
            reverse KL over the teacher's top-k support with both sides renormalised,
            differentiated through ``student_topk_logp_BTK`` (see the module docstring).
        teacher_topk_logp_BTK: [B, T, K] teacher log-probs of its top-k ids (``topk`` only).
        student_topk_logp_BTK: [B, T, K] student log-probs at those ids (``topk`` only; they
            receive a gradient).
        domains_B: optional domain name per sample; adds per-domain metrics named
            ``<metric>/<domain>`` for teacher_log_ratio, masked_fraction, is_ratio_abs_dev,
            orm_adv_mean and num_tokens (each equal to that metric over the domain's samples).

    Returns:
        (loss, metrics). Metrics: loss, num_tokens, num_samples (non-empty), masked_fraction
        (valid tokens zeroed by the IS mask), is_ratio_mean, is_ratio_abs_dev (mean |r_t - 1|),
        teacher_log_ratio (mean teacher term over valid tokens; its negation estimates the
        reverse KL to the teacher), orm_adv_mean, adv_mean (mean A_t).
    """
    valid_BT, adv_orm_BT = check_mopd_args(
        logp_train_BT, logp_rollout_BT, logp_teacher_BT, adv_orm_B, mask_BT,
        alpha=alpha, eps_low=eps_low, eps_high=eps_high, aggregation=aggregation,
        student_logprob_source=student_logprob_source, teacher_kl=teacher_kl,
        teacher_topk_logp_BTK=teacher_topk_logp_BTK, student_topk_logp_BTK=student_topk_logp_BTK,
    )  # fmt: skip
    logp_train_c = _clean(logp_train_BT, valid_BT)  # carries the gradient
    logp_rollout_c = _clean(logp_rollout_BT, valid_BT).detach()
    r_BT, w_BT, zeroed_BT = _is_mask_weights(
        logp_train_c - logp_rollout_c, valid_BT, eps_low, eps_high
    )

    if teacher_kl == "sampled":
        assert logp_teacher_BT is not None
        logp_student_c = logp_train_c if student_logprob_source == "train" else logp_rollout_c
        teacher_term_BT, adv_BT = _sampled_advantage(
            logp_teacher_BT, logp_student_c, alpha, adv_orm_BT, valid_BT
        )
        per_token_BT = -(w_BT * adv_BT) * logp_train_c
    else:
        assert teacher_topk_logp_BTK is not None and student_topk_logp_BTK is not None
        kl_BT = _topk_kl_term(teacher_topk_logp_BTK, student_topk_logp_BTK, valid_BT)
        teacher_term_BT = -kl_BT.detach()
        # The top-k term is a loss term of its own, not part of the advantage.
        adv_BT = _clean(alpha * adv_orm_BT, valid_BT).detach()
        per_token_BT = -(w_BT * adv_BT) * logp_train_c + w_BT * kl_BT
    loss = aggregate(per_token_BT, valid_BT, aggregation)

    metrics = _mopd_metrics(
        loss, valid_BT, zeroed_BT, r_BT, teacher_term_BT, adv_orm_B, adv_BT, domains_B
    )
    return loss, metrics


@torch.no_grad()
def _sampled_advantage(
    logp_teacher_BT: torch.Tensor,
    logp_student_c: torch.Tensor,
    alpha: float,
    adv_orm_BT: torch.Tensor,
    valid_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(teacher term, A_t)`` of eq. 8 at the sampled tokens, both constants (stop-gradient):
    logp_teacher_t - logp_student_t, and that plus alpha * A_orm."""
    teacher_term_BT = _clean(logp_teacher_BT, valid_BT) - logp_student_c
    return teacher_term_BT, _clean(teacher_term_BT + alpha * adv_orm_BT, valid_BT)


def _topk_kl_term(
    teacher_topk_logp_BTK: torch.Tensor,
    student_topk_logp_BTK: torch.Tensor,
    valid_BT: torch.Tensor,
) -> torch.Tensor:
    """[B, T] the top-k reverse KL on valid tokens (0 elsewhere), differentiable through the
    student's top-k log-probs; a ValueError where it is not finite on a valid token."""
    kl_BT = topk_reverse_kl(teacher_topk_logp_BTK, student_topk_logp_BTK)
    if bool((~torch.isfinite(kl_BT.detach()) & valid_BT).any()):
        raise ValueError(
            "the top-k reverse KL is not finite on some valid tokens: each needs at "
            "least one finite teacher top-k log-prob and finite student log-probs there"
        )
    return _clean(kl_BT, valid_BT)


@torch.no_grad()
def _mopd_metrics(
    loss: torch.Tensor,
    valid_BT: torch.Tensor,
    zeroed_BT: torch.Tensor,
    r_BT: torch.Tensor,
    teacher_term_BT: torch.Tensor,
    adv_orm: torch.Tensor,
    adv_BT: torch.Tensor,
    domains_B: Sequence[str] | None,
) -> Metrics:
    """The metrics ``mopd_loss`` documents, per domain too when ``domains_B`` is given."""
    num_tokens = valid_BT.sum()
    metrics = _to_floats(
        loss=loss,
        num_tokens=num_tokens,
        num_samples=valid_BT.any(dim=1).sum(),
        masked_fraction=zeroed_BT.sum() / num_tokens.clamp_min(1),
        is_ratio_mean=_masked_mean(r_BT, valid_BT),
        is_ratio_abs_dev=_masked_mean((r_BT - 1).abs(), valid_BT),
        teacher_log_ratio=_masked_mean(teacher_term_BT, valid_BT),
        orm_adv_mean=_orm_mean(adv_orm, valid_BT),
        adv_mean=_masked_mean(adv_BT, valid_BT),
    )
    if domains_B is not None:
        metrics |= _per_domain_metrics(
            domains_B, valid_BT, zeroed_BT, r_BT, teacher_term_BT, adv_orm
        )
    return metrics


def _per_domain_metrics(
    domains_B: Sequence[str],
    valid_BT: torch.Tensor,
    zeroed_BT: torch.Tensor,
    r_BT: torch.Tensor,
    teacher_term_BT: torch.Tensor,
    adv_orm: torch.Tensor,
) -> Metrics:
    if isinstance(domains_B, str) or len(domains_B) != valid_BT.shape[0]:
        raise ValueError(
            f"domains_B must be a sequence of {valid_BT.shape[0]} domain names (one per sample)"
        )
    scalars: dict[str, torch.Tensor] = {}
    for domain in sorted(set(domains_B)):
        rows_B = torch.tensor([d == domain for d in domains_B], device=valid_BT.device)
        v_BT = valid_BT & rows_B[:, None]
        n = v_BT.sum()
        scalars[f"teacher_log_ratio/{domain}"] = _masked_mean(teacher_term_BT, v_BT)
        scalars[f"masked_fraction/{domain}"] = (zeroed_BT & v_BT).sum() / n.clamp_min(1)
        scalars[f"is_ratio_abs_dev/{domain}"] = _masked_mean((r_BT - 1).abs(), v_BT)
        scalars[f"orm_adv_mean/{domain}"] = _orm_mean(adv_orm, v_BT)
        scalars[f"num_tokens/{domain}"] = n
    return _to_floats(**scalars)


# ---------------------------------------------------------------------------------------------
# Stage 2: teacher RL
# ---------------------------------------------------------------------------------------------


def policy_gradient_loss(
    logp_train_BT: torch.Tensor,
    logp_rollout_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_correction: str = "mask",
    eps_low: float = 0.5,
    eps_high: float = 2.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    logp_ref_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "seq_mean_token_mean",
) -> tuple[torch.Tensor, Metrics]:
    """GRPO-style policy gradient with a token importance correction (stage 2).

    With r_t = exp(logp_train_t - logp_rollout_t) and A_t the sample's advantage:

    - ``mask``:     loss_t = -w_t A_t logp_train_t, w_t = sg[r_t] inside [eps_low, eps_high]
      (inclusive), else 0. Identical to MOPD with alpha = 1 and no teacher term.
    - ``truncate``: loss_t = -sg[min(r_t, eps_high)] A_t logp_train_t (truncated IS).
    - ``ppo_clip``: loss_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t) with the
      gradient through r_t; ``logp_rollout_BT`` is then the log-prob the batch was sampled
      under (the "old" policy) when a batch is reused for several optimiser steps.

    If ``kl_coef > 0``, ``kl_coef * k3(logp_train, logp_ref)`` is added per token (k3 with
    a = current policy, b = reference; the gradient flows through logp_train). Passing
    ``logp_ref_BT`` with ``kl_coef = 0`` only reports the KL.

    Args:
        logp_train_BT, logp_rollout_BT: [B, T] log-probs of the sampled tokens.
        adv_B: [B] sequence advantage (broadcast to tokens) or [B, T] token advantage.
        mask_BT: [B, T] bool or 0/1 float, on for generated tokens.

    Returns:
        (loss, metrics). Metrics: loss, num_tokens, num_samples, masked_fraction (valid tokens
        zeroed by ``mask``), clipped_fraction (tokens truncated by ``truncate`` or whose clipped
        PPO term is active), is_ratio_mean, is_ratio_abs_dev, orm_adv_mean, and kl_ref when
        ``logp_ref_BT`` is given.
    """
    valid_BT, adv_BT = check_pg_args(
        logp_train_BT, logp_rollout_BT, adv_B, mask_BT,
        is_correction=is_correction, eps_low=eps_low, eps_high=eps_high, clip_low=clip_low,
        clip_high=clip_high, logp_ref_BT=logp_ref_BT, kl_coef=kl_coef, aggregation=aggregation,
    )  # fmt: skip

    logp_train_c = _clean(logp_train_BT, valid_BT)
    logp_rollout_c = _clean(logp_rollout_BT, valid_BT).detach()
    adv_c = _clean(adv_BT, valid_BT).detach()  # advantages are constants of the estimator
    log_ratio_BT = logp_train_c - logp_rollout_c
    r_BT, w_BT, zeroed_BT = _is_mask_weights(log_ratio_BT, valid_BT, eps_low, eps_high)
    clipped_BT = torch.zeros_like(valid_BT)

    if is_correction == "mask":
        per_token_BT = -(w_BT * adv_c) * logp_train_c
    elif is_correction == "truncate":
        zeroed_BT = torch.zeros_like(valid_BT)
        clipped_BT = (r_BT > eps_high) & valid_BT
        w_BT = r_BT.clamp(max=eps_high)
        per_token_BT = -(w_BT * adv_c) * logp_train_c
    else:  # ppo_clip
        zeroed_BT = torch.zeros_like(valid_BT)
        ratio_BT = torch.exp(log_ratio_BT)  # with gradient
        surr_BT = ratio_BT * adv_c
        surr_clip_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_c
        clipped_BT = (surr_clip_BT < surr_BT).detach() & valid_BT
        per_token_BT = -torch.minimum(surr_BT, surr_clip_BT)

    kl_BT = None
    if logp_ref_BT is not None:
        kl_BT = kl_k3(logp_train_c, _clean(logp_ref_BT, valid_BT).detach())
        if kl_coef > 0:
            per_token_BT = per_token_BT + kl_coef * kl_BT
    per_token_BT = torch.where(valid_BT, per_token_BT, torch.zeros_like(per_token_BT))
    loss = aggregate(per_token_BT, valid_BT, aggregation)

    with torch.no_grad():
        num_tokens = valid_BT.sum()
        extra = {} if kl_BT is None else {"kl_ref": _masked_mean(kl_BT, valid_BT)}
        metrics = _to_floats(
            loss=loss,
            num_tokens=num_tokens,
            num_samples=valid_BT.any(dim=1).sum(),
            masked_fraction=zeroed_BT.sum() / num_tokens.clamp_min(1),
            clipped_fraction=clipped_BT.sum() / num_tokens.clamp_min(1),
            is_ratio_mean=_masked_mean(r_BT, valid_BT),
            is_ratio_abs_dev=_masked_mean((r_BT - 1).abs(), valid_BT),
            orm_adv_mean=_orm_mean(adv_B, valid_BT),
            **extra,
        )
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Stage 1: SFT
# ---------------------------------------------------------------------------------------------


def sft_loss(
    logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, aggregation: str = "seq_mean_token_mean"
) -> tuple[torch.Tensor, Metrics]:
    """Token cross-entropy -logp on response tokens only, aggregated as configured.

    logp_BT: [B, T] log-probs of the target tokens; mask_BT: [B, T] on for response tokens.
    Metrics: loss, nll (token-mean NLL whatever the aggregation), num_tokens, num_samples.
    """
    valid_BT = check_sft_args(logp_BT, mask_BT, aggregation)
    nll_BT = -_clean(logp_BT, valid_BT)
    loss = aggregate(nll_BT, valid_BT, aggregation)
    with torch.no_grad():
        metrics = _to_floats(
            loss=loss,
            nll=_masked_mean(nll_BT, valid_BT),
            num_tokens=valid_BT.sum(),
            num_samples=valid_BT.any(dim=1).sum(),
        )
    return loss, metrics
