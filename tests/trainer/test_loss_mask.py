"""Multi-turn samples: tool-observation tokens (``RolloutSample.loss_mask_T`` = 0) stay in the
sequence as context but carry no loss, in every loss and in the metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mopd.config.schema import AlgorithmConfig
from mopd.packing import build_micro_batch
from tests.trainer.conftest import grads, load_hf, make_samples, max_diff


def _with_observations(samples):
    """The samples with a few response tokens marked as tool output, whose rollout/teacher
    log-probs are garbage (an engine reports nothing meaningful for tokens it did not sample):
    returns (masked samples, per-sample bool [T] generated masks)."""
    out, masks = [], []
    for i, s in enumerate(samples):
        T = s.sample.response_ids_T.shape[0]
        gen_T = np.ones(T, dtype=bool)
        if T >= 4:
            gen_T[1 + i % 2 : 3 + i % 2] = False  # an observation between two turns
        noisy = np.where(gen_T, s.sample.logp_rollout_T, -40.0)
        sample = dataclasses.replace(
            s.sample, loss_mask_T=gen_T.astype(np.uint8), logp_rollout_T=noisy
        )
        teacher = np.where(gen_T, s.logp_teacher_T, 3.0)
        out.append(dataclasses.replace(s, sample=sample, logp_teacher_T=teacher))
        masks.append(gen_T)
    return out, masks


@pytest.mark.parametrize("loss", ["mopd", "rl", "sft"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_loss_mask_equals_removing_the_tokens_from_the_mask_by_hand(
    tiny_models, make_trainer, loss, aggregation
):
    path = tiny_models["qwen3_moe"]
    samples = make_samples(load_hf(path), 4, seed=5, response_len=(5, 10), rollout_noise=0.2)
    masked, gen_masks = _with_observations(samples)
    assert sum((~m).sum() for m in gen_masks) >= 6
    algo = AlgorithmConfig(loss=loss, alpha=0.7, aggregation=aggregation)

    # (a) what packing makes of the multi-turn samples
    mb_a = build_micro_batch(masked)
    # (b) the single-turn samples, with the observation positions switched off by hand
    mb_plain = build_micro_batch(samples)
    hand_N = mb_plain.loss_mask_N.copy()
    offset = 0
    for s, gen_T in zip(samples, gen_masks, strict=True):
        P, T = s.sample.prompt.input_ids_P.shape[0], gen_T.shape[0]
        hand_N[offset + P : offset + P + T] &= gen_T
        offset += P + T
    mb_b = dataclasses.replace(mb_plain, loss_mask_N=hand_N)
    np.testing.assert_array_equal(mb_a.loss_mask_N, hand_N)

    results = []
    for mb in (mb_a, mb_b, mb_plain):
        trainer = make_trainer(path, algorithm=algo)
        metrics = trainer.forward_backward([mb])
        results.append((metrics, grads(trainer.model)))
    (m_a, g_a), (m_b, g_b), (m_plain, g_plain) = results
    assert m_a["loss"] == pytest.approx(m_b["loss"], abs=1e-6)
    assert max_diff(g_a, g_b) < 1e-6
    assert m_a["num_tokens"] == m_b["num_tokens"] == int(hand_N.sum())
    for key in ("masked_fraction", "train_rollout_k3", "teacher_log_ratio", "entropy"):
        if key in m_b:
            assert m_a[key] == pytest.approx(m_b[key], abs=1e-6), key
    # the mask matters: training on the observations too is another loss and gradient
    assert abs(m_plain["loss"] - m_a["loss"]) > 1e-4
    assert max_diff(g_plain, g_a) > 1e-4


def test_sft_loss_on_a_multi_turn_sample_is_the_generated_tokens_mean(tiny_models, make_trainer):
    """Closed form: token-mean SFT loss = -mean log p(generated token | everything before it,
    observations included), from a plain transformers forward of the whole sequence."""
    path = tiny_models["mimo_v2_flash"]
    hf = load_hf(path)
    samples = make_samples(hf, 2, seed=6, prompt_len=(3, 5), response_len=(9, 12))
    masked, gen_masks = _with_observations(samples)
    trainer = make_trainer(path, algorithm=AlgorithmConfig(loss="sft", aggregation="token_mean"))
    metrics = trainer.forward_backward([build_micro_batch(masked)])
    total, count = 0.0, 0
    for s, gen_T in zip(samples, gen_masks, strict=True):
        tokens = np.concatenate([s.sample.prompt.input_ids_P, s.sample.response_ids_T])
        P = s.sample.prompt.input_ids_P.shape[0]
        with torch.no_grad():
            logits = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]
        logp = torch.log_softmax(logits[:-1], -1).gather(
            1, torch.from_numpy(tokens[1:]).long()[:, None]
        )[:, 0]
        response_logp = logp[P - 1 :].numpy()
        total += float(-response_logp[gen_T].sum())
        count += int(gen_T.sum())
    assert metrics["loss"] == pytest.approx(total / count, abs=1e-5)
