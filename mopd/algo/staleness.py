"""Staleness of partial rollouts (algorithms.md, "Partial rollouts and staleness").

A long response may be generated across several policy versions; every sampled token carries
the version that produced it. A sample's staleness is ``current_version - oldest version among
its generated tokens``, and it is admitted to a training batch only if that is at most
``max_staleness``. A token version newer than the trainer's current version is a bookkeeping bug
(a token from the future) and raises.

Shape suffixes: B sequences, T response tokens.
"""

from __future__ import annotations

import torch

from mopd.algo._check import check_tensor

__all__ = ["admissible", "max_staleness_problem", "sample_staleness"]


def sample_staleness(
    current_version: int, token_versions: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Staleness per sample: current_version - min version over generated tokens.

    token_versions: [T] (one sample) or [B, T] integer policy versions per token.
    mask: same shape, bool or 0/1, on for generated tokens (None: all tokens). Prompt and
    tool-output tokens should be masked off: their version is meaningless.
    Returns int64: a 0-dim tensor for [T] input, [B] for [B, T]. A sample without generated
    tokens has staleness 0 (no token can be stale).
    """
    if isinstance(current_version, bool) or not isinstance(current_version, int):
        raise ValueError(f"current_version={current_version!r} must be an int")
    check_tensor("token_versions", token_versions)
    if token_versions.ndim not in (1, 2):
        raise ValueError(
            f"token_versions must be [T] or [B, T], got shape {tuple(token_versions.shape)}"
        )
    if token_versions.is_floating_point() or token_versions.dtype == torch.bool:
        raise ValueError(f"token_versions must be integer, got dtype {token_versions.dtype}")
    versions_BT = token_versions.long().reshape(-1, token_versions.shape[-1])
    if mask is None:
        valid_BT = torch.ones_like(versions_BT, dtype=torch.bool)
    else:
        check_tensor("mask", mask)
        if mask.shape != token_versions.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected {tuple(token_versions.shape)}"
            )
        valid_BT = (mask if mask.dtype == torch.bool else mask != 0).reshape(versions_BT.shape)
    big = torch.iinfo(torch.int64).max
    oldest_B = torch.where(valid_BT, versions_BT, torch.full_like(versions_BT, big)).amin(dim=1)
    newest_B = torch.where(valid_BT, versions_BT, torch.full_like(versions_BT, -big)).amax(dim=1)
    if bool((newest_B > current_version).any()):
        raise ValueError(
            f"a generated token has policy version {int(newest_B.max())} > current_version="
            f"{current_version} (a token from the future): check that versions are stamped "
            "with the weights the rollout engine actually used"
        )
    has_B = valid_BT.any(dim=1)
    staleness_B = torch.where(has_B, current_version - oldest_B, torch.zeros_like(oldest_B))
    return staleness_B if token_versions.ndim == 2 else staleness_B[0]


def max_staleness_problem(max_staleness: object) -> str | None:
    """What is wrong with a ``max_staleness`` bound (None: nothing); the one check that config
    validation, the scheduler and ``admissible`` share."""
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
        return f"bad value {max_staleness!r}; must be an int >= 0 (versions behind the trainer)"
    return None


def admissible(
    current_version: int,
    token_versions: torch.Tensor,
    mask: torch.Tensor | None,
    max_staleness: int,
) -> torch.Tensor | bool:
    """Whether each sample may enter a batch: staleness <= max_staleness (inclusive).

    ``mask`` as in ``sample_staleness`` (None: every token was generated). Returns a python bool for a [T] input and a [B] bool tensor for [B, T].
    """
    problem = max_staleness_problem(max_staleness)
    if problem is not None:
        raise ValueError(f"max_staleness={max_staleness!r}: {problem}")
    ok = sample_staleness(current_version, token_versions, mask) <= max_staleness
    return bool(ok) if ok.ndim == 0 else ok
