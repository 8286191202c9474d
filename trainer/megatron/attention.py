"""MiMo-V2-Flash's attention as Megatron submodules: sliding windows, sinks, hybrid head dims.

Per layer (``layout.AttentionLayout``) a decoder layer attends globally or over a sliding
window, has its own KV-head count and q/k vs v head dims, scales its values and may carry a
learnable sink logit per head. One ``TransformerConfig`` cannot say that, so two submodules,
plugged in through the layer specs of ``trainer.megatron.model``, take it from the layout:

- ``PackedCoreAttention``: causal attention over packed sequences (Megatron's ``PackedSeqParams``
  THD format: sequences back to back, ``cu_seqlens`` boundaries, positions restart per
  sequence), with an optional sliding window and learnable sink logits. Megatron's local
  ``DotProductAttention`` refuses packed input and builds its masks on CUDA; this one runs
  ``trainer.sink_attention`` (FlexAttention with a block mask on CUDA, the sink folded in
  through its log-sum-exp; the dense formula elsewhere): softmax over [scores, sink], sink
  dropped, exactly the HF eager attention, with no loop over sequences.
- ``HybridSelfAttention``: Megatron's ``SelfAttention`` with a per-layer config copy (KV heads,
  q/k head dim), a fused QKV of per-group [q..., k, v] blocks whose v part has its own head dim,
  the value scale, and its own rotary embedding.

Shape suffixes: N packed tokens, S tokens of one sequence, B sequences, h attention heads
(local to the TP rank), g KV groups, d q/k head dim, e v head dim.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from trainer.megatron.layout import AttentionLayout
from trainer.sink_attention import sink_window_attention

__all__ = ["HybridSelfAttention", "PackedCoreAttention"]


class PackedCoreAttention(torch.nn.Module):
    """Causal attention over packed (THD) or batched (SBHD) sequences; sliding window; sinks.

    Built by Megatron's ``Attention`` through the ``core_attention`` builder protocol; the
    layer's ``AttentionLayout`` comes in through ``functools.partial``.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        *,
        layout: AttentionLayout,
    ) -> None:
        super().__init__()
        from megatron.core import tensor_parallel
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by PackedCoreAttention")
        self.layout = layout
        self.num_heads = config.num_attention_heads // tp
        self.softmax_scale = softmax_scale or layout.qk_head_dim**-0.5
        self.sinks: torch.nn.Parameter | None = None
        if layout.sink:
            self.sinks = torch.nn.Parameter(
                torch.empty(
                    self.num_heads,
                    dtype=config.params_dtype,
                    device=None if config.use_cpu_initialization else torch.cuda.current_device(),
                )
            )
            if config.perform_initialization:
                torch.nn.init.normal_(self.sinks, std=config.init_method_std)
            tensor_parallel.set_tensor_model_parallel_attributes(self.sinks, True, 0, 1)

    def _attend(self, q_BhSd, k_BgSd, v_BgSe, cu_seqlens=None) -> torch.Tensor:
        return sink_window_attention(
            q_BhSd,
            k_BgSd,
            v_BgSe,
            scale=self.softmax_scale,
            window=self.layout.window,
            sinks=self.sinks,
            cu_seqlens=cu_seqlens,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedCoreAttention")
        if packed_seq_params is not None:
            # THD [N, h, d]: one row of sequences delimited by cu_seqlens.
            N = query.shape[0]
            cu = packed_seq_params.cu_seqlens_q.tolist()
            o = self._attend(*(t.transpose(0, 1)[None] for t in (query, key, value)), cu)
            return o[0].transpose(0, 1).reshape(N, -1)
        # SBHD [S, B, h, d]: each batch column is one sequence.
        S, B = query.shape[:2]
        o = self._attend(*(t.permute(1, 2, 0, 3) for t in (query, key, value)))
        return o.permute(2, 0, 1, 3).reshape(S, B, -1)


class HybridSelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` with per-layer KV heads, q/k vs v head dims, value scale,
    and its own rotary embedding (theta and rotary dims of the layer's type).

    Fused QKV weight rows, per KV group: [q of the group's heads (h/g * d), k (d), v (e)];
    tensor parallelism splits the groups.
    """

    def __init__(
        self,
        config: Any,
        submodules: Any,
        layer_number: int,
        attn_mask_type: Any = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        *,
        layout: AttentionLayout,
    ) -> None:
        cfg = copy.copy(config)
        cfg.num_query_groups = layout.num_kv_heads
        cfg.kv_channels = layout.qk_head_dim
        cfg.softmax_scale = layout.qk_head_dim**-0.5
        submodules = dataclasses.replace(
            submodules, core_attention=functools.partial(PackedCoreAttention, layout=layout)
        )
        super().__init__(cfg, submodules, layer_number, attn_mask_type, cp_comm_type, pg_collection)
        if layout.num_kv_heads % self.world_size:
            raise ValueError(
                f"layer {layer_number}: {layout.num_kv_heads} KV heads cannot be split over "
                f"tensor_parallel={self.world_size}"
            )
        self.layout = layout
        d, e = layout.qk_head_dim, layout.v_head_dim
        heads, groups = cfg.num_attention_heads, layout.num_kv_heads
        if e != d:
            # Rebuild the two projections whose sizes depend on the v head dim.
            self.linear_qkv = submodules.linear_qkv(
                cfg.hidden_size,
                heads * d + groups * (d + e),
                config=cfg,
                init_method=cfg.init_method,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name="qkv",
                tp_group=self.pg_collection.tp,
            )
            self.linear_proj = submodules.linear_proj(
                heads * e,
                cfg.hidden_size,
                config=cfg,
                init_method=cfg.output_layer_init_method,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=True,
                is_expert=False,
                tp_comm_buffer_name="proj",
                tp_group=self.pg_collection.tp,
            )
        self.rotary = RotaryEmbedding(
            kv_channels=layout.rotary_dim,
            rotary_percent=1.0,
            rotary_base=layout.rope_theta,
            use_cpu_initialization=cfg.use_cpu_initialization,
            cp_group=self.pg_collection.cp,
        )

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ):
        if output_gate or not split_qkv:
            raise ValueError("HybridSelfAttention supports neither output gates nor fused RoPE")
        d, e = self.layout.qk_head_dim, self.layout.v_head_dim
        g = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // g
        mixed, _ = self.linear_qkv(hidden_states)
        mixed = mixed.view(*mixed.shape[:-1], g, per_group * d + d + e)
        query, key, value = torch.split(mixed, [per_group * d, d, e], dim=-1)
        query = query.reshape(*query.shape[:-2], -1, d)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        if self.layout.value_scale != 1.0:
            value = value * self.layout.value_scale
        return query, key, value

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any, *args: Any, **kwargs: Any):
        psp = kwargs.get("packed_seq_params")
        if psp is not None:
            seq_len = int(psp.max_seqlen_q)
        else:
            seq_len = hidden_states.shape[0]
            if self.config.sequence_parallel:
                seq_len *= self.world_size
        kwargs["rotary_pos_emb"] = self.rotary(seq_len)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)
