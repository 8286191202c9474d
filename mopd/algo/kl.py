"""KL estimators between two policies from samples (algorithms.md, "KL estimators").

For tokens sampled from policy a, with log-ratio d = logp_a - logp_b:

- k1 = d                    unbiased for KL(a||b), high variance, can be negative
- k2 = d^2 / 2              biased, low variance, always >= 0
- k3 = exp(-d) - 1 + d      unbiased for KL(a||b) and always >= 0 (Schulman's estimator)

``train_rollout_mismatch`` reports how far the rollout engine's policy mu drifts from the
trainer's pi on the same tokens: masked mean of k3 with a = rollout, b = train.

Estimators are elementwise and keep autograd; the math runs in fp32.
Shape suffixes: B sequences, T response tokens.
"""

from __future__ import annotations

import torch

from mopd.algo._check import check_same_shape, check_tensor

__all__ = ["kl_k1", "kl_k2", "kl_k3", "masked_mean", "train_rollout_mismatch"]


def _log_ratio(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    check_tensor("logp_a", logp_a)
    check_tensor("logp_b", logp_b)
    check_same_shape("logp_b", logp_b, "logp_a", logp_a)
    return logp_a.float() - logp_b.float()


def kl_k1(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """k1 = d, with d = logp_a - logp_b (elementwise, fp32)."""
    return _log_ratio(logp_a, logp_b)


def kl_k2(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """k2 = d^2 / 2 (elementwise, fp32)."""
    d = _log_ratio(logp_a, logp_b)
    return 0.5 * d * d


def kl_k3(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-d) - 1 + d (elementwise, fp32). ``expm1`` keeps it accurate for small d."""
    d = _log_ratio(logp_a, logp_b)
    return torch.expm1(-d) + d


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is on (bool or 0/1 float), as a 0-dim fp32 tensor.

    An empty mask gives 0 (not NaN) with a zero gradient; values under the mask-off entries are
    never read, so padding may hold inf or NaN.
    """
    check_tensor("x", x)
    check_tensor("mask", mask)
    check_same_shape("mask", mask, "x", x)
    valid = mask if mask.dtype == torch.bool else mask != 0
    x = torch.where(valid, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    return x.sum() / valid.sum().clamp_min(1).to(torch.float32)


def train_rollout_mismatch(
    logp_rollout_BT: torch.Tensor, logp_train_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Masked mean of k3(a = rollout, b = train): 0-dim fp32 tensor, 0 for an empty mask."""
    check_same_shape("logp_train_BT", logp_train_BT, "logp_rollout_BT", logp_rollout_BT)
    check_same_shape("mask_BT", mask_BT, "logp_rollout_BT", logp_rollout_BT)
    valid = mask_BT if mask_BT.dtype == torch.bool else mask_BT != 0
    zero = torch.zeros((), dtype=torch.float32, device=logp_rollout_BT.device)
    # Sanitise padding first so an inf log-prob there cannot turn into NaN inside k3.
    a = torch.where(valid, logp_rollout_BT.float(), zero)
    b = torch.where(valid, logp_train_BT.float(), zero)
    return masked_mean(kl_k3(a, b), valid)
