"""TorchTrainer: packed forward = unpacked forward, exact gradient accumulation, the loss is
mopd.algo's, metrics, optimizer and schedule, clear errors on bad micro-batches."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mopd.algo import mopd_loss, policy_gradient_loss, sft_loss, train_rollout_mismatch
from mopd.config.schema import AlgorithmConfig, TrainerConfig
from mopd.packing import build_micro_batch, pack_micro_batches
from tests.trainer.conftest import grads, load_hf, make_samples, max_diff
from trainer.base import Trainer
from trainer.optim import build_optimizer, lr_at


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("arch", ["mimo_v2_flash", "qwen3_moe", "llama"])
def test_packed_logprobs_equal_unpacked_forward(
    tiny_models, make_trainer, arch, layout, monkeypatch
):
    hf = load_hf(tiny_models[arch])
    samples = make_samples(hf, 5, seed=1, prompt_len=(2, 12), response_len=(2, 14))
    # The sliding window (8 in the tiny MiMo) must be exercised inside a packed row.
    assert max(s.sample.num_tokens for s in samples) > 10
    trainer = make_trainer(tiny_models[arch], routing_replay=False)
    # CPU attention is eager/sdpa, so the trainer pads; the packed row (what it runs with a
    # varlen flash kernel on GPU) must give the same log-probs through the block mask.
    assert not trainer.packed
    if layout == "packed":
        monkeypatch.setattr(type(trainer), "packed", property(lambda self: True))
    (packed,) = trainer.compute_logprobs([build_micro_batch(samples)])
    offset = 0
    for s in samples:
        tokens = np.concatenate([s.sample.prompt.input_ids_P, s.sample.response_ids_T])
        with torch.no_grad():
            logits = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]
        ref = torch.log_softmax(logits[:-1], -1).gather(
            1, torch.from_numpy(tokens[1:]).long()[:, None]
        )
        got = packed[offset + 1 : offset + len(tokens)]
        np.testing.assert_allclose(got, ref[:, 0].numpy(), atol=1e-5, rtol=0)
        assert packed[offset] == 0.0
        offset += len(tokens)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_gradient_accumulation_equals_one_big_batch(tiny_models, make_trainer, aggregation):
    path = tiny_models["mimo_v2_flash"]
    samples = make_samples(load_hf(path), 7, seed=2)
    algo = AlgorithmConfig(aggregation=aggregation)
    one = make_trainer(path, algorithm=algo)
    m_one = one.forward_backward([build_micro_batch(samples)])
    g_one = grads(one.model)

    three = make_trainer(path, algorithm=algo)
    (mbs,) = pack_micro_batches(samples, micro_batch_tokens=32)
    assert len(mbs) == 3
    m_three = three.forward_backward(mbs)
    assert max_diff(g_one, grads(three.model)) < 1e-6
    # Padded batches of different shapes sum in a different order: fp32 rounding only.
    assert m_three["loss"] == pytest.approx(m_one["loss"], rel=2e-6)
    for key in ("num_tokens", "num_samples", "tokens"):
        assert m_three[key] == m_one[key]
    for key in ("masked_fraction", "teacher_log_ratio", "entropy", "train_rollout_k3"):
        assert m_three[key] == pytest.approx(m_one[key], abs=1e-6)
    assert abs(m_one["loss"]) > 0 and m_one["num_samples"] == 7


def _padded(mb, x_N):
    cu = mb.cu_seqlens_B1
    T = int(np.diff(cu).max())
    out = np.zeros((mb.num_sequences, T), dtype=np.float32)
    for b in range(mb.num_sequences):
        out[b, : cu[b + 1] - cu[b]] = x_N[cu[b] : cu[b + 1]]
    return torch.from_numpy(out)


@pytest.mark.parametrize("loss", ["mopd", "rl", "sft"])
def test_loss_is_mopd_algo_on_the_trainers_logprobs(tiny_models, make_trainer, loss):
    path = tiny_models["qwen3_moe"]
    mb = build_micro_batch(make_samples(load_hf(path), 4, seed=3, rollout_noise=0.2))
    algo = AlgorithmConfig(loss=loss, alpha=0.7, eps_low=0.8, eps_high=1.25)
    trainer = make_trainer(path, algorithm=algo)
    (logp_N,) = trainer.compute_logprobs([mb])
    metrics = trainer.forward_backward([mb])

    logp = _padded(mb, logp_N)
    rollout = _padded(mb, mb.logp_rollout_N)
    mask = _padded(mb, mb.loss_mask_N.astype(np.float32)) > 0
    adv = torch.from_numpy(mb.adv_orm_B)
    if loss == "mopd":
        teacher = _padded(mb, mb.logp_teacher_N)
        ref, ref_m = mopd_loss(
            logp, rollout, teacher, adv, mask, alpha=0.7, eps_low=0.8, eps_high=1.25
        )
    elif loss == "rl":
        ref, ref_m = policy_gradient_loss(logp, rollout, adv, mask, eps_low=0.8, eps_high=1.25)
    else:
        ref, ref_m = sft_loss(logp, mask)
    assert metrics["loss"] == pytest.approx(float(ref), abs=1e-6)
    for key, value in ref_m.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key
    if loss != "sft":
        k3 = train_rollout_mismatch(rollout, logp, mask)
        assert metrics["train_rollout_k3"] == pytest.approx(float(k3), abs=1e-6)
        assert 0 < metrics["masked_fraction"] < 1  # the tight IS window masks some tokens


def test_metrics_cover_the_step(tiny_models, make_trainer):
    path = tiny_models["mimo_v2_flash"]
    samples = make_samples(load_hf(path), 6, seed=4)
    trainer = make_trainer(path)
    m = trainer.forward_backward(pack_micro_batches(samples, micro_batch_tokens=40)[0])
    expected = {
        "loss", "grad_norm", "lr", "masked_fraction", "teacher_log_ratio", "is_ratio_mean",
        "is_ratio_abs_dev", "train_rollout_k3", "route_agreement", "entropy", "tokens",
        "num_tokens", "version", "teacher_log_ratio/math", "teacher_log_ratio/code",
        "orm_adv/math", "orm_adv/code", "staleness_max",
    }  # fmt: skip
    m |= trainer.optim_step()
    assert expected <= m.keys(), expected - m.keys()
    assert all(math.isfinite(v) for v in m.values())
    assert m["version"] == 1 and trainer.version == 1
    # Own routes replayed on the model that recorded them: the trainer agrees everywhere.
    assert m["route_agreement"] == 1.0
    # teacher log-probs are the student's minus |noise|: the log-ratio is negative per domain.
    assert m["teacher_log_ratio/math"] < 0 and m["teacher_log_ratio/code"] < 0
    assert m["tokens"] == sum(s.sample.num_tokens for s in samples)
    assert 0 < m["entropy"] < math.log(259)


def test_optim_step_clips_steps_and_follows_the_schedule(tiny_models, make_trainer):
    path = tiny_models["llama"]
    cfg = dict(
        lr=1e-2, min_lr=1e-3, lr_schedule="cosine", warmup_steps=2, steps=6, weight_decay=0.1,
        adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, grad_clip=0.5, routing_replay=False,
    )  # fmt: skip
    trainer = make_trainer(path, **cfg)
    groups = trainer.optimizer.param_groups
    assert groups[0]["betas"] == (0.8, 0.9) and groups[0]["eps"] == 1e-6
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}
    mb = build_micro_batch(make_samples(load_hf(path), 3, seed=5, routes=False))
    lrs = []
    for _ in range(4):
        trainer.forward_backward([mb])
        norm = torch.sqrt(sum((p.grad**2).sum() for p in trainer.model.parameters()))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        out = trainer.optim_step()
        assert out["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
        assert any((p - before[n]).abs().max() > 0 for n, p in trainer.model.named_parameters())
        assert all(p.grad is None for p in trainer.model.parameters())
        lrs.append(out["lr"])
    full = TrainerConfig(**cfg)
    assert lrs == pytest.approx([lr_at(s, full) for s in range(4)])
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)


def test_lr_schedules_closed_form():
    base = TrainerConfig(lr=1.0, min_lr=0.1, warmup_steps=2, steps=12)
    lin = dataclasses.replace(base, lr_schedule="linear")
    cos = dataclasses.replace(base, lr_schedule="cosine")
    assert [lr_at(s, base) for s in (0, 1, 2, 50)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(7, lin) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(7, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(4, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(12, lin) == pytest.approx(0.1) and lr_at(99, cos) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, dataclasses.replace(base, lr_schedule="step"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], base)


def test_satisfies_the_protocol(tiny_models, make_trainer):
    assert isinstance(make_trainer(tiny_models["llama"]), Trainer)


def test_bad_micro_batches_fail_clearly(tiny_models, make_trainer):
    path = tiny_models["llama"]
    trainer = make_trainer(path)
    mb = build_micro_batch(make_samples(load_hf(path), 2, seed=6, routes=False))
    first_loss = dataclasses.replace(mb, loss_mask_N=np.ones_like(mb.loss_mask_N))
    with pytest.raises(ValueError, match="first token"):
        trainer.forward_backward([first_loss])
    big = dataclasses.replace(mb, tokens_N=mb.tokens_N + 1000)
    with pytest.raises(ValueError, match="vocab_size=259"):
        trainer.forward_backward([big])
    with pytest.raises(ValueError, match="needs teacher log-probs"):
        trainer.forward_backward([dataclasses.replace(mb, logp_teacher_N=None)])
    with pytest.raises(ValueError, match="at least one micro-batch"):
        trainer.forward_backward([])
    with pytest.raises(ValueError, match="kl_coef"):
        make_trainer(path, algorithm=AlgorithmConfig(loss="rl", kl_coef=0.1))
    with pytest.raises(FileNotFoundError, match="not a local checkpoint folder"):
        make_trainer(path / "missing")


def _with_teacher_topk(samples, teacher, k: int):
    """The samples with ``teacher``'s top-k log-probs and ids at every response position."""
    out = []
    for s in samples:
        tokens = np.concatenate([s.sample.prompt.input_ids_P, s.sample.response_ids_T])
        with torch.no_grad():
            logits = teacher(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]
        P = s.sample.prompt.input_ids_P.shape[0]
        top = torch.log_softmax(logits[P - 1 : -1].float(), -1).topk(k, dim=-1)
        out.append(
            dataclasses.replace(
                s,
                teacher_topk_logp_TK=top.values.numpy(),
                teacher_topk_ids_TK=top.indices.numpy().astype(np.int32),
            )
        )
    return out


