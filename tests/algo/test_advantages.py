"""Group advantages against loop references written from algorithms.md ("ORM advantages")."""

from __future__ import annotations

import statistics

import pytest
import torch

from mopd.algo.advantages import broadcast_to_tokens, group_advantages

TOL = {"atol": 1e-6, "rtol": 1e-6}


def ref_advantages(rewards: list[list[float]], method: str, eps: float) -> torch.Tensor:
    out = []
    for group in rewards:
        G = len(group)
        row = []
        for i, r in enumerate(group):
            if G == 1 or all(x == group[0] for x in group):
                row.append(0.0)
            elif method == "grpo":
                row.append((r - statistics.mean(group)) / (statistics.stdev(group) + eps))
            elif method == "drgrpo":
                row.append(r - statistics.mean(group))
            else:
                others = group[:i] + group[i + 1 :]
                row.append(r - sum(others) / len(others))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_matches_loop_reference(method: str, G: int) -> None:
    gen = torch.Generator().manual_seed(G)
    rewards_NG = torch.randn(5, G, generator=gen)
    adv_NG = group_advantages(rewards_NG, method=method, eps=1e-6)
    assert adv_NG.dtype == torch.float32 and adv_NG.shape == (5, G)
    expected = ref_advantages(rewards_NG.double().tolist(), method, 1e-6).float()
    torch.testing.assert_close(adv_NG, expected, **TOL)


def test_grpo_uses_unbiased_std() -> None:
    # rewards 0, 1: mean 0.5, unbiased std sqrt(0.5); biased std would give +-1 exactly.
    adv = group_advantages(torch.tensor([[0.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.5]]) / 0.5**0.5, **TOL)


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
def test_group_of_one_gives_zero(method: str) -> None:
    adv = group_advantages(torch.tensor([[3.0], [-1.0]]), method=method)
    assert torch.equal(adv, torch.zeros(2, 1))


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
def test_all_equal_rewards_give_exactly_zero(method: str) -> None:
    # 0.1 is not representable: mean(0.1, 0.1, 0.1) - 0.1 is not 0 in float arithmetic.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [7.0, 7.0, 7.0]])
    adv = group_advantages(rewards, method=method)
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    assert (adv[1] != 0).all()


def test_rloo_closed_form() -> None:
    # RLOO = G/(G-1) * (R - mean).
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    rloo = group_advantages(rewards, method="rloo")
    drgrpo = group_advantages(rewards, method="drgrpo")
    torch.testing.assert_close(rloo, drgrpo * 5 / 4, **TOL)


def test_integer_and_bf16_rewards_computed_in_fp32() -> None:
    ints = torch.tensor([[1, 0, 0, 1]])
    expected = group_advantages(ints.float())
    torch.testing.assert_close(group_advantages(ints), expected, **TOL)
    bf = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.bfloat16)
    out = group_advantages(bf)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, group_advantages(bf.float()), **TOL)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"method='ppo'.*grpo, drgrpo, rloo"):
        group_advantages(torch.zeros(2, 2), method="ppo")
    with pytest.raises(ValueError, match="rewards_NG must have 2 dims"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_broadcast_to_tokens() -> None:
    adv_B = torch.tensor([1.0, -2.0])
    mask_BT = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected = torch.tensor([[1.0, 1.0, 0.0], [0.0, -2.0, -2.0]])
    torch.testing.assert_close(broadcast_to_tokens(adv_B, mask_BT), expected, **TOL)
    with pytest.raises(ValueError, match="adv_B has 3 entries"):
        broadcast_to_tokens(torch.zeros(3), mask_BT)
