"""What a Hugging Face config says about each decoder layer, for the Megatron model builder.

``layout_from_hf`` reads a MiMo-V2-Flash or Qwen3-MoE config (a ``config.json`` dict or a
transformers config) into a ``ModelLayout``: per layer its ``AttentionLayout`` (global or
sliding window, heads, head dims, RoPE, sinks) and whether it is MoE, plus the router's
``RouterLayout``. ``trainer.megatron.model`` builds the layers from it; ``convert`` maps the
weights with it. Pure Python: no torch, no Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_ARCHS", "AttentionLayout", "ModelLayout", "RouterLayout", "layout_from_hf"]

SUPPORTED_ARCHS = ("mimo_v2_flash", "qwen3_moe")


# ---------------------------------------------------------------------------------------------
# Layout: what the HF config says, per layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayout:
    """Attention of one decoder layer."""

    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    window: int | None
    """Keys visible to a query, itself included (HF ``sliding_window``); None: full causal."""
    sink: bool
    """A learnable sink logit per head (an extra softmax column, dropped after normalising)."""
    rope_theta: float
    rotary_dim: int
    """Leading q/k dims that get RoPE (``int(head_dim * partial_rotary_factor)``)."""
    value_scale: float
    qk_norm: bool
    """Per-head RMSNorm of q and k before RoPE (Qwen3)."""


@dataclass(frozen=True)
class RouterLayout:
    """Top-k router of the MoE layers."""

    score_function: str
    """sigmoid (MiMo, DeepSeek-V3) or softmax (Qwen3-MoE)."""
    expert_bias: bool
    """A selection-only bias added to the scores before top-k (MiMo's e_score_correction_bias)."""
    normalize: bool
    """Renormalise the chosen weights to sum to 1 (``norm_topk_prob``)."""
    scaling: float
    """Routed scaling factor applied to the weights."""
    num_groups: int | None
    group_topk: int | None
    fp32: bool
    """Router logits in fp32 whatever the activation dtype (MiMo)."""


@dataclass(frozen=True)
class ModelLayout:
    """Everything the Megatron model needs from an HF config."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: int
    num_experts: int
    topk: int
    rms_eps: float
    tie_embeddings: bool
    init_std: float
    max_positions: int
    attention: tuple[AttentionLayout, ...]
    moe: tuple[bool, ...]
    router: RouterLayout | None

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Decoder-layer indices of the MoE layers (the L axis of routes_NLk)."""
        return tuple(i for i, m in enumerate(self.moe) if m)


def _hf_dict(hf_config: Any) -> dict[str, Any]:
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    if isinstance(hf_config, dict):
        return dict(hf_config)
    raise TypeError(f"expected a transformers config or a config dict, got {type(hf_config)}")


def _need(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"HF config field {key!r} is missing; the model cannot be built")
    return cfg[key]


def _num_experts(cfg: dict[str, Any]) -> int:
    # The same field has three names across transformers configs (attribute_map aliases).
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise ValueError("HF config has no expert count (n_routed_experts / num_experts)")


def _rope(params: dict[str, Any] | None, head_dim: int, default_theta: float, field: str):
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"HF config {field}.rope_type={rope_type!r}: only 'default' RoPE is supported by the "
            "Megatron backend"
        )
    theta = float(params.get("rope_theta", default_theta))
    factor = float(params.get("partial_rotary_factor", 1.0))
    return theta, int(head_dim * factor)


