"""R3 on Megatron-core: its ``RouterReplay`` per MoE layer, plus the router's own top-k.

Megatron-core's ``TopKRouter`` replays routes through ``RouterReplay`` (``moe_enable_routing_replay``):
a layer's replay holds target expert ids and an action (``RECORD``, ``REPLAY_FORWARD``,
``REPLAY_BACKWARD`` for activation recompute). Pieces here:

- ``AgreementRouterReplay``: a ``RouterReplay`` that also keeps the router's own top-k of the
  last forward (before a replay replaces it), for the route-agreement metric.
- ``ReplayTopKRouter``: Megatron's ``TopKRouter`` with that replay, and a gating that is a plain
  ``F.linear`` in the router dtype (fp32 for MiMo, as HF computes it; no Transformer Engine
  needed).
- ``replay_routers(model)``: every MoE layer's replay, in layer order.
- ``RouteReplay``: what the trainer does with them per micro-batch: picks the MoE layers'
  rows of the recorded routes, sets them as targets (``REPLAY_FORWARD``, then
  ``REPLAY_BACKWARD`` for the recompute in backward) or only records (R3 off, or no routes),
  and counts the agreement of the router's own top-k with the recorded ids.

Sequence parallelism splits a micro-batch's row over the tensor-parallel ranks: each rank's
routers see only its slice of the tokens (``RouteReplay.local_rows``).

Shape suffixes: N packed tokens, L MoE layers, k experts per token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from trainer.common import NO_ROUTES_WARNING, PackedBatch
from trainer.megatron.layout import ModelLayout

__all__ = ["AgreementRouterReplay", "ReplayTopKRouter", "RouteReplay", "replay_routers"]

log = logging.getLogger(__name__)


class AgreementRouterReplay(RouterReplay):
    """Megatron's RouterReplay that also keeps the router's own top-k of the last forward.

    Under REPLAY_FORWARD it runs Megatron's own top-k (``default_compute_topk``, selection
    bias included) on the same scores before handing back the replayed ids; under RECORD the
    recorded ids are the router's own. ``own_topk_idx`` feeds the route-agreement metric.
    """

    def __init__(self) -> None:
        super().__init__()
        self.own_topk_idx: torch.Tensor | None = None

    def get_replay_topk(
        self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None
    ):
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            with torch.no_grad():
                _, own = default_compute_topk(
                    scores, topk, num_groups=num_groups, group_topk=group_topk
                )
            self.own_topk_idx = own.detach()
        probs, idx = super().get_replay_topk(
            scores, topk, num_groups, group_topk, default_compute_topk
        )
        if self.router_replay_action == RouterReplayAction.RECORD:
            self.own_topk_idx = idx.detach()
        return probs, idx

    def clear_indices(self) -> None:
        super().clear_indices()
        self.own_topk_idx = None


class ReplayTopKRouter(TopKRouter):
    """TopKRouter with an ``AgreementRouterReplay`` and a TE-free, device-agnostic gating."""

    def __init__(self, config: Any, pg_collection: Any = None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.router_replay is not None:
            # The trainer drives each layer's replay itself (per micro-batch); keeping them out
            # of Megatron's process-wide list lets models be built and dropped without leaks.
            RouterReplay.global_router_replay_instances.remove(self.router_replay)
            self.router_replay = AgreementRouterReplay()
            RouterReplay.global_router_replay_instances.remove(self.router_replay)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


def replay_routers(model: torch.nn.Module) -> list[Any]:
    """The ``AgreementRouterReplay`` of every MoE layer of ``model``, in layer order."""
    out = []
    for module in model.modules():
        replay = getattr(module, "router_replay", None)
        if isinstance(replay, AgreementRouterReplay):
            out.append(replay)
    return out


class RouteReplay:
    """Drives the ``AgreementRouterReplay`` of every MoE layer of one model, micro-batch by
    micro-batch (see the module docstring).

    Args:
        model: the Megatron model (its ``ReplayTopKRouter`` layers).
        layout: the model's layout (MoE layers, experts, top-k).
        replay: ``trainer.routing_replay``: replay the recorded routes (else only record).
        tp, tp_rank: tensor-parallel size and this rank's index in it.
    """

    def __init__(
        self, model: torch.nn.Module, layout: ModelLayout, *, replay: bool, tp: int, tp_rank: int
    ) -> None:
        self.replays = replay_routers(model)
        if len(self.replays) != len(layout.moe_layer_ids):
            raise RuntimeError(
                f"found {len(self.replays)} router replays for "
                f"{len(layout.moe_layer_ids)} MoE layers"
            )
        self.layout = layout
        self.replay = replay
        self.tp, self.tp_rank = tp, tp_rank
        self._warned_no_routes = False

    def moe_routes(self, routes_NLk: np.ndarray) -> np.ndarray:
        """Routes of the MoE layers: [N, L_moe, k] as given, or the MoE rows of a route array
        with one row per decoder layer (SGLang's raw layout)."""
        lay = self.layout
        L = routes_NLk.shape[1]
        if routes_NLk.shape[2] != lay.topk:
            raise ValueError(
                f"routes_NLk has k={routes_NLk.shape[2]} experts per token; the model routes "
                f"to {lay.topk}"
            )
        if len(lay.moe_layer_ids) == L:
            out = routes_NLk
        elif lay.num_layers == L:
            out = routes_NLk[:, list(lay.moe_layer_ids)]
        else:
            raise ValueError(
                f"routes_NLk covers {L} layers; the model has {len(lay.moe_layer_ids)} MoE "
                f"layers of {lay.num_layers}"
            )
        if out.size and int(out.max()) >= lay.num_experts:
            raise ValueError(
                f"routes_NLk holds expert id {int(out.max())} but the model has "
                f"{lay.num_experts} experts; were the routes recorded for another model?"
            )
        return out

    @contextmanager
    def bound(self, b: PackedBatch) -> Iterator[None]:
        """Every MoE layer's replay set for the micro-batch ``b`` inside the block (forward,
        and backward after ``backward_pass``), cleared after it, also on error."""
        self._bind(b)
        try:
            yield
        finally:
            self._unbind()

    def _bind(self, b: PackedBatch) -> None:
        for r in self.replays:
            r.clear_indices()
        if b.routes_NLk is None:
            if self.replay and not self._warned_no_routes:
                log.warning(NO_ROUTES_WARNING)
                self._warned_no_routes = True
            for r in self.replays:
                r.clear_router_replay_action()
            return
        routes = self.local_rows(b.routes_NLk)
        if self.replay:
            for j, r in enumerate(self.replays):
                r.set_target_indices(routes[:, j].contiguous())
                r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        else:
            for r in self.replays:
                r.set_router_replay_action(RouterReplayAction.RECORD)

    def _unbind(self) -> None:
        for r in self.replays:
            r.clear_indices()
            r.clear_router_replay_action()

    def backward_pass(self) -> None:
        """Switch replaying layers to ``REPLAY_BACKWARD`` (activation recompute pops the same
        ids) before the micro-batch's backward."""
        for r in self.replays:
            if r.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                r.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    def local_rows(self, x_N: torch.Tensor) -> torch.Tensor:
        """The token rows this TP rank routes (sequence parallelism splits the row)."""
        if self.tp == 1:
            return x_N
        n = x_N.shape[0] // self.tp
        return x_N[self.tp_rank * n : (self.tp_rank + 1) * n]

    def agreement(self, b: PackedBatch) -> tuple[float, float]:
        """(hits, entries) of the router's own top-k vs the replayed ids, this rank's rows."""
        if b.routes_NLk is None:
            return 0.0, 0.0
        routes = self.local_rows(b.routes_NLk)
        keep = self.local_rows(b.agree_N)
        hits, total = 0.0, 0.0
        for j, r in enumerate(self.replays):
            own = r.own_topk_idx
            if own is None:
                continue
            hit_Nk = (own[:, :, None] == routes[:, j, None, :]).any(-1)[keep]
            hits += float(hit_Nk.sum())
            total += float(hit_Nk.numel())
        return hits, total
