"""The Megatron model of ``trainer.megatron.model`` against transformers, layer by layer, and
the HF <-> Megatron weight conversion (exact round trip for every TP x EP sharding).

One process, world of one (gloo); the module fixture tears Megatron's state down afterwards.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from mopd.models.tiny import build_tiny_checkpoint, tiny_config
from tests.trainer.conftest import load_hf

pytest.importorskip(
    "megatron.core", reason="needs the [megatron] extra: pip install -e '.[megatron]'"
)

torch.set_num_threads(1)

# Variants of the tiny models: the default ones, and ones that stress each feature.
VARIANTS = {
    "mimo": ("mimo_v2_flash", {}),
    # GQA 2 in sliding layers, a window shorter than the sequences, routed scaling, a tied head.
    "mimo_var": (
        "mimo_v2_flash",
        {
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "v_head_dim": 8,
            "sliding_window": 3,
            "routed_scaling_factor": 2.5,
            "tie_word_embeddings": True,
            "num_hidden_layers": 6,
            "layer_types": ["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"],
            "mlp_layer_types": ["dense", "dense"] + ["sparse"] * 4,
        },
    ),
    "qwen": ("qwen3_moe", {}),
    "qwen_nonorm": ("qwen3_moe", {"norm_topk_prob": False}),
}


@pytest.fixture(scope="module")
def world():
    """Megatron parallel state for one process (torch.distributed gloo, world size 1)."""
    from mopd.config.schema import TrainerConfig
    from trainer.megatron.parallel import destroy_parallel, init_parallel

    layout = init_parallel(TrainerConfig(backend="megatron"), seed=0)
    yield layout
    destroy_parallel()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_models")
    return {
        name: build_tiny_checkpoint(root / name, arch, seed=1, **kw)
        for name, (arch, kw) in VARIANTS.items()
    }


def _megatron(path, world):
    from trainer.megatron import convert
    from trainer.megatron import model as M
    from trainer.megatron.model import layout_from_hf

    layout = layout_from_hf(load_hf(path).config)
    gpt = M.build_gpt_model(layout, M.transformer_config(layout))
    convert.load_hf(gpt, convert.read_hf_checkpoint(path), layout, tp_rank=0, tp=1, ep_rank=0, ep=1)
    return layout, gpt


def _sequences(seed: int, lengths=(9, 14, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 259, (sum(lengths),), generator=gen)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    return tokens, cu


def _hidden(out) -> torch.Tensor:
    """A decoder layer's hidden states as [tokens, H] (Megatron returns (hidden, context))."""
    h = out[0] if isinstance(out, tuple) else out
    return h.detach().reshape(-1, h.shape[-1])


