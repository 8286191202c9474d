"""Rollout Routing Replay (R3) math (algorithms.md, "Rollout Routing Replay").

The rollout engine records, for every token and MoE layer, the k expert ids it routed to. The
trainer replays those ids instead of its own top-k, and recomputes the gate weights from its
own router logits at those ids so the router still gets a gradient:

- ``sigmoid`` routers (MiMo-V2-Flash, DeepSeek-V3): s = sigmoid(logits); g = s[idx];
  g = g / sum(g) if normalize; g = g * scaling. The selection bias only chooses experts, so it
  plays no part here (the ids are given).
- ``softmax`` routers (Qwen3-MoE, Mixtral): with normalize, softmax over the logits restricted
  to the replayed ids (= the full softmax at the ids renormalised over them); without, the full
  softmax gathered at the ids; times scaling.

Route agreement says how often the trainer's own top-k matches the replayed routes, compared as
sets per (token, layer) row. Routes are stored as compact integer arrays [T, L, k]: uint8 when
E <= 256, uint16 up to 65536 experts.

Shape suffixes: T tokens, L MoE layers, E experts per layer, k experts chosen per token,
N any number of leading rows.
"""

from __future__ import annotations

import numpy as np
import torch

from mopd.algo._check import check_choice, check_tensor

__all__ = [
    "ROUTER_SCORE_FUNCS",
    "replay_gate_weights",
    "route_agreement",
    "routes_dtype",
]

ROUTER_SCORE_FUNCS = ("sigmoid", "softmax")

# Same guard as the DeepSeek-V3 / MiMo-V2-Flash routers: keeps a row whose sigmoid scores all
# underflowed finite, and is far below fp32 resolution of any real sum.
_NORM_EPS = 1e-20


def replay_gate_weights(
    router_logits_TE: torch.Tensor,
    replay_idx_Tk: torch.Tensor,
    *,
    score_func: str = "sigmoid",
    scaling: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Gate weights at replayed expert ids, differentiable w.r.t. the router logits.

    router_logits_TE: [..., E] router logits (any float dtype; math in fp32).
    replay_idx_Tk: [..., k] integer expert ids recorded by the rollout engine.
    Returns weights_Tk [..., k] in fp32 (cast to the activation dtype where they are used).
    """
    check_choice("score_func", score_func, ROUTER_SCORE_FUNCS)
    check_tensor("router_logits_TE", router_logits_TE)
    check_tensor("replay_idx_Tk", replay_idx_Tk)
    if router_logits_TE.ndim < 1 or not router_logits_TE.is_floating_point():
        raise ValueError("router_logits_TE must be a floating tensor [..., E]")
    if replay_idx_Tk.is_floating_point() or replay_idx_Tk.dtype == torch.bool:
        raise ValueError(f"replay_idx_Tk must hold integer expert ids, got {replay_idx_Tk.dtype}")
    if replay_idx_Tk.shape[:-1] != router_logits_TE.shape[:-1]:
        raise ValueError(
            f"replay_idx_Tk {tuple(replay_idx_Tk.shape)} and router_logits_TE "
            f"{tuple(router_logits_TE.shape)} must agree on every dim but the last"
        )
    E = router_logits_TE.shape[-1]
    idx = replay_idx_Tk.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
        raise ValueError(
            f"replay_idx_Tk holds ids in [{int(idx.min())}, {int(idx.max())}] but the router has "
            f"E={E} experts; were the routes recorded for another model?"
        )
    logits = router_logits_TE.float()
    if score_func == "sigmoid":
        g = torch.sigmoid(logits).gather(-1, idx)
        if normalize:
            g = g / (g.sum(dim=-1, keepdim=True) + _NORM_EPS)
    elif normalize:
        g = torch.softmax(logits.gather(-1, idx), dim=-1)
    else:
        g = torch.softmax(logits, dim=-1).gather(-1, idx)
    return g * scaling


def route_agreement(
    own_idx_NK: torch.Tensor, replay_idx_NK: torch.Tensor, mask_N: torch.Tensor | None = None
) -> float:
    """Share of (row, slot) entries whose own expert id is among the replayed ids of that row.

    own_idx_NK: [..., k] the trainer's own top-k; replay_idx_NK: [..., k] recorded ids. Rows
    (e.g. token x layer) are compared as sets, so the order inside a row does not matter; a
    row agreeing on j of k ids counts j/k. Assumes ids are distinct within a row, as top-k
    routing produces. ``mask_N`` (shape [...], optional) leaves rows out. No rows -> 1.0
    (nothing disagrees).
    """
    check_tensor("own_idx_NK", own_idx_NK)
    check_tensor("replay_idx_NK", replay_idx_NK)
    if own_idx_NK.shape != replay_idx_NK.shape or own_idx_NK.ndim < 1:
        raise ValueError(
            f"own_idx_NK {tuple(own_idx_NK.shape)} and replay_idx_NK "
            f"{tuple(replay_idx_NK.shape)} must have the same shape [..., k]"
        )
    own = own_idx_NK.long()
    replay = replay_idx_NK.to(own.device).long()
    # [..., k, k] membership test: k is small (8 for MiMo), so the quadratic compare is cheap.
    hit_NK = (own[..., :, None] == replay[..., None, :]).any(dim=-1)
    if mask_N is not None:
        if mask_N.shape != own.shape[:-1]:
            raise ValueError(
                f"mask_N has shape {tuple(mask_N.shape)}; expected {tuple(own.shape[:-1])}"
            )
        rows = mask_N.to(own.device).bool()
        hit_NK = hit_NK[rows]
    if hit_NK.numel() == 0:
        return 1.0
    return float(hit_NK.float().mean())


def routes_dtype(num_experts: int, *, library: str = "torch") -> torch.dtype | np.dtype:
    """Smallest unsigned integer dtype that holds expert ids 0..num_experts-1.

    uint8 for E <= 256, uint16 for E <= 65536; ``library`` is ``torch`` or ``numpy``.
    """
    check_choice("library", library, ("torch", "numpy"))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} must be a positive int")
    if num_experts > 65536:
        raise ValueError(
            f"num_experts={num_experts} does not fit uint16 expert ids (max 65536 experts)"
        )
    small = num_experts <= 256
    if library == "numpy":
        return np.dtype(np.uint8 if small else np.uint16)
    return torch.uint8 if small else torch.uint16
