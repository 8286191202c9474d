"""MegatronTrainer in one process (gloo, world of one): the same numbers as the torch backend,
R3 through Megatron's RouterReplay, exact checkpoint resume, HF export, clear errors.

Multi-rank layouts (DP2, EP2, TP2+EP2) are in test_megatron_distributed.py.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.packing import build_micro_batch, pack_micro_batches
from tests.trainer.conftest import load_hf, make_samples

pytest.importorskip(
    "megatron.core", reason="needs the [megatron] extra: pip install -e '.[megatron]'"
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    from trainer.megatron.parallel import destroy_parallel, init_parallel

    yield init_parallel(TrainerConfig(backend="megatron"), seed=0)
    destroy_parallel()


@pytest.fixture
def make_megatron(world):
    from trainer.megatron.backend import MegatronTrainer

    def make(path, *, algorithm=None, model_dtype="auto", recompute=False, experts="auto", **cfg):
        cfg.setdefault("lr", 1e-3)
        return MegatronTrainer(
            TrainerConfig(backend="megatron", **cfg),
            ModelConfig(path=str(path), dtype=model_dtype),
            algorithm or AlgorithmConfig(),
            recompute=recompute,
            experts=experts,
        )

    return make


def _main_grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in trainer.gpt.named_parameters()}


class RouterChoices:
    """Forward hooks on every Megatron router: the experts each call routed to."""

    def __init__(self, trainer) -> None:
        layers = trainer.gpt.decoder.layers
        self.calls: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for j, i in enumerate(trainer.layout.moe_layer_ids):
            self.calls[j] = []
            hook = lambda _m, _a, out, j=j: self.calls[j].append(out[1].detach().clone())  # noqa: E731
            self.handles.append(layers[i].mlp.router.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    ("arch", "experts"),
    [("mimo_v2_flash", "sequential"), ("mimo_v2_flash", "grouped"), ("qwen3_moe", "sequential")],
)
def test_same_numbers_as_the_torch_backend(tiny_models, make_trainer, make_megatron, arch, experts):
    """Log-probs, every metric, the grad norm and the loss after an AdamW step."""
    path = tiny_models[arch]
    samples = make_samples(load_hf(path), 6, seed=1)
    mbs = [build_micro_batch(samples[:3]), build_micro_batch(samples[3:])]
    ref = make_trainer(path)
    ours = make_megatron(path, experts=experts)
    assert ours.experts == experts
    for a, b in zip(ours.compute_logprobs(mbs), ref.compute_logprobs(mbs)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    got, want = ours.forward_backward(mbs), ref.forward_backward(mbs)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    got, want = ours.optim_step(), ref.optim_step()
    assert got.keys() == want.keys()
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert (got["lr"], got["version"]) == (want["lr"], want["version"]) == (1e-3, 1.0)
    assert ours.version == 1
    got, want = ours.forward_backward(mbs), ref.forward_backward(mbs)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_topk_teacher_kl_same_numbers_as_the_torch_backend(
    tiny_models, make_trainer, make_megatron
):
    """teacher_kl=topk: the student's side comes from the full-vocabulary logits of each
    backend; loss, metrics and grad norm agree."""
    from tests.trainer.test_torch_trainer import _with_teacher_topk

    path = tiny_models["mimo_v2_flash"]
    samples = _with_teacher_topk(
        make_samples(load_hf(path), 4, seed=7), load_hf(tiny_models["llama"]), 8
    )
    mbs = [build_micro_batch(samples)]
    algo = AlgorithmConfig(teacher_kl="topk", alpha=0.5)
    ref = make_trainer(path, algorithm=algo)
    ours = make_megatron(path, algorithm=algo)
    got, want = ours.forward_backward(mbs), ref.forward_backward(mbs)
    for key in ("loss", "teacher_log_ratio", "num_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert want["teacher_log_ratio"] < 0
    assert ours.optim_step()["grad_norm"] == pytest.approx(ref.optim_step()["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def perturbed_rollout(tiny_models):
    """Samples whose log-probs and routes come from the student with a perturbed router (an
    engine whose routing drifted), packed into two micro-batches."""
    from trainer.r3_hooks import RoutingReplay

    rollout = copy.deepcopy(load_hf(tiny_models["mimo_v2_flash"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in RoutingReplay(rollout, replay=False).gates.values():
            gate.weight.add_(0.08 * torch.randn(gate.weight.shape, generator=gen))
    (mbs,) = pack_micro_batches(
        make_samples(rollout, 8, seed=11, rollout_noise=0.0), micro_batch_tokens=48
    )
    assert len(mbs) == 2
    return mbs


def test_r3_replays_through_router_replay_and_cuts_the_mismatch(
    tiny_models, make_trainer, make_megatron, perturbed_rollout
):
    path = tiny_models["mimo_v2_flash"]
    mbs = perturbed_rollout
    on = make_megatron(path, routing_replay=True)
    off = make_megatron(path, routing_replay=False)
    seen = RouterChoices(on)
    m_on = on.forward_backward(mbs)
    m_off = off.forward_backward(mbs)
    seen.remove()

    # 100% replay: every MoE layer routed every token to exactly the recorded experts.
    for j, calls in seen.calls.items():
        assert len(calls) == len(mbs)
        for routing_map, mb in zip(calls, mbs):
            want = torch.zeros_like(routing_map)
            want.scatter_(1, torch.from_numpy(mb.routes_NLk[:, j].astype(np.int64)), True)
            assert torch.equal(routing_map, want)
    # Megatron's own top-k (before replacement) disagrees on part of the entries ...
    assert 0.5 < m_on["route_agreement"] < 0.98
    assert 0.5 < m_off["route_agreement"] < 0.98
    # ... and replaying the rollout's experts shrinks the train/rollout mismatch.
    assert m_on["train_rollout_k3"] < 0.2 * m_off["train_rollout_k3"]
    assert m_on["is_ratio_abs_dev"] < m_off["is_ratio_abs_dev"]
    # Gate weights are recomputed from the trainer's own router: the router still learns.
    grads = _main_grads(on)
    for i in on.layout.moe_layer_ids:
        g = grads[f"decoder.layers.{i}.mlp.router.weight"]
        assert torch.isfinite(g).all() and g.abs().max() > 0
    # The same numbers as the torch backend's hook-based R3, with replay on and off.
    for replay, got in ((True, m_on), (False, m_off)):
        want = make_trainer(path, routing_replay=replay).forward_backward(mbs)
        for key in ("route_agreement", "train_rollout_k3", "loss", "is_ratio_abs_dev"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), (replay, key)


def test_recompute_in_backward_replays_the_same_ids(tiny_models, make_megatron, perturbed_rollout):
    path = tiny_models["mimo_v2_flash"]
    mbs = perturbed_rollout
    plain = make_megatron(path)
    again = make_megatron(path, recompute=True)
    seen = RouterChoices(again)
    m_plain = plain.forward_backward(mbs)
    m_again = again.forward_backward(mbs)
    seen.remove()
    # Forward + recompute in backward (REPLAY_BACKWARD): two router calls per micro-batch,
    # both routed to the recorded experts.
    for j, calls in seen.calls.items():
        assert len(calls) == 2 * len(mbs)
        for first, second, mb in zip(calls[0::2], calls[1::2], mbs):
            assert torch.equal(first, second)
            ids = torch.from_numpy(mb.routes_NLk[:, j].astype(np.int64))
            assert first.gather(1, ids).all() and int(first.sum()) == ids.numel()
    a, b = _main_grads(plain), _main_grads(again)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert m_again["route_agreement"] == pytest.approx(m_plain["route_agreement"])  # counted once


def test_checkpoint_resume_is_exact(tiny_models, make_megatron, tmp_path):
    path = tiny_models["mimo_v2_flash"]
    samples = make_samples(load_hf(path), 6, seed=2)
    steps = [[build_micro_batch(samples[:3])], [build_micro_batch(samples[3:])]]
    cfg = dict(lr=1e-3, lr_schedule="cosine", steps=3, weight_decay=0.1)

    first = make_megatron(path, **cfg)
    first.forward_backward(steps[0])
    first.optim_step()
    first.save(tmp_path / "ckpt")
    rng = torch.load(tmp_path / "ckpt" / "rng_rank0.pt", weights_only=False)
    assert "model-parallel-rng" in rng["tracker"]  # Megatron's CUDA RNG tracker is saved too
    m1 = first.forward_backward(steps[1])
    m1 |= first.optim_step()
    w1 = first.hf_state_dict()

    resumed = make_megatron(path, **cfg)
    resumed.load(tmp_path / "ckpt")
    assert resumed.version == 1
    m2 = resumed.forward_backward(steps[1])
    m2 |= resumed.optim_step()
    w2 = resumed.hf_state_dict()
    assert m1 == m2  # bit for bit: weights, AdamW moments, LR schedule, version
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1["version"] == 2.0 and m1["lr"] == pytest.approx(0.75e-3)  # cosine, step 1 of 3

    # A checkpoint from another layout is refused with the fix in the message.
    state = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps(state | {"tp": 2}))
    with pytest.raises(ValueError, match="same world size / tensor_parallel"):
        resumed.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="COMMITTED"):
        (tmp_path / "half").mkdir()
        resumed.load(tmp_path / "half")


def test_export_weights_is_an_hf_checkpoint(tiny_models, make_megatron, tmp_path):
    from safetensors import safe_open

    from trainer.export import checkpoint_state_dict, read_export_version
    from trainer.megatron.model import packed_forward

    path = tiny_models["mimo_v2_flash"]
    trainer = make_megatron(path, lr=1e-2)  # model.dtype auto: fp32 on CPU
    mb = build_micro_batch(make_samples(load_hf(path), 3, seed=3, routes=False))
    trainer.forward_backward([mb])
    trainer.optim_step()
    out = trainer.export_weights(tmp_path / "export", trainer.version)
    assert read_export_version(out) == 1
    assert (out / "tokenizer.json").is_file()
    # transformers loads the trained weights and reproduces the trainer's logits.
    hf = load_hf(out)
    loaded = checkpoint_state_dict(hf, state_dict=hf.state_dict())
    ours = trainer.hf_state_dict()
    assert loaded.keys() == ours.keys()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)
    tokens = torch.from_numpy(mb.tokens_N[: mb.cu_seqlens_B1[1]].astype(np.int64))
    with torch.no_grad():
        want = hf(input_ids=tokens[None]).logits[0]
        cu = torch.tensor([0, len(tokens)], dtype=torch.int32)
        got = packed_forward(trainer.model, tokens, cu)[:, : trainer.layout.vocab_size]
    assert float((got - want).abs().max()) < 2e-5

    # Serving in bf16 (model.dtype): everything bf16 but what MiMo pins to fp32 (its router).
    trainer.export_dtype = torch.bfloat16
    out16 = trainer.export_weights(tmp_path / "export16", 7)
    assert read_export_version(out16) == 7
    with safe_open(str(next(out16.glob("*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.1.self_attn.q_proj.weight"] == "BF16"
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_protocol_factory_and_bad_inputs(tiny_models, make_megatron, world):
    from trainer.base import Trainer
    from trainer.build import build_trainer
    from trainer.megatron.backend import MegatronTrainer

    path = tiny_models["mimo_v2_flash"]
    trainer = build_trainer(
        TrainerConfig(backend="megatron"), ModelConfig(path=str(path)), AlgorithmConfig()
    )
    assert isinstance(trainer, MegatronTrainer) and isinstance(trainer, Trainer)

    mb = build_micro_batch(make_samples(load_hf(path), 2, seed=4))
    N, L, k = mb.routes_NLk.shape
    # SGLang's raw layout (one row per decoder layer, dense layer 0 included) works too.
    full = np.zeros((N, L + 1, k), dtype=np.uint8)
    full[:, 1:] = mb.routes_NLk
    (a,) = trainer.compute_logprobs([mb])
    (b,) = trainer.compute_logprobs([replace(mb, routes_NLk=full)])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="k=3 experts per token"):
        trainer.compute_logprobs([replace(mb, routes_NLk=np.zeros((N, L, 3), np.uint8))])
    with pytest.raises(ValueError, match="expert id 9"):
        bad = mb.routes_NLk.copy()
        bad[0, 0, 0] = 9
        trainer.compute_logprobs([replace(mb, routes_NLk=bad)])
    with pytest.raises(ValueError, match="vocab_size=259"):
        tokens = mb.tokens_N.copy()
        tokens[1] = 300
        trainer.compute_logprobs([replace(mb, tokens_N=tokens)])
    with pytest.raises(ValueError, match="at least one micro-batch"):
        trainer.forward_backward([])
    with pytest.raises(ValueError, match="pipeline_parallel=2"):
        make_megatron(path, pipeline_parallel=2, data_parallel=1)
    with pytest.raises(ValueError, match="1 trainer process"):
        make_megatron(path, tensor_parallel=2, expert_parallel=2)
    with pytest.raises(ValueError, match="must divide the model's 8 experts"):
        make_megatron(path, expert_parallel=3, data_parallel=3)
    with pytest.raises(ValueError, match="runs fp32 on CPU"):
        make_megatron(path, dtype="bfloat16")
