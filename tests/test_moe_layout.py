"""moe_layout reads the routed layers from config.json; it must agree with the routers the
model actually builds (the trainer's R3 hooks find them in the live model)."""

from __future__ import annotations

import pytest
import torch

from mopd.models.moe import moe_layout
from mopd.models.tiny import tiny_config


@pytest.mark.parametrize("arch", ["mimo_v2_flash", "qwen3_moe", "mixtral"])
def test_layout_matches_the_model(arch: str):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    layout = moe_layout(config)
    assert layout is not None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    sparse = [
        i
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "experts") or hasattr(layer, "block_sparse_moe")
    ]
    assert list(layout.moe_layer_ids) == sparse
    assert layout.top_k == config.num_experts_per_tok
    assert layout.num_hidden_layers == config.num_hidden_layers


def test_mimo_dense_first_layer_and_dense_models(tmp_path):
    layout = moe_layout(tiny_config("mimo_v2_flash"))
    assert layout is not None and 0 not in layout.moe_layer_ids
    assert moe_layout(tiny_config("llama")) is None
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        moe_layout(tmp_path)


def test_qwen_sparse_step():
    layout = moe_layout(
        {
            "num_hidden_layers": 6,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [1],
        }
    )
    assert layout is not None and layout.moe_layer_ids == (3, 5)
