"""Weight conversion between Hugging Face checkpoints and the Megatron model of ``model.py``.

Three representations:

    HF state dict          what ``save_pretrained`` writes (hub layout: one tensor per expert
                           projection, MiMo sinks as ``attention_sink_bias``)
    full Megatron dict     the Megatron parameter names with global expert ids and unsplit
                           tensors (``decoder.layers.3.mlp.experts.local_experts.<global id>``)
    local Megatron dict    what one rank's model holds: its tensor-parallel slice, its experts
                           (renumbered from 0), the vocabulary padded to a multiple of TP

``hf_to_full`` / ``full_to_hf`` map the first two (per tensor, so a large checkpoint streams),
``shard`` / ``unshard`` the last two for any (tp_rank, ep_rank). The fused QKV weight holds,
per KV group, [q of the group's heads, k, v] (v with its own head dim); the dense GLU weight
holds [gate; up] and is split per rank as [gate_r; up_r] (Megatron's GLU chunks the local
output in two); experts are split across EP ranks only (expert tensor parallelism is 1).

Everything here is exact: conversion moves and reshapes values, never does arithmetic.
``load_hf`` / ``gather_hf`` wrap it for a live model in a process group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.megatron.model import ModelLayout, padded_vocab_size

__all__ = [
    "full_to_hf",
    "gather_hf",
    "hf_to_full",
    "load_hf",
    "read_hf_checkpoint",
    "shard",
    "tp_rule",
    "unshard",
]

Tensors = Mapping[str, torch.Tensor]

_LAYER = "decoder.layers.{i}."
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
# GroupedExperts keeps a layer's local experts stacked: weight1 = fc1s, weight2 = fc2s.
_GROUPED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)weight([12])$")
_FC_OF = {"1": "linear_fc1.weight", "2": "linear_fc2.weight"}


# ---------------------------------------------------------------------------------------------
# HF <-> full Megatron
# ---------------------------------------------------------------------------------------------


def _qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [h*d, H], k [g*d, H], v [g*e, H] -> fused [g * (h/g*d + d + e), H]."""
    H = q.shape[1]
    return torch.cat(
        [q.reshape(groups, -1, H), k.reshape(groups, -1, H), v.reshape(groups, -1, H)], dim=1
    ).reshape(-1, H)


