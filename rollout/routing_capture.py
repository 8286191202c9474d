"""Capture the experts each MoE router picked, from the model's own router modules.

Routing replay (R3) needs, for every token the rollout engine ran forward on, the top-k
expert ids each MoE layer chose. transformers' MoE blocks call a router module
(``layer.mlp.gate``) that returns ``(router_logits [T, E], topk_weights [T, k],
topk_indices [T, k])``: MiMoV2FlashTopkRouter (sigmoid scores, selection by score + bias),
Qwen3MoeTopKRouter and MixtralTopKRouter (softmax top-k). A forward hook on each router reads
``topk_indices``: nothing in transformers is edited or patched, and the ids are exactly the
ones the experts were dispatched with.

Layout follows SGLang's capturer (``srt/state_capturer/base.py``): one row per token,
``[T, L, k]`` int32 with ``L = num_hidden_layers``, dense layers included. SGLang's capture
buffer starts zeroed and dense layers never write to it, so their rows are 0; we fill them
with 0 as well (meaningless ids: consumers keep only the MoE layers, see
``mopd.inference.protocol.compact_routes``).

Shape legend:
    B   sequences in the forward batch
    Q   query positions per sequence in the forward (prompt length at prefill, 1 at decode)
    T   tokens (B * Q flattened, the router's view)
    L   decoder layers, all of them
    k   experts per token
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["RoutingCapture", "find_routers"]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no decoder layer list at .{model.base_model_prefix}"
            ".layers; routing capture supports transformers decoder-only models"
        )
    return layers


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Map decoder layer index -> router module, for the layers that have a routed MoE block.

    A router is ``layer.mlp.gate`` when it is a module with a ``top_k`` attribute (the
    transformers v5 router classes); dense MLPs have ``gate_proj`` instead and are skipped.
    """
    routers: dict[int, nn.Module] = {}
    for idx, layer in enumerate(_decoder_layers(model)):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if isinstance(gate, nn.Module) and hasattr(gate, "top_k"):
            routers[idx] = gate
    return routers


class RoutingCapture:
    """Forward hooks on every router; collects ``topk_indices`` while a capture is active.

    Usage::

        capture = RoutingCapture(model)
        with capture.record():
            model(input_ids_BQ, ...)
        routes_BQLk = capture.routes(batch=B, query_len=Q)
    """

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.routers = find_routers(model)
        self.top_k: int = int(getattr(config, "num_experts_per_tok", 0) or 0)
        if self.routers and self.top_k <= 0:
            raise ValueError("MoE model without num_experts_per_tok in its config")
        self.moe_layer_ids: list[int] = sorted(self.routers)
        self._active = False
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [
            router.register_forward_hook(self._make_hook(idx))
            for idx, router in self.routers.items()
        ]

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    def _make_hook(self, layer_idx: int):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if self._active:
                # (router_logits, topk_weights, topk_indices); indices [T, k]
                self._captured[layer_idx] = output[2].detach()

        return hook

    @contextmanager
    def record(self, enabled: bool = True) -> Iterator[None]:
        """Capture router outputs of the forwards run inside the block (no-op if disabled)."""
        self._captured = {}
        self._active = enabled and self.is_moe
        try:
            yield
        finally:
            self._active = False

    def routes(self, batch: int, query_len: int) -> torch.Tensor:
        """Routes of the last recorded forward as int32 [B, Q, L, k] (dense layers 0)."""
        routes_BQLk = torch.zeros(
            (batch, query_len, self.num_layers, max(self.top_k, 1)), dtype=torch.int32
        )
        for layer_idx, idx_Tk in self._captured.items():
            routes_BQLk[:, :, layer_idx, :] = idx_Tk.to("cpu", torch.int32).view(
                batch, query_len, self.top_k
            )
        return routes_BQLk

    def remove(self) -> None:
        """Detach the hooks (the model is left as it was)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
