"""Which decoder layers of a Hugging Face MoE config route tokens to experts.

Rollout engines (SGLang and the embedded one) report routed experts for every decoder layer,
dense ones included; samples keep only the MoE layers ([S, L_moe, k], uint8/uint16). This
module reads that layout from a checkpoint's config.json, without loading the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


@dataclass(frozen=True)
class MoELayout:
    """The routed layers of a model: what R3 records and replays."""

    num_hidden_layers: int
    moe_layer_ids: tuple[int, ...]
    """Decoder layers with a routed MoE block, ascending."""
    num_experts: int
    """Routed experts per MoE layer (E)."""
    top_k: int
    """Experts chosen per token (k)."""


def _config_dict(config: Mapping[str, Any] | str | Path | Any) -> dict[str, Any]:
    if isinstance(config, str | Path):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a Hugging Face checkpoint folder")
        config = json.loads(path.read_text())
    elif not isinstance(config, Mapping):
        config = config.to_dict()  # a transformers PretrainedConfig
    config = dict(config)
    return dict(config.get("text_config") or config)


def moe_layout(config: Mapping[str, Any] | str | Path | Any) -> MoELayout | None:
    """The MoE layout of a config (dict, PretrainedConfig, or checkpoint folder); None if dense."""
    c = _config_dict(config)
    top_k = c.get("num_experts_per_tok")
    num_experts = next((c[k] for k in _EXPERT_COUNT_KEYS if c.get(k)), None)
    if not top_k or not num_experts:
        return None
    n = int(c["num_hidden_layers"])
    if c.get("mlp_layer_types"):  # MiMo-V2-Flash: 'dense' | 'sparse'
        ids = [i for i, t in enumerate(c["mlp_layer_types"][:n]) if t == "sparse"]
    elif "mlp_only_layers" in c or "decoder_sparse_step" in c:  # Qwen2/3-MoE
        dense = set(c.get("mlp_only_layers") or [])
        step = int(c.get("decoder_sparse_step") or 1)
        ids = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    elif "first_k_dense_replace" in c:  # DeepSeek-V3 style
        first = int(c["first_k_dense_replace"])
        freq = int(c.get("moe_layer_freq") or 1)
        ids = [i for i in range(n) if i >= first and i % freq == 0]
    else:  # Mixtral and other all-MoE models
        ids = list(range(n))
    if not ids:
        return None
    return MoELayout(n, tuple(ids), int(num_experts), int(top_k))
