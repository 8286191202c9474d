"""The arguments the losses of ``mopd.algo.losses`` accept: their option strings and every
argument check, so that each loss reads as its equations.

Each loss has one entry point (``check_mopd_args``, ``check_pg_args``, ``check_sft_args``) that
raises a ValueError naming the argument and the fix, and returns the bool token mask
``valid_BT`` (and the advantage broadcast to [B, T]); the checks the losses share (the
train/rollout log-prob pair, the mask, the aggregation, the IS bounds, the advantage shape,
finiteness on valid tokens) are the helpers below, called in the same order by every loss.

Shape suffixes: B sequences, T response tokens, K top-k entries per position.
"""

from __future__ import annotations

import math

import torch

from mopd.algo._check import check_choice, check_same_shape, check_tensor

__all__ = [
    "AGGREGATIONS",
    "IS_CORRECTIONS",
    "STUDENT_LOGPROB_SOURCES",
    "TEACHER_KL_MODES",
    "check_mopd_args",
    "check_pg_args",
    "check_sft_args",
]

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")
IS_CORRECTIONS = ("mask", "truncate", "ppo_clip")
TEACHER_KL_MODES = ("sampled", "topk")
STUDENT_LOGPROB_SOURCES = ("train", "rollout")


def _valid_mask(mask_BT: torch.Tensor, ref_arg: str, ref_BT: torch.Tensor) -> torch.Tensor:
    check_tensor("mask_BT", mask_BT, ndim=2)
    check_same_shape("mask_BT", mask_BT, ref_arg, ref_BT)
    return mask_BT if mask_BT.dtype == torch.bool else mask_BT != 0


def _check_logp(arg: str, x: object, ref_BT: torch.Tensor | None = None) -> torch.Tensor:
    x = check_tensor(arg, x, ndim=2)
    if not x.is_floating_point():
        raise ValueError(f"{arg} must be a floating tensor of log-probs, got dtype {x.dtype}")
    if ref_BT is not None:
        check_same_shape(arg, x, "logp_train_BT", ref_BT)
    return x


def _check_finite(valid_BT: torch.Tensor, **named: torch.Tensor) -> None:
    """One host sync for all inputs: a NaN/inf on a valid token is a caller bug, not padding."""
    names = list(named)
    bad = torch.stack([(~torch.isfinite(x) & valid_BT).any() for x in named.values()]).tolist()
    offenders = [n for n, b in zip(names, bad) if b]
    if offenders:
        raise ValueError(
            f"{', '.join(offenders)} hold NaN or inf on tokens where mask_BT is on; "
            "mask those tokens out or fix the log-prob computation"
        )


def _check_float(arg: str, value: float, *, lo: float | None = None) -> None:
    if not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{arg}={value!r} must be a real number")
    if lo is not None and value < lo:
        raise ValueError(f"{arg}={value!r} must be >= {lo}")


def _adv_tokens(adv: torch.Tensor, arg: str, ref_BT: torch.Tensor) -> torch.Tensor:
    """Accept a sequence advantage [B] (broadcast to tokens) or a token advantage [B, T]."""
    check_tensor(arg, adv)
    B, T = ref_BT.shape
    if adv.shape == (B,):
        return adv.float()[:, None].expand(B, T)
    if adv.shape == (B, T):
        return adv.float()
    raise ValueError(
        f"{arg} has shape {tuple(adv.shape)}; expected [B]={B} (one advantage per sample) "
        f"or [B, T]={B, T} (per token)"
    )


def _common_checks(
    logp_train_BT: torch.Tensor,
    logp_rollout_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    aggregation: str,
) -> torch.Tensor:
    _check_logp("logp_train_BT", logp_train_BT)
    _check_logp("logp_rollout_BT", logp_rollout_BT, logp_train_BT)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    return _valid_mask(mask_BT, "logp_train_BT", logp_train_BT)


def _check_eps(eps_low: float, eps_high: float) -> None:
    _check_float("eps_low", eps_low, lo=0.0)
    _check_float("eps_high", eps_high, lo=0.0)
    if eps_low > eps_high:
        raise ValueError(f"eps_low={eps_low} must be <= eps_high={eps_high}")


