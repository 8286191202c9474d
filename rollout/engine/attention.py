"""Attention for the slot KV cache: explicit per-row masks, and grouped eager attention.

Sequences of different lengths share a forward through an explicit 4-d additive attention
mask built from each row's position, per layer type: keys ``0..pos`` for full-attention
layers, the ring slots written so far for sliding layers (transformers' convention: key j is
visible from query i iff ``i - window < j <= i``; a ring holds exactly those keys).
MiMo-V2-Flash's sink logits (added inside attention) therefore see exactly the keys a plain
full forward shows them. ``AttentionMasks`` builds them for the three kinds of forward
(prefill, decode, extend); ``attention_layout`` and ``layer_windows`` read from a model
config which layers slide and by how much.

For the model types listed in ``_GROUPED_ATTENTION_MODELS`` attention runs
``grouped_eager_attention`` (eager attention per KV head, without copying the cache once per
query head).

Shape legend:
    B   sequences in a forward (rows of the batch)
    Q   query positions per row in a forward
    K   key positions read for a row in this forward (ring slots for sliding layers)
    W   a sliding window (ring slots)
    H   query heads; H_kv key/value heads; D head dim
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "GROUPED_ATTENTION",
    "AttentionLayout",
    "AttentionMasks",
    "attention_layout",
    "grouped_eager_attention",
    "layer_windows",
    "ring_window",
    "uses_grouped_attention",
]

GROUPED_ATTENTION = "mopd_grouped_eager"

# Model types whose eager attention is exactly softmax(q k^T * scaling + mask [+ sink column]) v
# with keys/values shared by groups of query heads (transformers' ``repeat_kv`` convention).
_GROUPED_ATTENTION_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral", "mimo_v2_flash"}
)

# (pass a per-layer-type dict of masks?, sliding window per layer type; "" when one type)
AttentionLayout = tuple[bool, dict[str, int | None]]


def uses_grouped_attention(hf_config: Any) -> bool:
    """Whether ``grouped_eager_attention`` computes this model's attention exactly."""
    return getattr(hf_config, "model_type", None) in _GROUPED_ATTENTION_MODELS


