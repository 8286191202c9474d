"""Rollout Routing Replay (R3) for transformers MoE models, through forward hooks only.

transformers' MoE blocks (MiMo-V2-Flash, Qwen3-MoE, Mixtral; v5) call a router module
``model.layers[i].mlp.gate`` and feed its output straight to the experts::

    router_logits_TE, topk_weights_Tk, topk_indices_Tk = self.gate(hidden_states)
    out = self.experts(hidden_states, topk_indices_Tk, topk_weights_Tk)

A forward hook on the router that *returns* a replacement tuple changes what the experts
receive, without editing or patching transformers. While routes are bound to the replayer,
the hook on MoE layer ``l``:

1. reads the trainer's own ``topk_indices`` and scores them against the replayed ids
   (``mopd.algo.route_agreement``, before anything is replaced), when measuring;
2. replaces ``(topk_weights, topk_indices)`` by ``(replay_gate_weights(router_logits, ids),
   ids)``: the weights come from the trainer's *own* router logits at the replayed ids, so the
   router keeps its gradient; ``router_logits`` pass through untouched.

Router math per model (``router_spec``), matching each router's own forward:

    mimo_v2_flash  sigmoid scores (the selection bias only picks experts, so it is not used
                   here); normalised over the k ids if ``norm_topk_prob``; times
                   ``routed_scaling_factor``.
    qwen3_moe      softmax; over the k ids if ``norm_topk_prob`` else the full softmax at them.
    mixtral        softmax over the k ids (Mixtral always renormalises).

The routes are bound to a micro-batch (``bind``), not consumed by a call counter: activation
recompute in backward (gradient checkpointing) runs the hooks again and they feed the very
same ids. Agreement is only measured inside ``measuring()`` (the first forward), so recompute
does not count twice.

Routes cover MoE layers only (``[N, L_moe, k]``, layer ``j`` = the j-th MoE layer in depth
order; MiMo's dense layer 0 has no router); routes with one row per decoder layer
(``[N, num_hidden_layers, k]``, SGLang's raw layout) are accepted and their MoE rows used.

Shape suffixes: N tokens of a packed micro-batch, T router rows (= N), E experts, k experts
per token, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from mopd.algo.routing import replay_gate_weights, route_agreement, routes_dtype

__all__ = ["RouterSpec", "RoutingReplay", "find_moe_gates", "router_spec"]

# model_type -> score function of its router (the rest is read from the config).
_SCORE_FUNCS = {"mimo_v2_flash": "sigmoid", "qwen3_moe": "softmax", "mixtral": "softmax"}


@dataclass(frozen=True)
class RouterSpec:
    """How a model's router turns logits at chosen experts into gate weights."""

    score_func: str
    normalize: bool
    scaling: float


def router_spec(config: Any) -> RouterSpec:
    """The router math of a transformers config (see the module docstring)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _SCORE_FUNCS:
        raise ValueError(
            f"routing replay does not know the router of model_type={model_type!r}; supported: "
            f"{', '.join(sorted(_SCORE_FUNCS))}. Add its score function to _SCORE_FUNCS in "
            "trainer/r3_hooks.py after checking its router code, or set trainer.routing_replay "
            "to false"
        )
    if model_type == "mixtral":
        return RouterSpec("softmax", True, 1.0)
    scaling = getattr(config, "routed_scaling_factor", None)
    return RouterSpec(
        score_func=_SCORE_FUNCS[model_type],
        normalize=bool(getattr(config, "norm_topk_prob", True)),
        scaling=1.0 if scaling is None else float(scaling),
    )


def find_moe_gates(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> router module, for the layers with a routed MoE block."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return {}
    gates = {}
    for i, layer in enumerate(layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if isinstance(gate, nn.Module) and hasattr(gate, "top_k"):
            gates[i] = gate
    return gates


class _Capture:
    """Own top-k ids of every MoE layer from one forward (``RoutingReplay.capture``)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.by_slot: dict[int, torch.Tensor] = {}
        self._num_layers = num_layers
        self._num_experts = num_experts

    def routes_NLk(self) -> np.ndarray:
        """[N, L_moe, k] uint8/uint16 ids, as a rollout engine would record them."""
        if len(self.by_slot) != self._num_layers:
            raise RuntimeError(
                f"captured {len(self.by_slot)} of {self._num_layers} MoE layers; run exactly "
                "one forward pass inside capture()"
            )
        stacked = torch.stack([self.by_slot[j] for j in range(self._num_layers)], dim=1)
        return stacked.cpu().numpy().astype(routes_dtype(self._num_experts, library="numpy"))