def check_mopd_args(
    logp_train_BT: torch.Tensor,
    logp_rollout_BT: torch.Tensor,
    logp_teacher_BT: torch.Tensor | None,
    adv_orm_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    alpha: float,
    eps_low: float,
    eps_high: float,
    aggregation: str,
    student_logprob_source: str,
    teacher_kl: str,
    teacher_topk_logp_BTK: torch.Tensor | None,
    student_topk_logp_BTK: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every argument check of ``mopd_loss`` (a ValueError naming the argument);
    ``(valid_BT, adv_orm_BT)``: the bool token mask and the advantage broadcast to [B, T]."""
    valid_BT = _common_checks(logp_train_BT, logp_rollout_BT, mask_BT, aggregation)
    check_choice("student_logprob_source", student_logprob_source, STUDENT_LOGPROB_SOURCES)
    check_choice("teacher_kl", teacher_kl, TEACHER_KL_MODES)
    _check_float("alpha", alpha)
    _check_eps(eps_low, eps_high)
    adv_orm_BT = _adv_tokens(adv_orm_B, "adv_orm_B", logp_train_BT)
    teacher: dict[str, torch.Tensor] = {}
    if teacher_kl == "sampled":
        teacher["logp_teacher_BT"] = _check_sampled_teacher(
            logp_teacher_BT, teacher_topk_logp_BTK, student_topk_logp_BTK, logp_train_BT
        )
    else:
        _check_topk_pair(teacher_topk_logp_BTK, student_topk_logp_BTK, logp_train_BT)
    _check_finite(
        valid_BT,
        logp_train_BT=logp_train_BT,
        logp_rollout_BT=logp_rollout_BT,
        adv_orm_B=adv_orm_BT,
        **teacher,
    )
    return valid_BT, adv_orm_BT


def _check_sampled_teacher(
    logp_teacher_BT: torch.Tensor | None,
    teacher_topk_logp_BTK: torch.Tensor | None,
    student_topk_logp_BTK: torch.Tensor | None,
    logp_train_BT: torch.Tensor,
) -> torch.Tensor:
    """The teacher's log-probs of the sampled tokens, checked (the top-k pair must be absent)."""
    if logp_teacher_BT is None:
        raise ValueError("logp_teacher_BT is required when teacher_kl='sampled'")
    if teacher_topk_logp_BTK is not None or student_topk_logp_BTK is not None:
        raise ValueError(
            "teacher_topk_logp_BTK/student_topk_logp_BTK were given but teacher_kl='sampled' "
            "ignores them; set teacher_kl='topk' or drop them"
        )
    return _check_logp("logp_teacher_BT", logp_teacher_BT, logp_train_BT)


def _check_topk_pair(
    teacher_topk_logp_BTK: torch.Tensor | None,
    student_topk_logp_BTK: torch.Tensor | None,
    logp_train_BT: torch.Tensor,
) -> None:
    """Both [B, T, K] top-k log-prob tensors, aligned with the [B, T] tokens."""
    if teacher_topk_logp_BTK is None or student_topk_logp_BTK is None:
        raise ValueError(
            "teacher_kl='topk' needs both teacher_topk_logp_BTK and student_topk_logp_BTK "
            "([B, T, K] log-probs at the teacher's top-k token ids)"
        )
    for name, x in (
        ("teacher_topk_logp_BTK", teacher_topk_logp_BTK),
        ("student_topk_logp_BTK", student_topk_logp_BTK),
    ):
        check_tensor(name, x, ndim=3)
        if x.shape[:2] != logp_train_BT.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; its first two dims must match "
                f"logp_train_BT {tuple(logp_train_BT.shape)}"
            )


def check_pg_args(
    logp_train_BT: torch.Tensor,
    logp_rollout_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_correction: str,
    eps_low: float,
    eps_high: float,
    clip_low: float,
    clip_high: float,
    logp_ref_BT: torch.Tensor | None,
    kl_coef: float,
    aggregation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every argument check of ``policy_gradient_loss`` (a ValueError naming the argument);
    ``(valid_BT, adv_BT)``: the bool token mask and the advantage broadcast to [B, T]."""
    valid_BT = _common_checks(logp_train_BT, logp_rollout_BT, mask_BT, aggregation)
    check_choice("is_correction", is_correction, IS_CORRECTIONS)
    _check_eps(eps_low, eps_high)
    _check_float("clip_low", clip_low, lo=0.0)
    _check_float("clip_high", clip_high, lo=0.0)
    if clip_low >= 1.0:
        raise ValueError(f"clip_low={clip_low} must be < 1 (the ratio is clipped at 1 - clip_low)")
    _check_float("kl_coef", kl_coef, lo=0.0)
    if kl_coef > 0 and logp_ref_BT is None:
        raise ValueError(f"kl_coef={kl_coef} needs logp_ref_BT (reference-policy log-probs)")
    adv_BT = _adv_tokens(adv_B, "adv_B", logp_train_BT)
    ref: dict[str, torch.Tensor] = {}
    if logp_ref_BT is not None:
        _check_logp("logp_ref_BT", logp_ref_BT, logp_train_BT)
        ref["logp_ref_BT"] = logp_ref_BT
    _check_finite(
        valid_BT, logp_train_BT=logp_train_BT, logp_rollout_BT=logp_rollout_BT, adv_B=adv_BT, **ref
    )
    return valid_BT, adv_BT


def check_sft_args(logp_BT: torch.Tensor, mask_BT: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Every argument check of ``sft_loss``; returns the bool token mask ``valid_BT``."""
    _check_logp("logp_BT", logp_BT)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    valid_BT = _valid_mask(mask_BT, "logp_BT", logp_BT)
    _check_finite(valid_BT, logp_BT=logp_BT)
    return valid_BT
