"""Megatron-core models built from a Hugging Face config: MiMo-V2-Flash and Qwen3-MoE.

A Megatron ``GPTModel`` whose decoder is assembled layer by layer from Megatron's spec system
(``TransformerBlockSubmodules(layer_specs=[...])``): every layer gets its own attention spec,
so the per-layer differences of MiMo-V2-Flash that one ``TransformerConfig`` cannot express
(one ``num_query_groups``, one ``kv_channels``) come from per-layer parameters instead:

    MiMo-V2-Flash (transformers ``MiMoV2FlashForCausalLM``)      how it is built here
    layer i global or sliding window (``layer_types``)           per-layer ``AttentionLayout``
    sliding layers: 2x KV heads, learnable sink per head         ``num_kv_heads``, ``sink``
    q/k head dim != v head dim, values * attention_value_scale   ``HybridSelfAttention``
    partial RoPE, theta per layer type                           a RotaryEmbedding per layer
    dense layer 0, MoE elsewhere (``mlp_layer_types``)           MLP or MoELayer spec per layer
    sigmoid router, selection bias, normalisation, scaling       Megatron's TopKRouter config

Qwen3-MoE (per-head q/k RMSNorm, softmax router, ``mlp_only_layers``) uses the same classes.

Custom pieces, each a Megatron submodule plugged in through the spec:

- ``PackedCoreAttention`` and ``HybridSelfAttention`` (``trainer.megatron.attention``): packed
  THD attention with sliding windows and sinks, per-layer KV heads, head dims and RoPE.
- ``ReplayTopKRouter`` (``trainer.megatron.router``): Megatron's ``TopKRouter`` whose
  ``RouterReplay`` also records the router's own top-k (R3 route agreement), with a TE-free
  gating in the router dtype.
- ``GroupedExperts``: a layer's local experts as two stacked weights run by grouped GEMMs.
- ``RMSNorm``: HF's formula (normalise in fp32, cast back, times weight), usable with sequence
  parallelism (Megatron's torch-norm wrapper refuses it).

The per-layer layout these are built from (``ModelLayout``, ``layout_from_hf``) is
``trainer.megatron.layout``. The names of the three modules are re-exported here.

Shape suffixes: N packed tokens, S tokens of one sequence, B sequences, H hidden, V vocab,
h attention heads (local to the TP rank), g KV groups, d q/k head dim, e v head dim,
E experts, k experts per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from trainer.megatron.attention import HybridSelfAttention, PackedCoreAttention
from trainer.megatron.layout import (
    SUPPORTED_ARCHS,
    AttentionLayout,
    ModelLayout,
    RouterLayout,
    layout_from_hf,
)
from trainer.megatron.router import AgreementRouterReplay, ReplayTopKRouter, replay_routers

__all__ = [  # layout, attention and router names re-exported: callers import them from here
    "EXPERT_IMPLS",
    "SUPPORTED_ARCHS",
    "AgreementRouterReplay",
    "AttentionLayout",
    "GroupedExperts",
    "HybridSelfAttention",
    "ModelLayout",
    "PackedCoreAttention",
    "RMSNorm",
    "ReplayTopKRouter",
    "RouterLayout",
    "build_gpt_model",
    "layer_specs",
    "layout_from_hf",
    "packed_forward",
    "padded_vocab_size",
    "replay_routers",
    "transformer_config",
]


# ---------------------------------------------------------------------------------------------
# TransformerConfig
# ---------------------------------------------------------------------------------------------


def transformer_config(
    layout: ModelLayout,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    routing_replay: bool = True,
    recompute: bool = False,
    use_cpu_initialization: bool | None = None,
    token_dispatcher: str | None = None,
) -> Any:
    """The model-wide Megatron ``TransformerConfig`` (per-layer attention comes from the specs).

    CPU-related choices (documented rather than patched): ``use_cpu_initialization`` (weights
    are created on CPU; default on machines without CUDA), the ``allgather`` token dispatcher
    (the all-to-all one needs CUDA streams; default on CPU, ``alltoall`` on GPU), no biases in
    linear layers, no fused kernels (bias-dropout, softmax, RoPE, GLU), dropout off.

    ``num_query_groups`` / ``kv_channels`` hold the values of the first layer; every layer's
    ``HybridSelfAttention`` overrides them with its own.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not cuda
    if token_dispatcher is None:
        token_dispatcher = "alltoall" if cuda else "allgather"
    router = layout.router
    assert router is not None
    first = layout.attention[0]
    recompute_kwargs: dict[str, Any] = {}
    if recompute:
        recompute_kwargs = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    return TransformerConfig(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden_size,
        num_attention_heads=layout.num_heads,
        num_query_groups=first.num_kv_heads,
        kv_channels=first.qk_head_dim,
        ffn_hidden_size=layout.ffn_hidden_size,
        moe_ffn_hidden_size=layout.moe_ffn_hidden_size,
        num_moe_experts=layout.num_experts,
        moe_router_topk=layout.topk,
        moe_layer_freq=[1 if m else 0 for m in layout.moe],
        moe_router_score_function=router.score_function,
        moe_router_enable_expert_bias=router.expert_bias,
        # The selection bias is a trained constant here: no aux-loss-free bias updates.
        moe_router_bias_update_rate=0.0,
        moe_router_pre_softmax=router.score_function == "softmax" and not router.normalize,
        moe_router_topk_scaling_factor=router.scaling if router.scaling != 1.0 else None,
        moe_router_num_groups=router.num_groups,
        moe_router_group_topk=router.group_topk,
        moe_router_dtype="fp32" if router.fp32 else None,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=token_dispatcher,
        moe_enable_routing_replay=routing_replay,
        moe_grouped_gemm=False,
        normalization="RMSNorm",
        layernorm_epsilon=layout.rms_eps,
        qk_layernorm=first.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=layout.init_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=tensor_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=1,
        sequence_parallel=tensor_parallel > 1,
        **recompute_kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Submodules
# ---------------------------------------------------------------------------------------------


class RMSNorm(torch.nn.Module):
    """RMSNorm exactly as HF computes it: ``weight * (x_fp32 * rsqrt(mean(x^2) + eps)).to(dtype)``.

    Takes Megatron's norm-builder arguments; marks its weight ``sequence_parallel`` so Megatron
    all-reduces its gradient across tensor-parallel ranks when sequence parallelism is on.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.ones(
                hidden_size,
                dtype=config.params_dtype,
                device=None if config.use_cpu_initialization else torch.cuda.current_device(),
            )
        )
        self.eps = eps
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GroupedExperts(torch.nn.Module):
    """All local experts of one MoE layer as two stacked weights, run by ``torch._grouped_mm``.

    Megatron's experts interface (``num_local_experts, config, pg_collection``; forward on the
    dispatcher's expert-sorted tokens) with the math of its ``SequentialMLP`` of GLU MLPs:
    ``fc2(silu(gate) * up * prob)`` per token, but one grouped GEMM per projection instead of a
    Python loop over experts (on H100/H200 the bf16 grouped GEMM kernels of torch; on CPU an
    fp32 reference implementation).

    weight1 [E_local, 2 * I, H]: rows [gate; up] of each expert (HF gate_proj, up_proj)
    weight2 [E_local, H, I]:     each expert's down projection (HF down_proj)
    """

    def __init__(
        self, num_local_experts: int, config: Any, submodules: Any = None, pg_collection: Any = None
    ) -> None:
        super().__init__()
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("GroupedExperts needs torch._grouped_mm (torch >= 2.8)")
        self.config = config
        E, H, In = num_local_experts, config.hidden_size, config.moe_ffn_hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        self.weight1 = torch.nn.Parameter(torch.empty(E, 2 * In, H, **kw))
        self.weight2 = torch.nn.Parameter(torch.empty(E, H, In, **kw))
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.weight1)
                config.output_layer_init_method(self.weight2)
        # Megatron's convention for expert weights: reduced over the expert-data-parallel
        # group by DDP (not the data-parallel one) when experts are split over EP ranks.
        expert_parallel = config.expert_model_parallel_size > 1
        for w in (self.weight1, self.weight2):
            w.allreduce = not expert_parallel  # type: ignore[attr-defined]

    # torch's bf16 grouped GEMM wants every group's row count to be a multiple of 8 (and no
    # empty group); each expert's tokens are padded to that with zero rows.
    ALIGN = 8

    def forward(
        self, tokens_TH: torch.Tensor, tokens_per_expert: torch.Tensor, probs_T: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        dev = tokens_TH.device
        counts = torch.as_tensor(tokens_per_expert).to("cpu", torch.int64)
        padded = ((counts + self.ALIGN - 1) // self.ALIGN * self.ALIGN).clamp_min(self.ALIGN)
        start_real = torch.cumsum(counts, 0) - counts
        start_pad = torch.cumsum(padded, 0) - padded
        T = int(counts.sum())
        # Row of each (expert-sorted) token in the padded layout.
        rows_T = (
            torch.arange(T)
            - torch.repeat_interleave(start_real, counts)
            + torch.repeat_interleave(start_pad, counts)
        ).to(dev)
        total = int(padded.sum())
        offs = torch.cumsum(padded, 0).to(device=dev, dtype=torch.int32)
        x = tokens_TH.new_zeros(total, tokens_TH.shape[-1]).index_copy(0, rows_T, tokens_TH)
        p = probs_T.new_zeros(total).index_copy(0, rows_T, probs_T)
        h = torch._grouped_mm(x, self.weight1.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        h = (F.silu(gate) * up * p.unsqueeze(-1)).to(tokens_TH.dtype)
        out = torch._grouped_mm(h, self.weight2.transpose(1, 2), offs=offs)
        return out.index_select(0, rows_T), None


# ---------------------------------------------------------------------------------------------
# Specs and model
# ---------------------------------------------------------------------------------------------


EXPERT_IMPLS = ("sequential", "grouped")


def layer_specs(layout: ModelLayout, experts: str = "sequential") -> Any:
    """One Megatron ``TransformerLayer`` spec per decoder layer.

    ``experts``: ``sequential`` (Megatron's SequentialMLP, a loop over local experts) or
    ``grouped`` (``GroupedExperts``: two grouped GEMMs per layer; same math).
    """
    if experts not in EXPERT_IMPLS:
        raise ValueError(f"experts={experts!r}; accepted values: {', '.join(EXPERT_IMPLS)}")
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    mlp_sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    dense = ModuleSpec(module=MLP, submodules=mlp_sub)
    moe = ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=SequentialMLP, submodules=mlp_sub)
            if experts == "sequential"
            else ModuleSpec(module=GroupedExperts),
            router=ReplayTopKRouter,
        ),
    )
    specs = []
    for att, is_moe in zip(layout.attention, layout.moe):
        attention = ModuleSpec(
            module=HybridSelfAttention,
            params={"attn_mask_type": AttnMaskType.causal, "layout": att},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear,
                core_attention=PackedCoreAttention,
                linear_proj=RowParallelLinear,
                q_layernorm=RMSNorm if att.qk_norm else None,
                k_layernorm=RMSNorm if att.qk_norm else None,
            ),
        )
        specs.append(
            ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=RMSNorm,
                    self_attention=attention,
                    self_attn_bda=get_bias_dropout_add,
                    pre_mlp_layernorm=RMSNorm,
                    mlp=moe if is_moe else dense,
                    mlp_bda=get_bias_dropout_add,
                ),
            )
        )
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Vocabulary rounded up to a multiple of the tensor-parallel size (Megatron splits it)."""
    return int(math.ceil(vocab_size / tensor_parallel) * tensor_parallel)


def build_gpt_model(layout: ModelLayout, config: Any, *, experts: str = "sequential") -> Any:
    """A Megatron ``GPTModel`` for ``layout`` (random weights; load HF ones with ``convert``).

    Positions are handled per layer (``position_embedding_type='none'`` at the model level);
    logits come back gathered over tensor-parallel ranks, [B, S, V_padded].
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_specs(layout, experts),
        vocab_size=padded_vocab_size(layout.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=layout.max_positions,
        pre_process=True,
        post_process=True,
        parallel_output=False,
        share_embeddings_and_output_weights=layout.tie_embeddings,
        position_embedding_type="none",
    )
    if torch.cuda.is_available():
        # Also moves what Megatron always creates on the CPU (the router weights).
        model.cuda(torch.cuda.current_device())
    return model


def packed_forward(
    model: torch.nn.Module, tokens_N: torch.Tensor, cu_seqlens_B1: torch.Tensor
) -> torch.Tensor:
    """Logits [N, V_padded] of a packed row (positions restart at every sequence)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens_B1.to(device=tokens_N.device, dtype=torch.int32)
    lengths = (cu[1:] - cu[:-1]).tolist()
    positions_N = torch.cat([torch.arange(n, device=tokens_N.device) for n in lengths])
    max_len = max(lengths)
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    logits = model(
        input_ids=tokens_N[None].long(),
        position_ids=positions_N[None],
        attention_mask=None,
        packed_seq_params=psp,
    )
    return logits[0]
