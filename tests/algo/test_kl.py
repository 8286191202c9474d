"""KL estimators against per-element references (algorithms.md, "KL estimators")."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.algo.kl import kl_k1, kl_k2, kl_k3, masked_mean, train_rollout_mismatch

TOL = {"atol": 1e-6, "rtol": 1e-6}

REF = {
    "k1": lambda d: d,
    "k2": lambda d: d * d / 2,
    "k3": lambda d: math.exp(-d) - 1 + d,
}
FUNCS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_estimators_match_formula_and_grad(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 4, generator=gen) * 0.5).requires_grad_()
    b = (torch.randn(3, 4, generator=gen) * 0.5).requires_grad_()
    out = FUNCS[name](a, b)
    expected = torch.tensor(
        [[REF[name](x - y) for x, y in zip(ra, rb)] for ra, rb in zip(a.tolist(), b.tolist())]
    )
    torch.testing.assert_close(out, expected, **TOL)
    # gradient vs autograd of the textbook formula
    d = a - b
    textbook = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d}[name]
    w = torch.randn(3, 4, generator=gen)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    ea, eb = torch.autograd.grad((textbook * w).sum(), (a, b))
    torch.testing.assert_close(ga, ea, **TOL)
    torch.testing.assert_close(gb, eb, **TOL)


def test_k3_nonnegative_and_k1_unbiased_on_samples() -> None:
    gen = torch.Generator().manual_seed(1)
    logits_a, logits_b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    la, lb = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
    exact = float((la.exp() * (la - lb)).sum())
    x = torch.multinomial(la.exp(), 200_000, replacement=True, generator=gen)
    k1, k3 = kl_k1(la[x], lb[x]), kl_k3(la[x], lb[x])
    assert (k3 >= 0).all()
    assert abs(float(k1.mean()) - exact) < 0.02 and abs(float(k3.mean()) - exact) < 0.02


def test_masked_mean_ignores_padding_and_handles_empty() -> None:
    x = torch.tensor([[1.0, float("inf")], [3.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    out = masked_mean(x, mask)
    torch.testing.assert_close(out, torch.tensor(2.0), **TOL)
    out.backward()
    assert torch.equal(x.grad, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))
    empty = masked_mean(torch.ones(2, 2), torch.zeros(2, 2))
    assert empty.item() == 0.0


def test_train_rollout_mismatch_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    lr, lt = -torch.rand(3, 5, generator=gen) * 3, -torch.rand(3, 5, generator=gen) * 3
    mask = torch.rand(3, 5, generator=gen) > 0.4
    lt[~mask] = -float("inf")  # padding never read
    vals = [
        math.exp(-(lr[b, t].item() - lt[b, t].item())) - 1 + (lr[b, t].item() - lt[b, t].item())
        for b in range(3)
        for t in range(5)
        if mask[b, t]
    ]
    out = train_rollout_mismatch(lr, lt, mask)
    torch.testing.assert_close(out, torch.tensor(sum(vals) / len(vals)), **TOL)
    assert train_rollout_mismatch(lr, lr, mask).item() == 0.0


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="logp_b has shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(3, 2))