class RoutingReplay:
    """Hooks on every MoE router of ``model``: replay bound routes, measure agreement, capture.

    Usage per micro-batch (forward and backward inside ``bind``)::

        r3 = RoutingReplay(model, replay=True)
        with r3.bind(routes_NLk, agree_mask_N):
            with r3.measuring():
                logits = model(...).logits
            loss.backward()              # recompute (if any) sees the same ids
        hits, total = r3.pop_agreement()

    With ``replay=False`` the hooks only measure agreement and change nothing.
    """

    def __init__(self, model: nn.Module, *, replay: bool = True) -> None:
        self.gates = find_moe_gates(model)
        self.moe_layer_ids: list[int] = sorted(self.gates)
        self.num_hidden_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        self.replay = replay
        self.spec = router_spec(model.config) if self.gates else None
        first = self.gates[self.moe_layer_ids[0]] if self.gates else None
        self.top_k = int(first.top_k) if first is not None else 0
        self.num_experts = int(first.weight.shape[0]) if first is not None else 0
        self._routes_NLk: torch.Tensor | None = None
        self._agree_mask_N: torch.Tensor | None = None
        self._agree_rows = 0
        self._measure = False
        self._hits = 0.0
        self._total = 0
        self._capture: _Capture | None = None
        self._handles = [
            self.gates[i].register_forward_hook(partial(self._hook, slot))
            for slot, i in enumerate(self.moe_layer_ids)
        ]

    @property
    def is_moe(self) -> bool:
        return bool(self.gates)

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def moe_rows(self, routes_NLk: torch.Tensor) -> torch.Tensor:
        """Routes restricted to MoE layers ([N, L_moe, k]), validated against the model."""
        if routes_NLk.ndim != 3:
            raise ValueError(f"routes must be [N, L, k], got shape {tuple(routes_NLk.shape)}")
        L, k = routes_NLk.shape[1], routes_NLk.shape[2]
        if k != self.top_k:
            raise ValueError(
                f"routes hold k={k} experts per token but the model routes to "
                f"num_experts_per_tok={self.top_k}; were they recorded for another model?"
            )
        if len(self.moe_layer_ids) == L:
            return routes_NLk
        if self.num_hidden_layers == L:
            return routes_NLk[:, self.moe_layer_ids]
        raise ValueError(
            f"routes cover {L} layers; the model has {len(self.moe_layer_ids)} MoE layers "
            f"(decoder layers {self.moe_layer_ids}) of {self.num_hidden_layers}: pass "
            "[N, L_moe, k] (MoE layers only) or [N, num_hidden_layers, k]"
        )

    @contextmanager
    def bind(
        self, routes_NLk: torch.Tensor | None, agree_mask_N: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Bind a micro-batch's routes (int tensor on the model's device) for the block."""
        if routes_NLk is None or not self.gates:
            yield
            return
        if self._routes_NLk is not None:
            raise RuntimeError("routes are already bound; bind() does not nest")
        self._routes_NLk = self.moe_rows(routes_NLk).long()
        self._agree_mask_N = agree_mask_N
        n = self._routes_NLk.shape[0]
        self._agree_rows = int(agree_mask_N.sum()) if agree_mask_N is not None else n
        try:
            yield
        finally:
            self._routes_NLk = None
            self._agree_mask_N = None
            self._measure = False

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Count route agreement for the forward passes run inside the block."""
        self._measure = True
        try:
            yield
        finally:
            self._measure = False

    def pop_agreement(self) -> tuple[float, int]:
        """(matching (token, layer, slot) entries, entries compared) since the last pop."""
        out = (self._hits, self._total)
        self._hits, self._total = 0.0, 0
        return out

    @contextmanager
    def capture(self) -> Iterator[_Capture]:
        """Record the model's own top-k ids of one forward pass (nothing is replaced)."""
        if self._routes_NLk is not None:
            raise RuntimeError("capture() inside bind(): unbind the replayed routes first")
        self._capture = _Capture(len(self.moe_layer_ids), self.num_experts)
        try:
            yield self._capture
        finally:
            self._capture = None

    def _hook(self, slot: int, module: nn.Module, args: Any, output: Any) -> Any:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(
                f"{type(module).__name__} returned {type(output).__name__}; routing replay "
                "expects the transformers v5 router output (router_logits, topk_weights, "
                "topk_indices)"
            )
        logits_TE, weights_Tk, own_idx_Tk = output
        if self._capture is not None:
            self._capture.by_slot[slot] = own_idx_Tk.detach().clone()
        routes = self._routes_NLk
        if routes is None:
            return None
        replay_idx_Tk = routes[:, slot]
        if replay_idx_Tk.shape[0] != logits_TE.shape[0]:
            raise ValueError(
                f"bound routes cover {replay_idx_Tk.shape[0]} tokens but MoE layer "
                f"{self.moe_layer_ids[slot]} routed {logits_TE.shape[0]}; bind the routes of "
                "the micro-batch being run"
            )
        if self._measure:
            share = route_agreement(own_idx_Tk, replay_idx_Tk, self._agree_mask_N)
            entries = self._agree_rows * replay_idx_Tk.shape[1]
            self._hits += share * entries
            self._total += entries
        if not self.replay:
            return None
        assert self.spec is not None
        weights = replay_gate_weights(
            logits_TE,
            replay_idx_Tk,
            score_func=self.spec.score_func,
            scaling=self.spec.scaling,
            normalize=self.spec.normalize,
        )
        return logits_TE, weights.to(weights_Tk.dtype), replay_idx_Tk