def _qkv_to_hf(qkv: torch.Tensor, heads: int, groups: int, d: int, e: int):
    H = qkv.shape[1]
    per = qkv.reshape(groups, -1, H)
    q, k, v = torch.split(per, [heads // groups * d, d, e], dim=1)
    return q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)


def _sink_key(get: Callable[[str], torch.Tensor | None], prefix: str) -> torch.Tensor | None:
    for name in ("sinks", "attention_sink_bias"):
        t = get(f"{prefix}self_attn.{name}")
        if t is not None:
            return t
    return None


def hf_to_full(
    get: Callable[[str], torch.Tensor | None], layout: ModelLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (full Megatron name, tensor) from an HF checkpoint read through ``get(name)``
    (``None`` for a missing name). Raises on a missing tensor, naming it."""

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise KeyError(f"HF checkpoint has no tensor {name!r} (is it the right model?)")
        return t

    emb = need("model.embed_tokens.weight")
    yield "embedding.word_embeddings.weight", emb
    for i, (att, is_moe) in enumerate(zip(layout.attention, layout.moe)):
        hf, mg = f"model.layers.{i}.", _LAYER.format(i=i)
        yield mg + "input_layernorm.weight", need(hf + "input_layernorm.weight")
        yield mg + "pre_mlp_layernorm.weight", need(hf + "post_attention_layernorm.weight")
        a = hf + "self_attn."
        yield (
            mg + "self_attention.linear_qkv.weight",
            _qkv_from_hf(
                need(a + "q_proj.weight"),
                need(a + "k_proj.weight"),
                need(a + "v_proj.weight"),
                att.num_kv_heads,
            ),
        )
        yield mg + "self_attention.linear_proj.weight", need(a + "o_proj.weight")
        if att.sink:
            sink = _sink_key(get, hf)
            if sink is None:
                raise KeyError(f"HF checkpoint has no attention sinks for layer {i}")
            yield mg + "self_attention.core_attention.sinks", sink
        if att.qk_norm:
            yield mg + "self_attention.q_layernorm.weight", need(a + "q_norm.weight")
            yield mg + "self_attention.k_layernorm.weight", need(a + "k_norm.weight")
        m = hf + "mlp."
        if not is_moe:
            yield (
                mg + "mlp.linear_fc1.weight",
                torch.cat([need(m + "gate_proj.weight"), need(m + "up_proj.weight")], dim=0),
            )
            yield mg + "mlp.linear_fc2.weight", need(m + "down_proj.weight")
            continue
        yield mg + "mlp.router.weight", need(m + "gate.weight")
        if layout.router is not None and layout.router.expert_bias:
            yield mg + "mlp.router.expert_bias", need(m + "gate.e_score_correction_bias")
        fused_gu = get(m + "experts.gate_up_proj")  # transformers' in-memory layout
        fused_down = get(m + "experts.down_proj")
        for j in range(layout.num_experts):
            ex = f"{mg}mlp.experts.local_experts.{j}."
            if fused_gu is not None and fused_down is not None:
                yield ex + "linear_fc1.weight", fused_gu[j]
                yield ex + "linear_fc2.weight", fused_down[j]
            else:
                e = f"{m}experts.{j}."
                yield (
                    ex + "linear_fc1.weight",
                    torch.cat([need(e + "gate_proj.weight"), need(e + "up_proj.weight")], dim=0),
                )
                yield ex + "linear_fc2.weight", need(e + "down_proj.weight")
    yield "decoder.final_layernorm.weight", need("model.norm.weight")
    if not layout.tie_embeddings:
        yield "output_layer.weight", need("lm_head.weight")


def full_to_hf(full: Tensors, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The HF (hub layout) state dict of a full Megatron dict; vocabulary padding removed."""
    out: dict[str, torch.Tensor] = {}
    V = layout.vocab_size
    out["model.embed_tokens.weight"] = full["embedding.word_embeddings.weight"][:V]
    for i, (att, is_moe) in enumerate(zip(layout.attention, layout.moe)):
        hf, mg = f"model.layers.{i}.", _LAYER.format(i=i)
        out[hf + "input_layernorm.weight"] = full[mg + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = full[mg + "pre_mlp_layernorm.weight"]
        a = hf + "self_attn."
        q, k, v = _qkv_to_hf(
            full[mg + "self_attention.linear_qkv.weight"],
            layout.num_heads,
            att.num_kv_heads,
            att.qk_head_dim,
            att.v_head_dim,
        )
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
        out[a + "o_proj.weight"] = full[mg + "self_attention.linear_proj.weight"]
        if att.sink:
            out[a + "attention_sink_bias"] = full[mg + "self_attention.core_attention.sinks"]
        if att.qk_norm:
            out[a + "q_norm.weight"] = full[mg + "self_attention.q_layernorm.weight"]
            out[a + "k_norm.weight"] = full[mg + "self_attention.k_layernorm.weight"]
        m = hf + "mlp."
        if not is_moe:
            gate, up = full[mg + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
            out[m + "down_proj.weight"] = full[mg + "mlp.linear_fc2.weight"]
            continue
        out[m + "gate.weight"] = full[mg + "mlp.router.weight"]
        if layout.router is not None and layout.router.expert_bias:
            out[m + "gate.e_score_correction_bias"] = full[mg + "mlp.router.expert_bias"]
        for j in range(layout.num_experts):
            ex = f"{mg}mlp.experts.local_experts.{j}."
            gate, up = full[ex + "linear_fc1.weight"].chunk(2, dim=0)
            out[f"{m}experts.{j}.gate_proj.weight"] = gate
            out[f"{m}experts.{j}.up_proj.weight"] = up
            out[f"{m}experts.{j}.down_proj.weight"] = full[ex + "linear_fc2.weight"]
    out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    if not layout.tie_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"][:V]
    return out


# ---------------------------------------------------------------------------------------------
# full <-> local (TP / EP sharding)
# ---------------------------------------------------------------------------------------------


def tp_rule(name: str) -> str:
    """How tensor parallelism splits a Megatron parameter: ``col`` (dim 0), ``row`` (dim 1),
    ``glu`` (dim 0 of gate and of up separately) or ``rep`` (replicated)."""
    if _EXPERT.match(name):
        return "rep"  # expert tensor parallelism is 1
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "col"
    if name.endswith(("self_attention.linear_qkv.weight", "core_attention.sinks")):
        return "col"
    if name.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
        return "row"
    if name.endswith("mlp.linear_fc1.weight"):
        return "glu"
    return "rep"


def _pad_vocab(name: str, t: torch.Tensor, layout: ModelLayout, tp: int) -> torch.Tensor:
    if name not in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return t
    padded = padded_vocab_size(layout.vocab_size, tp)
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def shard(
    name: str,
    full: torch.Tensor,
    layout: ModelLayout,
    *,
    tp_rank: int = 0,
    tp: int = 1,
    ep_rank: int = 0,
    ep: int = 1,
) -> tuple[str, torch.Tensor] | None:
    """The (local name, local tensor) of ``full`` on rank (tp_rank, ep_rank), or None when the
    tensor is an expert that lives on another EP rank."""
    m = _EXPERT.match(name)
    if m:
        per_rank = layout.num_experts // ep
        j = int(m.group(2))
        if j // per_rank != ep_rank:
            return None
        return f"{m.group(1)}{j % per_rank}{m.group(3)}", full
    full = _pad_vocab(name, full, layout, tp)
    rule = tp_rule(name)
    if rule == "rep" or tp == 1:
        return name, full
    if rule == "col":
        return name, full.chunk(tp, dim=0)[tp_rank]
    if rule == "row":
        return name, full.chunk(tp, dim=1)[tp_rank]
    gate, up = full.chunk(2, dim=0)
    return name, torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)


def unshard_tp(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Join the TP slices of one (non-expert) parameter, in TP-rank order."""
    rule = tp_rule(name)
    if rule == "rep" or len(pieces) == 1:
        return pieces[0]
    if rule == "col":
        return torch.cat(pieces, dim=0)
    if rule == "row":
        return torch.cat(pieces, dim=1)
    halves = [p.chunk(2, dim=0) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def unshard(
    shards: Mapping[tuple[int, int], Tensors], layout: ModelLayout, *, tp: int, ep: int
) -> dict[str, torch.Tensor]:
    """Full Megatron dict from every rank's local dict, keyed by (tp_rank, ep_rank)."""
    full: dict[str, torch.Tensor] = {}
    per_rank = layout.num_experts // ep
    for name in shards[(0, 0)]:
        m = _EXPERT.match(name)
        if m:
            for r in range(ep):
                j = r * per_rank + int(m.group(2))
                full[f"{m.group(1)}{j}{m.group(3)}"] = shards[(0, r)][name]
            continue
        full[name] = unshard_tp(name, [shards[(t, 0)][name] for t in range(tp)])
    return full


# ---------------------------------------------------------------------------------------------
# Live models
# ---------------------------------------------------------------------------------------------


def read_hf_checkpoint(path: str | Path) -> Callable[[str], torch.Tensor | None]:
    """A lazy ``get(name)`` over the safetensors files of an HF checkpoint folder."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; is it an HF checkpoint folder?")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[key] = f

    def get(name: str) -> torch.Tensor | None:
        f = where.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as st:
            return st.get_tensor(name)

    return get


def load_hf(
    model: torch.nn.Module,
    get: Callable[[str], torch.Tensor | None],
    layout: ModelLayout,
    *,
    tp_rank: int,
    tp: int,
    ep_rank: int,
    ep: int,
) -> None:
    """Copy an HF checkpoint into this rank's ``model`` (strict: every local tensor is set).

    Works with either expert layout (Megatron's SequentialMLP or ``GroupedExperts``)."""
    local = model.state_dict()
    seen: set[str] = set()
    with torch.no_grad():
        for name, full in hf_to_full(get, layout):
            placed = shard(name, full, layout, tp_rank=tp_rank, tp=tp, ep_rank=ep_rank, ep=ep)
            if placed is None:
                continue
            lname, tensor = placed
            m = _EXPERT.match(lname)
            if m and lname not in local:
                fc = "1" if m.group(3) == ".linear_fc1.weight" else "2"
                stacked = m.group(1).removesuffix("local_experts.") + "weight" + fc
                if stacked in local:
                    local[stacked][int(m.group(2))].copy_(tensor.to(local[stacked].dtype))
                    seen.add(f"{stacked}[{m.group(2)}]")
                    continue
            if lname not in local:
                raise KeyError(f"Megatron model has no parameter {lname!r} (converted from HF)")
            target = local[lname]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{lname}: HF gives shape {tuple(tensor.shape)}, model has {tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.dtype))
            seen.add(lname)
    for k, v in local.items():  # stacked experts count as set when every slot was
        if _GROUPED.match(k) and all(f"{k}[{j}]" in seen for j in range(v.shape[0])):
            seen.add(k)
    missing = [k for k in local if k not in seen and not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"the HF checkpoint left these Megatron tensors unset: {missing}")


def gather_hf(
    model: torch.nn.Module,
    layout: ModelLayout,
    *,
    tp_group: Any,
    ep_group: Any,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """HF state dict of a (TP/EP-sharded) live model; a collective over the TP and EP groups.

    Every rank of those groups must call it; all of them get the full dict (on CPU).
    """
    import torch.distributed as dist

    tp = dist.get_world_size(tp_group)
    ep = dist.get_world_size(ep_group)
    per_rank = layout.num_experts // ep
    full: dict[str, torch.Tensor] = {}
    for name, local in model.state_dict().items():
        if name.endswith("_extra_state") or not isinstance(local, torch.Tensor):
            continue
        if name.endswith("local_tokens_per_expert"):
            continue
        local = local.detach().contiguous()
        g = _GROUPED.match(name)
        if g:  # stacked experts [E_local, ...]: gather over EP, then one name per expert
            pieces = [torch.empty_like(local) for _ in range(ep)]
            dist.all_gather(pieces, local, group=ep_group)
            stacked = torch.cat([p.cpu() for p in pieces], dim=0)
            for j in range(stacked.shape[0]):
                full[f"{g.group(1)}local_experts.{j}.{_FC_OF[g.group(2)]}"] = stacked[j]
            continue
        m = _EXPERT.match(name)
        if m:
            pieces = [torch.empty_like(local) for _ in range(ep)]
            dist.all_gather(pieces, local, group=ep_group)
            for r, piece in enumerate(pieces):
                j = r * per_rank + int(m.group(2))
                full[f"{m.group(1)}{j}{m.group(3)}"] = piece.cpu()
            continue
        if tp_rule(name) == "rep" or tp == 1:
            full[name] = local.cpu()
            continue
        pieces = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(pieces, local, group=tp_group)
        full[name] = unshard_tp(name, [p.cpu() for p in pieces])
    hf = full_to_hf(full, layout)
    if dtype is not None:
        hf = {k: v.to(dtype) for k, v in hf.items()}
    return hf
