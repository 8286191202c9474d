"""The hop records validate shapes and dtypes at construction, and coerce to compact dtypes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mopd.types import MicroBatch, Prompt, RolloutSample, ScoredSample


def _prompt(p: int = 3) -> Prompt:
    return Prompt(prompt_id="p0", source="s", domain="math", input_ids_P=list(range(1, p + 1)))


def _sample(t: int = 4, routes: bool = True) -> RolloutSample:
    prompt = _prompt()
    s = prompt.input_ids_P.shape[0] + t
    return RolloutSample(
        sample_id="p0/0",
        prompt=prompt,
        response_ids_T=np.arange(t),
        logp_rollout_T=-np.ones(t, dtype=np.float64),
        versions_T=np.zeros(t),
        finish_reason="stop",
        routes_SLk=np.zeros((s - 1, 2, 2), dtype=np.uint8) if routes else None,
    )


def test_records_coerce_dtypes_and_are_frozen():
    s = _sample()
    assert s.prompt.input_ids_P.dtype == np.int32
    assert s.response_ids_T.dtype == np.int32
    assert s.logp_rollout_T.dtype == np.float32
    assert s.num_tokens == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.finish_reason = "length"  # type: ignore[misc]


def test_rollout_sample_rejects_misaligned_arrays():
    prompt = _prompt()
    with pytest.raises(ValueError, match="logp_rollout_T has 3 entries for 4 tokens"):
        RolloutSample("x", prompt, np.arange(4), np.zeros(3), np.zeros(4), "stop")
    with pytest.raises(ValueError, match="expected prompt \\+ response - 1 = 6"):
        RolloutSample(
            "x",
            prompt,
            np.arange(4),
            np.zeros(4),
            np.zeros(4),
            "stop",
            np.zeros((7, 2, 2), np.uint8),
        )
    with pytest.raises(ValueError, match="uint8/uint16"):
        RolloutSample(
            "x",
            prompt,
            np.arange(4),
            np.zeros(4),
            np.zeros(4),
            "stop",
            np.zeros((6, 2, 2), np.int64),
        )
    with pytest.raises(ValueError, match="has no tokens"):
        Prompt("p", "s", "d", np.zeros(0))


def test_scored_sample_checks_teacher_arrays():
    s = _sample()
    ok = ScoredSample(s, reward=1.0, advantage=0.5, logp_teacher_T=np.zeros(4))
    assert ok.logp_teacher_T.dtype == np.float32
    with pytest.raises(ValueError, match="logp_teacher_T has 5 entries for 4 tokens"):
        ScoredSample(s, 1.0, 0.5, logp_teacher_T=np.zeros(5))
    with pytest.raises(ValueError, match="go together"):
        ScoredSample(s, 1.0, 0.5, teacher_topk_logp_TK=np.zeros((4, 2)))
    topk = ScoredSample(
        s, 1.0, 0.5, teacher_topk_logp_TK=np.zeros((4, 2)), teacher_topk_ids_TK=np.ones((4, 2))
    )
    assert topk.teacher_topk_logp_TK.dtype == np.float32
    assert topk.teacher_topk_ids_TK.dtype == np.int32
    with pytest.raises(ValueError, match=r"teacher_topk_logp_TK must be \[T=4, K\]"):
        ScoredSample(
            s, 1.0, 0.5, teacher_topk_logp_TK=np.zeros((5, 2)), teacher_topk_ids_TK=np.ones((5, 2))
        )
    with pytest.raises(ValueError, match="teacher_topk_ids_TK must have the shape"):
        ScoredSample(
            s, 1.0, 0.5, teacher_topk_logp_TK=np.zeros((4, 2)), teacher_topk_ids_TK=np.ones((4, 3))
        )


def test_micro_batch_checks_packing():
    n = 7
    mb = MicroBatch(
        tokens_N=np.arange(n),
        cu_seqlens_B1=[0, 3, 7],
        loss_mask_N=[0, 0, 1, 0, 1, 1, 1],
        logp_rollout_N=np.zeros(n),
        adv_orm_B=[1.0, -1.0],
        routes_NLk=np.zeros((n, 2, 2), np.uint16),
        sample_ids=("a", "b"),
    )
    assert mb.num_sequences == 2 and mb.num_tokens == 7
    assert mb.loss_mask_N.dtype == bool and int(mb.loss_mask_N.sum()) == 4
    with pytest.raises(ValueError, match=r"cu_seqlens must run 0\.\.N"):
        MicroBatch(np.arange(n), [0, 3, 6], np.zeros(n), np.zeros(n), [1.0, 1.0])
    with pytest.raises(ValueError, match="adv_orm_B has 1 entries for 2 sequences"):
        MicroBatch(np.arange(n), [0, 3, 7], np.zeros(n), np.zeros(n), [1.0])
    args = (np.arange(n), [0, 3, 7], np.zeros(n), np.zeros(n), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"teacher_topk_logp_NK must be \[N=7, K\]"):
        MicroBatch(
            *args, teacher_topk_logp_NK=np.zeros((6, 2)), teacher_topk_ids_NK=np.ones((6, 2))
        )
    with pytest.raises(
        ValueError, match="teacher_topk_logp_NK and teacher_topk_ids_NK go together"
    ):
        MicroBatch(*args, teacher_topk_ids_NK=np.ones((7, 2)))
    with pytest.raises(ValueError, match="strictly increasing"):
        MicroBatch(np.arange(n), [0, 3, 3, 7], np.zeros(n), np.zeros(n), [1.0, 1.0, 1.0])


def test_multi_turn_fields_loss_mask_and_reward():
    base = _sample(t=5)
    s = dataclasses.replace(base, loss_mask_T=[True, True, False, False, True], reward=1)
    assert s.loss_mask_T.dtype == np.uint8 and s.loss_mask_T.tolist() == [1, 1, 0, 0, 1]
    assert s.generated_mask_T.tolist() == [True, True, False, False, True]
    assert s.reward == 1.0 and isinstance(s.reward, float)
    assert base.loss_mask_T is None and base.reward is None
    assert base.generated_mask_T.tolist() == [True] * 5  # None: every token generated
    with pytest.raises(ValueError, match="loss_mask_T must be \\[T=5\\]"):
        dataclasses.replace(base, loss_mask_T=[1, 0, 1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        dataclasses.replace(base, loss_mask_T=[1, 2, 1, 1, 1])
    with pytest.raises(ValueError, match="bool or 0/1 integers"):
        dataclasses.replace(base, loss_mask_T=np.ones(5) * 0.5)
    with pytest.raises(ValueError, match="finite number"):
        dataclasses.replace(base, reward=float("nan"))
    with pytest.raises(ValueError, match="finite number"):
        dataclasses.replace(base, reward="1")