class _Outputs:
    """Forward hooks that keep every decoder layer's output and every router's output."""

    def __init__(self, layers, routers=()):
        self.layers: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
        self.routes: dict[int, list] = {j: [] for j in range(len(routers))}
        self.handles = []
        for i, layer in enumerate(layers):
            hook = lambda _m, _a, out, i=i: self.layers[i].append(_hidden(out))  # noqa: E731
            self.handles.append(layer.register_forward_hook(hook))
        for j, router in enumerate(routers):
            hook = lambda _m, _a, out, j=j: self.routes[j].append(out)  # noqa: E731
            self.handles.append(router.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_by_layer_parity_with_transformers(world, checkpoints, variant):
    """Packed Megatron forward vs transformers run on each sequence alone: every decoder
    layer's output, the experts each MoE layer picks, and the logits agree in fp32."""
    path = checkpoints[variant]
    hf = load_hf(path)
    layout, gpt = _megatron(path, world)
    from trainer.megatron.model import packed_forward

    tokens, cu = _sequences(seed=3)
    hf_layers = hf.model.layers
    hf_routers = [hf_layers[i].mlp.gate for i in layout.moe_layer_ids]
    ours = _Outputs(
        gpt.decoder.layers, [gpt.decoder.layers[i].mlp.router for i in layout.moe_layer_ids]
    )
    theirs = _Outputs(hf_layers, hf_routers)
    with torch.no_grad():
        logits = packed_forward(gpt, tokens, cu)[:, : layout.vocab_size]
        ref = torch.cat(
            [hf(input_ids=tokens[s:e][None]).logits[0] for s, e in pairwise(cu.tolist())]
        )
    ours.remove()
    theirs.remove()

    worst = {}
    for i in range(layout.num_layers):
        mine = ours.layers[i][0]
        expected = torch.cat(theirs.layers[i])
        worst[i] = float((mine - expected).abs().max())
    assert max(worst.values()) < 2e-5, worst
    assert float((logits - ref).abs().max()) < 2e-5
    # Same experts in every MoE layer (the tiny models' routers are wide: no near ties).
    for j in range(len(layout.moe_layer_ids)):
        routing_map = ours.routes[j][0][1]  # Megatron: (probs [N, E], routing_map [N, E])
        hf_idx = torch.cat([out[2] for out in theirs.routes[j]])
        hf_map = torch.zeros_like(routing_map).scatter(1, hf_idx, True)
        assert torch.equal(routing_map, hf_map)
        # ... with the same gate weights.
        probs = ours.routes[j][0][0]
        hf_w = torch.zeros_like(probs).scatter(
            1, hf_idx, torch.cat([o[1] for o in theirs.routes[j]]).float()
        )
        assert float((probs - hf_w).abs().max()) < 1e-6


@pytest.mark.parametrize("variant", ["mimo", "mimo_var", "qwen"])
def test_gradients_equal_transformers(world, checkpoints, variant):
    """d(sum of token log-probs)/d(weights): every parameter, mapped back to HF names."""
    from mopd.algo import selective_log_softmax
    from trainer.megatron import convert
    from trainer.megatron.model import packed_forward

    path = checkpoints[variant]
    hf = load_hf(path)
    layout, gpt = _megatron(path, world)
    tokens, cu = _sequences(seed=4)
    logits = packed_forward(gpt, tokens, cu)[:, : layout.vocab_size]
    starts = set(cu[:-1].tolist())
    rows = torch.tensor([i for i in range(1, len(tokens)) if i not in starts])
    selective_log_softmax(logits[rows - 1], tokens[rows]).sum().backward()
    total = 0.0
    for s, e in pairwise(cu.tolist()):
        out = hf(input_ids=tokens[s:e][None]).logits[0]
        total = total + selective_log_softmax(out[:-1], tokens[s + 1 : e]).sum()
    total.backward()

    full = {n: p.grad for n, p in gpt.named_parameters()}
    full |= {n: torch.zeros_like(b) for n, b in gpt.named_buffers() if n.endswith("expert_bias")}
    ours = convert.full_to_hf(full, layout)
    from trainer.export import checkpoint_state_dict

    theirs = {n: p.grad for n, p in hf.named_parameters()}
    theirs |= {n: torch.zeros_like(b) for n, b in hf.named_buffers() if n.endswith("bias")}
    theirs = checkpoint_state_dict(hf, state_dict=theirs)
    assert ours.keys() == theirs.keys()
    scale = max(float(g.abs().max()) for g in theirs.values())
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst < 1e-5 * max(1.0, scale), (worst, scale)
    if layout.attention[1].sink:
        assert float(ours["model.layers.1.self_attn.attention_sink_bias"].abs().max()) > 0


@pytest.mark.parametrize("variant", ["mimo_var", "qwen"])
@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 1), (2, 2), (1, 4), (2, 8)])
def test_conversion_round_trip_is_exact(checkpoints, variant, tp, ep):
    """HF -> full Megatron -> every rank's shard -> unshard -> HF gives back the same bytes."""
    from trainer.megatron import convert
    from trainer.megatron.model import layout_from_hf, padded_vocab_size

    path = checkpoints[variant]
    get = convert.read_hf_checkpoint(path)
    layout = layout_from_hf(load_hf(path).config)
    full = dict(convert.hf_to_full(get, layout))
    shards = {}
    for t in range(tp):
        for e in range(ep):
            local = {}
            for name, tensor in full.items():
                placed = convert.shard(name, tensor, layout, tp_rank=t, tp=tp, ep_rank=e, ep=ep)
                if placed is not None:
                    local[placed[0]] = placed[1]
            shards[(t, e)] = local
    # Each rank holds 1/ep of the experts and 1/tp of the split matrices.
    n_experts = sum(1 for k in shards[(0, 0)] if "local_experts" in k and k.endswith("fc1.weight"))
    assert n_experts == (layout.num_experts // ep) * len(layout.moe_layer_ids)
    emb = shards[(tp - 1, 0)]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == padded_vocab_size(layout.vocab_size, tp) // tp
    back = convert.full_to_hf(convert.unshard(shards, layout, tp=tp, ep=ep), layout)
    original = {k: get(k) for k in back}
    assert all(original[k] is not None for k in back)
    for k in back:
        assert torch.equal(back[k], original[k]), k
    from safetensors import safe_open

    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        on_disk = set(f.keys())
    tied = {"lm_head.weight"} if layout.tie_embeddings else set()
    assert set(back) == on_disk - tied


def test_layouts_follow_the_hf_config_fields():
    from trainer.megatron.model import layout_from_hf

    # Defaults as in transformers: layer i global iff i == 0 or (i + 1) % 6 == 0.
    cfg = tiny_config("mimo_v2_flash").to_dict()
    cfg["num_hidden_layers"] = 12
    cfg.pop("layer_types")
    cfg.pop("mlp_layer_types")
    layout = layout_from_hf(cfg)
    glob = [i for i, a in enumerate(layout.attention) if a.window is None]
    assert glob == [0, 5, 11]
    assert layout.moe == (False,) + (True,) * 11
    kv = {a.num_kv_heads for a in layout.attention if a.window is None}
    assert kv == {1} and {a.num_kv_heads for a in layout.attention if a.window} == {2}
    a = layout.attention[1]
    assert (a.sink, a.rope_theta, a.rotary_dim, a.value_scale) == (True, 10_000.0, 8, 0.707)
    assert layout.attention[0].rope_theta == 5_000_000.0
    # A config object and its config.json dict give the same layout.
    obj = tiny_config("mimo_v2_flash")
    assert layout_from_hf(obj) == layout_from_hf(obj.to_dict())


@pytest.mark.parametrize(
    ("arch", "overrides", "match"),
    [
        ("llama", {}, "model_type='llama' is not supported"),
        ("mimo_v2_flash", {"n_group": 2, "topk_group": 1}, "group-limited"),
        ("mimo_v2_flash", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_unsupported_configs_fail_clearly(arch, overrides, match):
    from trainer.megatron.model import layout_from_hf

    with pytest.raises(ValueError, match=match):
        layout_from_hf(tiny_config(arch, **overrides))
    cfg = tiny_config("mimo_v2_flash").to_dict()
    cfg["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn"
    with pytest.raises(ValueError, match="only 'default' RoPE"):
        layout_from_hf(cfg)
