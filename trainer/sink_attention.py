"""Causal attention with a sliding window, learnable sinks and packed sequences, for training.

MiMo-V2-Flash's attention (transformers' eager ``MiMoV2FlashAttention``): per head,
``softmax([q k^T * scale + mask, sink_h])`` with the sink column dropped after normalising,
times ``v``; key ``j`` is visible from query ``i`` iff ``j <= i``, ``i - j < window`` (sliding
layers) and both belong to the same packed sequence. Two implementations of exactly that:

- ``flex`` (CUDA, bf16/fp16): FlexAttention with a block mask, so the work scales with the visible keys
  (the window, not the sequence) and packed sequences need no loop. The sink is not a column
  of a dense mask: with ``Z = sum_j exp(s_j)`` the visible keys' softmax normaliser,
  ``softmax([s, sink])[:-1] @ v = (softmax(s) @ v) * Z / (Z + exp(sink))
  = flex_out * sigmoid(lse - sink)``, where ``lse = log Z`` is what FlexAttention returns.
  The sink's gradient and the lse's own gradient (back into q and k) flow through that factor.
- ``math`` (any device): the dense formula itself, batched over sequences with one boolean
  [S, S] mask (no per-sequence loop). Exact, and what runs on CPU, where FlexAttention has no
  backward, and for fp32 on CUDA.

``register_hf_attention`` plugs the same function into transformers' attention interface for
the torch backend's padded [B, T] micro-batches (sequences start at position 0, padding at the
end: causal attention needs no padding mask for the real tokens).

Shapes: q [B, h, S, d], k [B, g, S, d], v [B, g, S, e] (g KV heads shared by h / g query
heads each, transformers' ``repeat_kv`` order), sinks [h], and for packed sequences their
boundaries ``cu_seqlens`` (Python ints, Megatron's THD convention; B must be 1) -> out
[B, h, S, e].
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Literal

import torch

__all__ = ["HF_ATTENTION", "Impl", "register_hf_attention", "sink_window_attention"]

HF_ATTENTION = "mopd_sink"
"""The name under which ``register_hf_attention`` registers this attention with transformers
(``attn_implementation="mopd_sink"``)."""

Impl = Literal["auto", "flex", "math"]

_MASK_CACHE_SIZE = 16
_FLEX_DTYPES = (torch.bfloat16, torch.float16)


def _segments(cu_seqlens: tuple[int, ...], S: int, device: Any) -> torch.Tensor:
    """[S] int32: the packed sequence of every position; positions past ``cu_seqlens[-1]``
    (padding) form one more sequence of their own."""
    lengths = torch.tensor(cu_seqlens, dtype=torch.int64).diff()
    if int(lengths.sum()) > S or cu_seqlens[0] != 0 or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens {list(cu_seqlens)[:8]}... do not partition {S} positions")
    ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)
    pad = torch.full((S - ids.numel(),), len(lengths), dtype=torch.int32)
    return torch.cat([ids, pad]).to(device)


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    cu_seqlens: tuple[int, ...] | list[int] | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Causal attention (see the module docstring): [B, h, S, d], [B, g, S, d], [B, g, S, e]
    -> [B, h, S, e] in q's dtype. ``impl="auto"`` is ``flex`` for bf16/fp16 on CUDA, ``math``
    elsewhere (fp32 FlexAttention kernels at MiMo's head dim 192 exceed an H200's shared
    memory)."""
    B, h, S, _ = q.shape
    g = k.shape[1]
    if h % g:
        raise ValueError(f"{h} query heads cannot share {g} KV heads")
    if cu_seqlens is not None and B != 1:
        raise ValueError("packed sequences (cu_seqlens) need a batch of one row")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 or None")
    if impl == "auto":
        impl = "flex" if q.is_cuda and q.dtype in _FLEX_DTYPES else "math"
    cu = None if cu_seqlens is None else tuple(int(c) for c in cu_seqlens)
    if impl == "math":
        segments = None if cu is None else _segments(cu, S, q.device)
        return _math(q, k, v, scale, window, sinks, segments)
    if impl == "flex":
        return _flex(q, k, v, scale, window, sinks, cu, compiled=q.is_cuda)
    raise ValueError(f"impl={impl!r}: use auto, flex or math")


# ---------------------------------------------------------------------- math


def _sees(qi: torch.Tensor, ki: torch.Tensor, window: int | None, segments: torch.Tensor | None):
    """Whether query position ``qi`` sees key position ``ki`` (broadcasting index tensors): the
    one visibility rule of both paths (the dense mask and FlexAttention's ``mask_mod``)."""
    visible = ki <= qi
    if window is not None:
        visible = visible & (qi - ki < window)
    if segments is not None:
        visible = visible & (segments[qi] == segments[ki])
    return visible


def _visible(S: int, window: int | None, segments: torch.Tensor | None, device: Any):
    """[S, S] bool: key j visible from query i."""
    positions = torch.arange(S, device=device)
    return _sees(positions[:, None], positions[None, :], window, segments)


def _math(q, k, v, scale, window, sinks, segments):
    B, h, S, _ = q.shape
    rep = h // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_visible(S, window, segments, q.device), float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        column = sinks.to(scores.dtype).view(1, h, 1, 1).expand(B, h, S, 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


# ---------------------------------------------------------------------- flex


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention is a dense reference (CPU tests of the formula only).
    return torch.compile(flex_attention) if compiled else flex_attention


_block_masks: OrderedDict[tuple, Any] = OrderedDict()


def _block_mask(S: int, window: int | None, cu: tuple[int, ...] | None, device: Any):
    """The block mask of (S, window, cu_seqlens), cached: every layer of a forward (and of
    its backward) shares it."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (S, window, cu, str(device))
    mask = _block_masks.get(key)
    if mask is not None:
        _block_masks.move_to_end(key)
        return mask
    segments = None if cu is None else _segments(cu, S, device)

    def mask_mod(b, hh, qi, ki):
        return _sees(qi, ki, window, segments)

    mask = create_block_mask(mask_mod, None, None, S, S, device=device)
    _block_masks[key] = mask
    while len(_block_masks) > _MASK_CACHE_SIZE:
        _block_masks.popitem(last=False)
    return mask


def _flex(q, k, v, scale, window, sinks, cu, *, compiled: bool):
    S, h = q.shape[2], q.shape[1]
    block_mask = _block_mask(S, window, cu, q.device)
    flex = _flex_fn(compiled)
    gqa = k.shape[1] != h
    if sinks is None:
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    out, lse = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    keep = torch.sigmoid(lse - sinks.to(lse.dtype).view(1, h, 1))  # Z / (Z + exp(sink))
    return out * keep.to(out.dtype)[..., None]


# ---------------------------------------------------------------------- transformers


def _hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function protocol: [B, h, S, d] in, ([B, S, h, e], None) out.
    ``attention_mask`` is None: transformers builds none for a registered function without a
    mask function, and right-padded rows need none."""
    if dropout:
        raise ValueError(f"{HF_ATTENTION} attention has no dropout (got {dropout})")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{HF_ATTENTION} attention is for training forwards (no KV cache)")
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    out = sink_window_attention(
        query, key, value, scale=scaling, window=sliding_window, sinks=sinks
    )
    return out.transpose(1, 2), None


def register_hf_attention() -> str:
    """Register ``sink_window_attention`` with transformers as ``HF_ATTENTION``; returns the
    name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTENTION, _hf_attention)
    return HF_ATTENTION
