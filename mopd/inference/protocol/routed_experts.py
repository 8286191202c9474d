"""The routed-experts wire format (R3, rollout routing replay), and its compact form.

With ``--enable-return-routed-experts`` on the server and ``return_routed_experts: true`` in the
request, ``meta_info["routed_experts"]`` is the base64 of the raw bytes of a C-contiguous int32
array of shape ``[seqlen - 1 - start_len, num_hidden_layers, num_experts_per_tok]``: one row per
position the model ran forward on from ``routed_experts_start_len`` (prompt included, default 0)
up to but not including the last sampled token (which was never fed back), for every decoder
layer, dense layers included (their rows hold whatever the capture buffer had: meaningless).
``compact_routes`` turns that into the payload the rest of the platform carries: MoE layers
only, narrowed to uint8 (uint16 past 256 experts). Source: SGLang 0.5.23
``srt/state_capturer/{base,routed_experts}.py``.

Shape legend:
    T   positions with routing (seqlen - 1 - start_len)
    L   decoder layers (all of them, as SGLang sends them); L_moe: MoE layers only
    k   experts per token (num_experts_per_tok)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import numpy as np

from mopd.inference.protocol.common import ProtocolError

_WIRE_DTYPE = np.dtype("<i4")  # SGLang's capture buffers are torch.int32, sent as raw bytes


def encode_routed_experts(routes_TLk: np.ndarray) -> str:
    """Encode routed expert ids the way SGLang puts them in ``meta_info["routed_experts"]``.

    Args:
        routes_TLk: integer array [T, L, k] (all decoder layers, dense ones included).

    Returns:
        base64 (standard alphabet, padded) of the array as little-endian int32, row-major.
    """
    routes_TLk = np.asarray(routes_TLk)
    if routes_TLk.ndim != 3:
        raise ProtocolError(
            f"routed experts must be a 3-d array [T, L, k], got shape {routes_TLk.shape}"
        )
    if routes_TLk.dtype.kind not in "iu":
        raise ProtocolError(f"routed experts must be integers, got dtype {routes_TLk.dtype}")
    wire_TLk = np.ascontiguousarray(routes_TLk, dtype=_WIRE_DTYPE)
    return base64.b64encode(wire_TLk.tobytes()).decode("ascii")


def decode_routed_experts(b64: str, num_layers: int, top_k: int) -> np.ndarray:
    """Decode ``meta_info["routed_experts"]`` into an int32 array [T, L, k].

    Args:
        b64: the base64 string from the response.
        num_layers: the model's ``num_hidden_layers`` (all layers, dense ones too).
        top_k: the model's ``num_experts_per_tok``.

    Raises:
        ProtocolError: the string is not base64, or its size is not a multiple of
            ``num_layers * top_k`` int32 values.
    """
    if num_layers <= 0 or top_k <= 0:
        raise ProtocolError(f"num_layers and top_k must be positive, got {num_layers}, {top_k}")
    if not isinstance(b64, str):
        raise ProtocolError(f"routed experts must be a base64 string, got {type(b64).__name__}")
    try:
        raw = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(f"routed experts are not valid base64: {exc}") from exc
    row_bytes = num_layers * top_k * _WIRE_DTYPE.itemsize
    if len(raw) % row_bytes:
        raise ProtocolError(
            f"routed experts hold {len(raw)} bytes, not a multiple of num_layers * top_k * 4 = "
            f"{num_layers} * {top_k} * 4; check num_layers (num_hidden_layers, dense layers "
            "included) and top_k (num_experts_per_tok) against the served model"
        )
    routes_TLk = np.frombuffer(raw, dtype=_WIRE_DTYPE).reshape(-1, num_layers, top_k)
    return routes_TLk.astype(np.int32)  # native byte order, writable copy


def compact_routes(
    routes_TLk: np.ndarray, moe_layer_ids: Sequence[int], num_experts: int
) -> np.ndarray:
    """Keep the MoE layers and narrow the ids: [T, L, k] int -> [T, L_moe, k] uint8/uint16.

    Args:
        routes_TLk: expert ids for every decoder layer, as decoded from SGLang.
        moe_layer_ids: indices (into L) of the layers that have a routed MoE block, ascending.
        num_experts: routed experts per MoE layer; ids must lie in [0, num_experts).

    Returns:
        uint8 array when ``num_experts <= 256``, else uint16 (``num_experts <= 65536``).
    """
    routes_TLk = np.asarray(routes_TLk)
    if routes_TLk.ndim != 3:
        raise ProtocolError(f"routes must be [T, L, k], got shape {routes_TLk.shape}")
    if not 0 < num_experts <= 65536:
        raise ProtocolError(f"num_experts must be in [1, 65536], got {num_experts}")
    layer_ids = np.asarray(list(moe_layer_ids), dtype=np.int64)
    num_layers = routes_TLk.shape[1]
    if layer_ids.size and (layer_ids.min() < 0 or layer_ids.max() >= num_layers):
        raise ProtocolError(
            f"moe_layer_ids {layer_ids.tolist()} out of range for {num_layers} layers"
        )
    if np.any(np.diff(layer_ids) <= 0):
        raise ProtocolError(f"moe_layer_ids must be strictly ascending, got {layer_ids.tolist()}")
    moe_TLk = routes_TLk[:, layer_ids, :]
    if moe_TLk.size and (moe_TLk.min() < 0 or moe_TLk.max() >= num_experts):
        raise ProtocolError(
            f"expert ids on MoE layers must lie in [0, {num_experts}), found "
            f"[{moe_TLk.min()}, {moe_TLk.max()}]; wrong num_experts or moe_layer_ids?"
        )
    dtype = np.uint8 if num_experts <= 256 else np.uint16
    return np.ascontiguousarray(moe_TLk, dtype=dtype)
