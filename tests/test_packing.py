"""Packing lays every per-token field on the token it scores and splits a step into
token-balanced micro-batches, the same number per data-parallel rank."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mopd.packing import build_micro_batch, pack_micro_batches, sequence_length
from mopd.types import Prompt, RolloutSample, ScoredSample


def _scored(
    i: int,
    P: int,
    T: int,
    *,
    L: int = 2,
    k: int = 2,
    routes: bool = True,
    teacher: bool = True,
    route_dtype=np.uint8,
    domain: str = "math",
) -> ScoredSample:
    S = P + T
    prompt = Prompt(
        prompt_id=f"p{i}", source="s", domain=domain, input_ids_P=100 * i + np.arange(P) + 1
    )
    # Route row j holds ids (j, j + 1) on every layer, so a row's origin is readable.
    r = (
        np.stack([np.stack([[j % 250, (j + 1) % 250]] * L) for j in range(S - 1)])
        if S > 1
        else None
    )
    sample = RolloutSample(
        sample_id=f"s{i}",
        prompt=prompt,
        response_ids_T=100 * i + 50 + np.arange(T),
        logp_rollout_T=-(np.arange(T) + 1.0) / 10,
        versions_T=np.full(T, i),
        finish_reason="stop",
        routes_SLk=r.astype(route_dtype) if (routes and r is not None) else None,
    )
    return ScoredSample(
        sample=sample,
        reward=1.0,
        advantage=0.5 * i,
        logp_teacher_T=-(np.arange(T) + 1.0) if teacher else None,
    )


def test_fields_align_to_the_token_they_score():
    mb = build_micro_batch([_scored(1, 3, 2), _scored(2, 2, 3)])
    np.testing.assert_array_equal(mb.cu_seqlens_B1, [0, 5, 10])
    np.testing.assert_array_equal(mb.tokens_N, [101, 102, 103, 150, 151, 201, 202, 250, 251, 252])
    np.testing.assert_array_equal(mb.loss_mask_N, [0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(mb.logp_rollout_N, [0, 0, 0, -0.1, -0.2, 0, 0, -0.1, -0.2, -0.3])
    np.testing.assert_allclose(mb.logp_teacher_N, [0, 0, 0, -1, -2, 0, 0, -1, -2, -3])
    np.testing.assert_array_equal(mb.versions_N, [-1, -1, -1, 1, 1, -1, -1, 2, 2, 2])
    np.testing.assert_allclose(mb.adv_orm_B, [0.5, 1.0])
    assert mb.sample_ids == ("s1", "s2") and mb.domains == ("math", "math")
    # Route row i is token i's; the last token of each sequence repeats the row before it.
    assert mb.routes_NLk.shape == (10, 2, 2) and mb.routes_NLk.dtype == np.uint8
    np.testing.assert_array_equal(mb.routes_NLk[:, 0, 0], [0, 1, 2, 3, 3, 0, 1, 2, 3, 3])


def test_loss_mask_excludes_tool_observation_tokens():
    import dataclasses

    plain = _scored(1, 3, 5)
    # Response: 2 generated, 2 observation tokens, 1 generated (a two-turn trajectory).
    sample = dataclasses.replace(plain.sample, loss_mask_T=[1, 1, 0, 0, 1])
    multi = dataclasses.replace(plain, sample=sample)
    mb = build_micro_batch([multi, _scored(2, 2, 2)])
    np.testing.assert_array_equal(mb.loss_mask_N, [0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1])
    # log-probs are 0 where the mask is off (the engine's numbers for observations mean nothing)
    np.testing.assert_allclose(
        mb.logp_rollout_N, [0, 0, 0, -0.1, -0.2, 0, 0, -0.5, 0, 0, -0.1, -0.2], rtol=1e-6
    )
    np.testing.assert_allclose(mb.logp_teacher_N[:8], [0, 0, 0, -1, -2, 0, 0, -5])
    # tokens and routes are untouched: observations stay in the sequence as context
    np.testing.assert_array_equal(mb.tokens_N[:8], [101, 102, 103, 150, 151, 152, 153, 154])
    assert mb.routes_NLk.shape[0] == 12


def test_optional_fields_absent_stay_absent():
    mb = build_micro_batch([_scored(1, 2, 2, routes=False, teacher=False)])
    assert mb.routes_NLk is None and mb.logp_teacher_N is None


def test_split_is_token_balanced_with_equal_micro_batch_counts():
    rng = np.random.default_rng(0)
    samples = [_scored(i, int(rng.integers(2, 20)), int(rng.integers(1, 40))) for i in range(1, 41)]
    limit = 64
    ranks = pack_micro_batches(samples, micro_batch_tokens=limit, dp_size=3)
    assert len(ranks) == 3 and len({len(r) for r in ranks}) == 1
    seen = [sid for r in ranks for mb in r for sid in mb.sample_ids]
    assert sorted(seen) == sorted(s.sample.sample_id for s in samples)  # each exactly once
    assert all(mb.num_tokens <= limit for r in ranks for mb in r)
    total = sum(sequence_length(s) for s in samples)
    load = [sum(mb.num_tokens for mb in r) for r in ranks]
    assert sum(load) == total
    assert max(load) - min(load) <= max(sequence_length(s) for s in samples)
    # Bin packing is tight: micro-batches are on average more than 80% full.
    assert total / (3 * len(ranks[0]) * limit) > 0.8


def test_oversized_sequence_gets_its_own_micro_batch(caplog):
    samples = [_scored(1, 4, 40), _scored(2, 3, 3), _scored(3, 2, 2)]
    with caplog.at_level(logging.WARNING, logger="mopd.packing"):
        (mbs,) = pack_micro_batches(samples, micro_batch_tokens=16)
    assert "more than micro_batch_tokens=16" in caplog.text
    alone = [mb for mb in mbs if "s1" in mb.sample_ids]
    assert len(alone) == 1 and alone[0].sample_ids == ("s1",)
    assert sorted(sid for mb in mbs for sid in mb.sample_ids) == ["s1", "s2", "s3"]


def test_micro_batches_are_split_to_give_every_rank_work():
    samples = [_scored(i, 2, 2) for i in range(1, 5)]  # 16 tokens: one micro-batch of 64
    ranks = pack_micro_batches(samples, micro_batch_tokens=64, dp_size=4)
    assert [len(r) for r in ranks] == [1, 1, 1, 1]
    assert all(r[0].num_sequences == 1 and r[0].sample_ids for r in ranks)


def test_fillers_when_there_are_fewer_sequences_than_slots():
    samples = [_scored(1, 3, 4), _scored(2, 2, 2)]
    ranks = pack_micro_batches(samples, micro_batch_tokens=64, dp_size=4)
    assert [len(r) for r in ranks] == [1, 1, 1, 1]
    fillers = [r[0] for r in ranks if not r[0].sample_ids]
    assert len(fillers) == 2
    for f in fillers:
        assert f.num_tokens == 1 and not f.loss_mask_N.any()
        assert f.routes_NLk.shape == (1, 2, 2) and f.logp_teacher_N.shape == (1,)


def test_route_dtype_widens_to_uint16_when_any_sample_needs_it():
    mb = build_micro_batch([_scored(1, 2, 2), _scored(2, 2, 2, route_dtype=np.uint16)])
    assert mb.routes_NLk.dtype == np.uint16


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([], "at least one ScoredSample"),
        ([_scored(1, 2, 2), _scored(2, 2, 2, teacher=False)], "no teacher log-probs"),
        ([_scored(1, 2, 2), _scored(2, 2, 2, routes=False)], "carry no routes"),
        ([_scored(1, 2, 2), _scored(2, 2, 2, L=3)], "different [L, k] shapes"),
    ],
)
def test_inconsistent_batches_are_rejected(samples, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        pack_micro_batches(samples, micro_batch_tokens=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch_tokens": 0}, "micro_batch_tokens"),
        ({"micro_batch_tokens": 8.5}, "micro_batch_tokens"),
        ({"micro_batch_tokens": 8, "dp_size": 0}, "dp_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack_micro_batches([_scored(1, 2, 2)], **kwargs)


def _with_topk(scored: ScoredSample, K: int) -> ScoredSample:
    import dataclasses

    T = scored.sample.response_ids_T.shape[0]
    logp_TK = -(np.arange(T)[:, None] + 1.0) - np.arange(K)[None, :] / 10
    ids_TK = (np.arange(T)[:, None] * 10 + np.arange(K)[None, :]).astype(np.int32)
    return dataclasses.replace(scored, teacher_topk_logp_TK=logp_TK, teacher_topk_ids_TK=ids_TK)


def test_teacher_topk_aligns_to_the_token_it_scores_and_fillers_carry_it():
    a, b = _with_topk(_scored(1, 3, 2), 3), _with_topk(_scored(2, 2, 3), 3)
    mb = build_micro_batch([a, b])
    assert mb.teacher_topk_logp_NK.shape == (10, 3) and mb.teacher_topk_ids_NK.dtype == np.int32
    # prompt rows are zero; response row t holds the teacher's top-k for response token t
    np.testing.assert_allclose(mb.teacher_topk_logp_NK[:, 0], [0, 0, 0, -1, -2, 0, 0, -1, -2, -3])
    np.testing.assert_array_equal(mb.teacher_topk_ids_NK[3], [0, 1, 2])
    np.testing.assert_array_equal(mb.teacher_topk_ids_NK[9], [20, 21, 22])
    ranks = pack_micro_batches([a, b], micro_batch_tokens=64, dp_size=4)
    filler = next(r[0] for r in ranks if not r[0].sample_ids)
    assert filler.teacher_topk_logp_NK.shape == (1, 3) and filler.teacher_topk_ids_NK.shape == (
        1,
        3,
    )


def test_teacher_topk_of_different_widths_is_rejected():
    with pytest.raises(ValueError, match="same top_logprobs"):
        build_micro_batch([_with_topk(_scored(1, 3, 2), 3), _with_topk(_scored(2, 2, 3), 4)])
    with pytest.raises(ValueError, match="same top_logprobs"):
        build_micro_batch([_with_topk(_scored(1, 3, 2), 3), _scored(2, 2, 3)])
