"""Sequence-level outcome (ORM) advantages from group rewards (algorithms.md, "ORM advantages").

A prompt is sampled G times; the G rewards form a group. Each sample's advantage compares its
reward with a baseline built from its group:

- ``grpo``:   (R_i - mean_j R_j) / (std_j R_j + eps), std unbiased (torch.std default)
- ``drgrpo``: R_i - mean_j R_j                       (Dr. GRPO: no std division)
- ``rloo``:   R_i - mean_{j != i} R_j                (leave-one-out baseline)

Rules shared by all estimators: a group of size 1 has no baseline and gets 0; a group whose
rewards are all equal gets exactly 0 (so dynamic sampling can drop it without changing the loss).
The math runs in fp32 whatever the input dtype; the result is fp32.

Shape suffixes: N prompts (groups), G samples per group, B sequences, T response tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mopd.algo._check import check_choice, check_tensor

__all__ = [
    "ESTIMATORS",
    "broadcast_to_tokens",
    "drgrpo_advantages",
    "group_advantages",
    "grpo_advantages",
    "rloo_advantages",
]


def _prepare(rewards_NG: torch.Tensor) -> torch.Tensor:
    check_tensor("rewards_NG", rewards_NG, ndim=2)
    if not rewards_NG.is_floating_point():
        rewards_NG = rewards_NG.to(torch.float32)
    rewards_NG = rewards_NG.float()
    if not torch.isfinite(rewards_NG).all():
        raise ValueError("rewards_NG contains NaN or inf; score every sample with a finite reward")
    return rewards_NG


def _all_equal_N1(rewards_NG: torch.Tensor) -> torch.Tensor:
    # Exact comparison, not a tolerance: the contract is "all-equal rewards give exactly 0",
    # which float round-off in R - mean would otherwise break (e.g. mean of three 0.1s).
    return (rewards_NG == rewards_NG[:, :1]).all(dim=1, keepdim=True)


def grpo_advantages(rewards_NG: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(R - mean) / (unbiased std + eps) per group. rewards_NG [N, G] -> adv_NG [N, G] fp32."""
    r_NG = _prepare(rewards_NG)
    if r_NG.shape[1] < 2:
        return torch.zeros_like(r_NG)
    centered_NG = r_NG - r_NG.mean(dim=1, keepdim=True)
    adv_NG = centered_NG / (r_NG.std(dim=1, keepdim=True) + eps)
    return torch.where(_all_equal_N1(r_NG), torch.zeros_like(adv_NG), adv_NG)


def drgrpo_advantages(rewards_NG: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """R - mean per group (Dr. GRPO). ``eps`` is accepted for a uniform signature and unused."""
    del eps
    r_NG = _prepare(rewards_NG)
    if r_NG.shape[1] < 2:
        return torch.zeros_like(r_NG)
    adv_NG = r_NG - r_NG.mean(dim=1, keepdim=True)
    return torch.where(_all_equal_N1(r_NG), torch.zeros_like(adv_NG), adv_NG)


def rloo_advantages(rewards_NG: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """R_i - mean of the other G-1 rewards of the group (RLOO). ``eps`` is unused."""
    del eps
    r_NG = _prepare(rewards_NG)
    G = r_NG.shape[1]
    if G < 2:
        return torch.zeros_like(r_NG)
    loo_mean_NG = (r_NG.sum(dim=1, keepdim=True) - r_NG) / (G - 1)
    adv_NG = r_NG - loo_mean_NG
    return torch.where(_all_equal_N1(r_NG), torch.zeros_like(adv_NG), adv_NG)


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
}


def group_advantages(
    rewards_NG: torch.Tensor, *, method: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages. rewards_NG [N, G] (any real dtype) -> adv_NG [N, G] fp32.

    ``method`` is one of ``grpo`` (default), ``drgrpo``, ``rloo``; see the module docstring.
    """
    check_choice("method", method, ESTIMATORS)
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} must be >= 0")
    return ESTIMATORS[method](rewards_NG, eps=eps)


def broadcast_to_tokens(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Copy each sequence's advantage to its response tokens: adv_B [B], mask_BT [B, T] ->
    adv_BT [B, T] fp32, zero where the mask is off."""
    check_tensor("adv_B", adv_B, ndim=1)
    check_tensor("mask_BT", mask_BT, ndim=2)
    if adv_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(
            f"adv_B has {adv_B.shape[0]} entries but mask_BT has {mask_BT.shape[0]} rows"
        )
    valid_BT = mask_BT.bool() if mask_BT.dtype == torch.bool else mask_BT != 0
    adv_BT = adv_B.float()[:, None].expand(mask_BT.shape)
    return torch.where(valid_BT, adv_BT, torch.zeros_like(adv_BT))