def _dims(cfg: dict[str, Any]) -> tuple[int, int]:
    """(decoder layers, q/k head dim)."""
    n = int(_need(cfg, "num_hidden_layers"))
    heads = int(_need(cfg, "num_attention_heads"))
    hidden = int(_need(cfg, "hidden_size"))
    return n, int(cfg.get("head_dim") or hidden // heads)


def _shared_fields(cfg: dict[str, Any], *, rms_eps: float) -> dict[str, Any]:
    """The ``ModelLayout`` fields every architecture reads the same way (``rms_eps``: the
    default of ``rms_norm_eps``, which differs)."""
    return dict(
        vocab_size=int(_need(cfg, "vocab_size")),
        hidden_size=int(_need(cfg, "hidden_size")),
        num_layers=int(_need(cfg, "num_hidden_layers")),
        num_heads=int(_need(cfg, "num_attention_heads")),
        ffn_hidden_size=int(_need(cfg, "intermediate_size")),
        moe_ffn_hidden_size=int(_need(cfg, "moe_intermediate_size")),
        num_experts=_num_experts(cfg),
        topk=int(_need(cfg, "num_experts_per_tok")),
        rms_eps=float(cfg.get("rms_norm_eps", rms_eps)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
        max_positions=int(cfg.get("max_position_embeddings", 4096)),
    )


def _mimo_layout(cfg: dict[str, Any]) -> ModelLayout:
    n, head_dim = _dims(cfg)
    v_head_dim = int(cfg.get("v_head_dim") or head_dim)
    kv = int(_need(cfg, "num_key_value_heads"))
    # Same defaults as transformers' MiMoV2FlashConfig.__post_init__.
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i == 0 or (i + 1) % 6 == 0) else "sliding_attention" for i in range(n)
    ]
    mlp_types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    rope = cfg.get("rope_parameters") or {
        "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    if len(layer_types) != n or len(mlp_types) != n:
        raise ValueError(
            f"HF config layer_types ({len(layer_types)}) and mlp_layer_types ({len(mlp_types)}) "
            f"must have num_hidden_layers={n} entries"
        )
    if cfg.get("attention_bias"):
        raise ValueError("HF config attention_bias=true is not supported by the Megatron backend")
    value_scale = cfg.get("attention_value_scale")
    attention = []
    for i, lt in enumerate(layer_types):
        if lt not in ("full_attention", "sliding_attention"):
            raise ValueError(f"HF config layer_types[{i}]={lt!r}: expected full or sliding")
        sliding = lt == "sliding_attention"
        params = dict(rope.get(lt) or {})
        params.setdefault("partial_rotary_factor", 0.334)  # MiMo's default, as in transformers
        theta, rotary_dim = _rope(params, head_dim, 10_000.0, f"rope_parameters[{lt!r}]")
        attention.append(
            AttentionLayout(
                num_kv_heads=kv * 2 if sliding else kv,
                qk_head_dim=head_dim,
                v_head_dim=v_head_dim,
                window=int(_need(cfg, "sliding_window")) if sliding else None,
                sink=sliding,
                rope_theta=theta,
                rotary_dim=rotary_dim,
                value_scale=1.0 if value_scale is None else float(value_scale),
                qk_norm=False,
            )
        )
    for i, t in enumerate(mlp_types):
        if t not in ("dense", "sparse"):
            raise ValueError(f"HF config mlp_layer_types[{i}]={t!r}: expected dense or sparse")
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or 1)
    if n_group != topk_group:
        # HF ranks groups by the sum of their top-2 scores; Megatron's group-limited top-k
        # does so only when topk / group_topk == 2, so groups are accepted only when the
        # selection keeps every group (the released MiMo-V2-Flash: n_group = topk_group = 1).
        raise ValueError(
            f"HF config n_group={n_group}, topk_group={topk_group}: group-limited routing is "
            "not supported by the Megatron backend"
        )
    topk = int(_need(cfg, "num_experts_per_tok"))
    if not cfg.get("norm_topk_prob", True) and topk > 1:
        raise ValueError(
            "HF config norm_topk_prob=false: Megatron's sigmoid router always renormalises "
            "the top-k weights; this MiMo variant is not supported by the Megatron backend"
        )
    return ModelLayout(
        arch="mimo_v2_flash",
        **_shared_fields(cfg, rms_eps=1e-5),
        attention=tuple(attention),
        moe=tuple(t == "sparse" for t in mlp_types),
        router=RouterLayout(
            score_function="sigmoid",
            expert_bias=True,
            normalize=True,
            scaling=float(cfg.get("routed_scaling_factor") or 1.0),
            num_groups=None,
            group_topk=None,
            fp32=True,
        ),
    )


def _qwen3_moe_layout(cfg: dict[str, Any]) -> ModelLayout:
    n, head_dim = _dims(cfg)
    if cfg.get("use_sliding_window"):
        raise ValueError("HF config use_sliding_window=true is not supported for Qwen3-MoE")
    if cfg.get("attention_bias"):
        raise ValueError("HF config attention_bias=true is not supported by the Megatron backend")
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10_000.0)}
    theta, rotary_dim = _rope(rope, head_dim, 10_000.0, "rope_parameters")
    only_dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step") or 1)
    experts = _num_experts(cfg)
    moe = tuple(i not in only_dense and experts > 0 and (i + 1) % step == 0 for i in range(n))
    layout = AttentionLayout(
        num_kv_heads=int(_need(cfg, "num_key_value_heads")),
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        window=None,
        sink=False,
        rope_theta=theta,
        rotary_dim=rotary_dim,
        value_scale=1.0,
        qk_norm=True,
    )
    norm = bool(cfg.get("norm_topk_prob", False))
    return ModelLayout(
        arch="qwen3_moe",
        **_shared_fields(cfg, rms_eps=1e-6),
        attention=(layout,) * n,
        moe=moe,
        router=RouterLayout(
            score_function="softmax",
            expert_bias=False,
            normalize=norm,
            scaling=1.0,
            num_groups=None,
            group_topk=None,
            fp32=False,
        ),
    )


def layout_from_hf(hf_config: Any) -> ModelLayout:
    """Read an HF config (a transformers config object or its ``config.json`` dict)."""
    cfg = _hf_dict(hf_config)
    arch = cfg.get("model_type")
    if arch == "mimo_v2_flash":
        layout = _mimo_layout(cfg)
    elif arch == "qwen3_moe":
        layout = _qwen3_moe_layout(cfg)
    else:
        raise ValueError(
            f"HF model_type={arch!r} is not supported by the Megatron backend; supported: "
            f"{', '.join(SUPPORTED_ARCHS)} (use trainer.backend=torch for other models)"
        )
    if (cfg.get("hidden_act") or "silu") != "silu":
        raise ValueError(f"HF config hidden_act={cfg.get('hidden_act')!r}: only silu is supported")
    if not any(layout.moe):
        raise ValueError(
            "the HF config has no MoE layer; use trainer.backend=torch for dense models"
        )
    return layout
