"""The registry maps every config string to a working function or an accepted option."""

from __future__ import annotations

import pytest
import torch

from mopd.algo import advantages, kl, losses, registry, routing


def test_tables_have_the_documented_keys() -> None:
    assert set(registry.ADVANTAGE_ESTIMATORS) == {"grpo", "drgrpo", "rloo"}
    assert {
        "sft": losses.sft_loss,
        "rl": losses.policy_gradient_loss,
        "mopd": losses.mopd_loss,
    } == registry.LOSSES
    assert {"k1": kl.kl_k1, "k2": kl.kl_k2, "k3": kl.kl_k3} == registry.KL_ESTIMATORS
    assert registry.AGGREGATIONS == ("seq_mean_token_mean", "token_mean")
    assert registry.IS_CORRECTIONS == ("mask", "truncate", "ppo_clip")
    assert registry.ROUTER_SCORE_FUNCS == ("sigmoid", "softmax")
    assert registry.TEACHER_KL_MODES == ("sampled", "topk")
    assert registry.STUDENT_LOGPROB_SOURCES == ("train", "rollout")


def test_every_option_is_accepted_by_its_function() -> None:
    lt = -torch.rand(2, 3)
    lr, adv, mask = lt + 0.01, torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    t_k = torch.randn(2, 3, 4).log_softmax(-1)
    for name, fn in registry.ADVANTAGE_ESTIMATORS.items():
        torch.testing.assert_close(
            fn(torch.tensor([[1.0, 0.0]])), advantages.group_advantages(
                torch.tensor([[1.0, 0.0]]), method=name), atol=0, rtol=0
        )  # fmt: skip
    for agg in registry.AGGREGATIONS:
        for src in registry.STUDENT_LOGPROB_SOURCES:
            for mode in registry.TEACHER_KL_MODES:
                topk = {"teacher_topk_logp_BTK": t_k, "student_topk_logp_BTK": t_k - 0.1}
                losses.mopd_loss(
                    lt, lr, lt, adv, mask, aggregation=agg, student_logprob_source=src,
                    teacher_kl=mode, **(topk if mode == "topk" else {}),
                )  # fmt: skip
        for corr in registry.IS_CORRECTIONS:
            losses.policy_gradient_loss(lt, lr, adv, mask, is_correction=corr, aggregation=agg)
        losses.sft_loss(lt, mask, aggregation=agg)
    for score_func in registry.ROUTER_SCORE_FUNCS:
        routing.replay_gate_weights(torch.randn(2, 8), torch.tensor([[0, 1], [2, 3]]),
                                    score_func=score_func)  # fmt: skip
    for fn in registry.KL_ESTIMATORS.values():
        assert fn(lt, lr).shape == lt.shape


def test_lookup() -> None:
    assert registry.lookup("LOSSES", registry.LOSSES, "mopd") is losses.mopd_loss
    assert registry.lookup("AGGREGATIONS", registry.AGGREGATIONS, "token_mean") == "token_mean"
    with pytest.raises(
        ValueError, match=r"ADVANTAGE_ESTIMATORS: unknown key 'ppo'.*grpo, drgrpo, rloo"
    ):
        registry.lookup("ADVANTAGE_ESTIMATORS", registry.ADVANTAGE_ESTIMATORS, "ppo")
    with pytest.raises(ValueError, match=r"IS_CORRECTIONS: unknown key 'clip'.*mask, truncate"):
        registry.lookup("IS_CORRECTIONS", registry.IS_CORRECTIONS, "clip")