@pytest.mark.parametrize("k", [8, 259])
def test_topk_teacher_kl_trains_the_students_distribution(tiny_models, make_trainer, k):
    """teacher_kl=topk: the trainer's loss and gradient are mopd_loss(teacher_kl=topk) on the
    model's own log-softmax at the teacher's ids (autograd through the HF model, no replay)."""
    path, teacher_path = tiny_models["qwen3_moe"], tiny_models["llama"]
    hf = load_hf(path)
    samples = _with_teacher_topk(
        make_samples(hf, 4, seed=5, routes=False), load_hf(teacher_path), k
    )
    mb = build_micro_batch(samples)
    assert mb.teacher_topk_logp_NK is not None and mb.teacher_topk_logp_NK.shape[1] == k
    algo = AlgorithmConfig(alpha=0.5, teacher_kl="topk")
    trainer = make_trainer(path, algorithm=algo, routing_replay=False)
    metrics = trainer.forward_backward([mb])

    ref_model = load_hf(path).train()
    B, T = len(samples), max(s.sample.response_ids_T.shape[0] for s in samples)
    logp = torch.zeros(B, T)
    rollout = torch.zeros(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    t_topk = torch.zeros(B, T, k)
    s_topk = torch.zeros(B, T, k)
    for b, s in enumerate(samples):
        tokens = np.concatenate([s.sample.prompt.input_ids_P, s.sample.response_ids_T])
        P, n = s.sample.prompt.input_ids_P.shape[0], s.sample.response_ids_T.shape[0]
        logits = ref_model(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]
        lsm = torch.log_softmax(logits[P - 1 : -1].float(), -1)
        resp = torch.from_numpy(s.sample.response_ids_T.astype(np.int64))
        logp = logp.index_put(
            (torch.tensor([b]), torch.arange(n)), lsm.gather(1, resp[:, None])[:, 0]
        )
        ids = torch.from_numpy(s.teacher_topk_ids_TK.astype(np.int64))
        s_topk = s_topk.index_put((torch.tensor([b]), torch.arange(n)), lsm.gather(1, ids))
        t_topk[b, :n] = torch.from_numpy(s.teacher_topk_logp_TK)
        rollout[b, :n] = torch.from_numpy(s.sample.logp_rollout_T.astype(np.float32))
        mask[b, :n] = True
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    ref, ref_m = mopd_loss(
        logp, rollout, None, adv, mask, alpha=0.5, teacher_kl="topk",
        teacher_topk_logp_BTK=t_topk, student_topk_logp_BTK=s_topk,
    )  # fmt: skip
    ref.backward()
    assert metrics["loss"] == pytest.approx(float(ref.detach()), abs=1e-6)
    assert metrics["teacher_log_ratio"] == pytest.approx(ref_m["teacher_log_ratio"], abs=1e-5)
    assert ref_m["teacher_log_ratio"] < 0  # -KL to a different model
    g_ref = grads(ref_model)
    assert max_diff(grads(trainer.model), g_ref) < 1e-5
    assert max(float(g.abs().max()) for g in g_ref.values()) > 1e-3  # a real gradient


def test_topk_teacher_kl_without_topk_logprobs_fails_clearly(tiny_models, make_trainer):
    path = tiny_models["qwen3_moe"]
    mb = build_micro_batch(make_samples(load_hf(path), 2, seed=6, routes=False))
    trainer = make_trainer(path, algorithm=AlgorithmConfig(teacher_kl="topk"), routing_replay=False)
    with pytest.raises(ValueError, match=r"teachers\[\*\]\.top_logprobs"):
        trainer.forward_backward([mb])
