"""Small validation helpers shared by the algo modules (kept private: the public catalog of
option strings is :mod:`mopd.algo.registry`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_choice(arg: str, value: object, accepted: Iterable[str]) -> None:
    """Raise ValueError naming the argument, the bad value and the accepted values."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(
            f"{arg}={value!r} is not supported; accepted values: {', '.join(accepted)}"
        )


def check_tensor(arg: str, x: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{arg} must have {ndim} dims, got shape {tuple(x.shape)}")
    return x


def check_same_shape(arg: str, x: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{arg} has shape {tuple(x.shape)} but must match {ref_arg} {tuple(ref.shape)}"
        )