def grouped_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, computed per KV head instead of per query head.

    Eager attention copies every key and value once per query head of a group
    (``repeat_kv``), then runs one tiny matmul per head; at decode that copy of the whole
    cache dominates the step. Folding the G query heads of a group into the query axis reads
    the cache slice in place: q ``[B, H_kv, G*Q, D]`` @ k^T ``[B, H_kv, D, K]``. The sums are
    the same as eager's (floats agree to ~1e-7). MiMo-V2-Flash's attention sinks (one logit
    per head, ``module.sinks``) join the softmax as an extra column and are dropped after it,
    as its eager attention does. Registered with ``AttentionInterface`` under
    ``GROUPED_ATTENTION``; shapes: query [B, H, Q, D], key [B, H_kv, K, D], value
    [B, H_kv, K, Dv]; returns output [B, Q, H, Dv] and probabilities [B, H, Q, K].
    """
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q_grouped = query.reshape(batch, kv_heads, group * q_len, query.shape[3])
    scores_BHQK = torch.matmul(q_grouped, key.transpose(2, 3)).view(batch, heads, q_len, k_len)
    scores_BHQK = scores_BHQK * scaling
    if attention_mask is not None:
        scores_BHQK = scores_BHQK + attention_mask[:, :, :, :k_len]
    sinks = getattr(module, "sinks", None)
    if sinks is not None:
        sink_BHQ1 = sinks.reshape(1, -1, 1, 1).expand(batch, -1, q_len, -1)
        scores_BHQK = torch.cat([scores_BHQK, sink_BHQ1.to(scores_BHQK.dtype)], dim=-1)
    probs_BHQK = torch.softmax(scores_BHQK, dim=-1, dtype=torch.float32).to(value.dtype)
    if sinks is not None:
        probs_BHQK = probs_BHQK[..., :-1]
    if dropout and module.training:
        probs_BHQK = torch.nn.functional.dropout(probs_BHQK, p=dropout, training=True)
    out = torch.matmul(probs_BHQK.reshape(batch, kv_heads, group * q_len, k_len), value)
    out_BQHD = out.view(batch, heads, q_len, value.shape[3]).transpose(1, 2).contiguous()
    return out_BQHD, probs_BHQK


def attention_layout(hf_config: Any) -> AttentionLayout:
    """(pass a per-layer-type dict?, window per layer type) for the explicit masks."""
    layer_types = getattr(hf_config, "layer_types", None)
    window = getattr(hf_config, "sliding_window", None)
    if layer_types and len(set(layer_types)) > 1:
        return True, {t: (window if t == "sliding_attention" else None) for t in set(layer_types)}
    if layer_types:
        only = layer_types[0]
        return False, {"": window if only == "sliding_attention" else None}
    return False, {"": window}


def layer_windows(
    layout: AttentionLayout, hf_config: Any, num_layers: int, context_len: int
) -> list[int | None]:
    """Each layer's KV ring size: its sliding window, or None (full attention).

    A window that is not shorter than the context restricts nothing: such a layer keeps
    every key, as a full-attention layer does.
    """
    per_dict, windows = layout
    types = getattr(hf_config, "layer_types", None) if per_dict else None
    ring = []
    for i in range(num_layers):
        window = windows[types[i]] if types else windows[""]
        ring.append(window if window is not None and window < context_len else None)
    return ring


def ring_window(windows: list[int | None]) -> int | None:
    """The one sliding window of the ring layers (None: no layer keeps a ring)."""
    rings = {w for w in windows if w is not None}
    if len(rings) > 1:
        raise ValueError(f"layers with different sliding windows {sorted(rings)} are not supported")
    return rings.pop() if rings else None


class AttentionMasks:
    """Additive masks (0 where a key is visible, the dtype's minimum elsewhere), per layer
    type: a dict when the model mixes layer types, else one tensor.

    ``arange`` is the engine's ``0..n`` index tensor on its device (``n`` at least the
    context length); ``ring`` the window of the ring layers (None: no rings).
    """

    def __init__(
        self,
        layout: AttentionLayout,
        ring: int | None,
        arange: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layout = layout
        self.ring = ring
        self.arange = arange
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.neg = torch.full((), torch.finfo(dtype).min, dtype=dtype).to(device)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed, self.zero, self.neg)

    def prefill(self, q_len: int):
        """Masks [1, 1, Q, Q]: every prefill row runs positions 0..Q-1 (right padding)."""
        pos_Q = self.arange[:q_len]
        causal_QQ = pos_Q[None, :] <= pos_Q[:, None]
        per_dict, windows = self.layout
        masks = {}
        for layer_type, window in windows.items():
            allowed_QQ = causal_QQ
            if window is not None:
                allowed_QQ = allowed_QQ & (pos_Q[None, :] > pos_Q[:, None] - window)
            masks[layer_type] = self._additive(allowed_QQ)[None, None]
        return masks if per_dict else masks[""]

    def decode(self, pos_B: torch.Tensor, kv_len: int, ring_len: int):
        """Masks [B, 1, 1, K]: full layers see keys 0..pos, ring layers the slots written."""
        per_dict, windows = self.layout
        masks = {}
        for layer_type, window in windows.items():
            ring = window is not None and window == self.ring
            length = ring_len if ring else kv_len
            # A ring slot s holds position pos - ((pos - s) mod W): written iff s <= pos, and
            # then always inside the window. A full row holds position j at j.
            allowed_BK = self.arange[:length][None, :] <= pos_B[:, None]
            masks[layer_type] = self._additive(allowed_BK)[:, None, None, :]
        return masks if per_dict else masks[""]

    def extend(self, start_B: torch.Tensor, pos_BQ: torch.Tensor, kv_len: int):
        """Masks [B, 1, Q, K] of an extend forward: full layers see keys ``0..pos``; ring
        layers see the ring's slots (slot s of a row with ``start`` cached positions holds
        position ``start-1 - ((start-1-s) mod W)`` when that is >= 0) and this forward's keys,
        within the window."""
        per_dict, windows = self.layout
        masks = {}
        query_BQ1 = pos_BQ[:, :, None]
        for layer_type, window in windows.items():
            if window is not None and window == self.ring:
                last_B1 = start_B[:, None] - 1
                ring_BW = last_B1 - torch.remainder(last_B1 - self.arange[:window][None], window)
                keys_BK = torch.cat([ring_BW, pos_BQ], dim=1)
                valid_BK = torch.cat([ring_BW >= 0, torch.ones_like(pos_BQ, dtype=torch.bool)], 1)
                allowed_BQK = (
                    valid_BK[:, None, :]
                    & (keys_BK[:, None, :] <= query_BQ1)
                    & (keys_BK[:, None, :] > query_BQ1 - window)
                )
            else:
                allowed_BQK = self.arange[:kv_len][None, None, :] <= query_BQ1
            masks[layer_type] = self._additive(allowed_BQK)[:, None]
        return masks if per_dict else masks[""]
