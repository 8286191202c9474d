"""Chunked log-softmax / entropy against torch.log_softmax references, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.algo.logprobs import (
    entropy_from_logits,
    gather_log_softmax,
    selective_log_softmax,
    topk_log_softmax,
)

TOL = {"atol": 1e-6, "rtol": 1e-6}
B, T, V = 3, 5, 37


def make_logits(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 1000])
def test_selective_log_softmax_matches_torch(dtype, chunk_rows) -> None:
    logits = make_logits(dtype)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    x = logits.clone().requires_grad_()
    out = selective_log_softmax(x, tokens, chunk_rows=chunk_rows)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    # reference on the upcast logits
    x_ref = logits.float().requires_grad_()
    ref = torch.log_softmax(x_ref, dim=-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    else:  # an fp32 gradient rounded once to the logits' dtype: within one ulp of that dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=1e-6, rtol=eps)


def test_gather_log_softmax_with_repeated_ids_gradcheck() -> None:
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 1, 0], [0, 3, 5], [2, 2, 2], [5, 4, 3]])
    out = gather_log_softmax(logits, ids, chunk_rows=3)
    torch.testing.assert_close(out, torch.log_softmax(logits, -1).gather(-1, ids), **TOL)
    assert torch.autograd.gradcheck(lambda z: gather_log_softmax(z, ids, chunk_rows=3), (logits,))


def test_does_not_save_a_full_fp32_copy() -> None:
    # What autograd keeps for backward: the bf16 logits and [N] / [N, 1] tensors, nothing [N, V]
    # in fp32 (that is what log_softmax(logits.float()) would keep).
    logits = make_logits(torch.bfloat16).requires_grad_()
    tokens = torch.zeros(B, T, dtype=torch.long)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_log_softmax(logits, tokens, chunk_rows=2)
    assert saved
    big_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() >= B * T * V]
    assert big_fp32 == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        torch.log_softmax(logits.float(), -1)
    assert any(t.dtype == torch.float32 and t.numel() == B * T * V for t in saved)


def test_neg_inf_logits_are_allowed() -> None:
    logits = make_logits(torch.float32)
    logits[..., :5] = -math.inf  # banned tokens
    tokens = torch.full((B, T), 7)
    out = selective_log_softmax(logits, tokens)
    ref = torch.log_softmax(logits, -1)[..., 7]
    torch.testing.assert_close(out, ref, **TOL)
    assert selective_log_softmax(logits, torch.zeros(B, T, dtype=torch.long)).eq(-math.inf).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_reference_with_grad(dtype) -> None:
    logits = make_logits(dtype, seed=3)
    x = logits.clone().requires_grad_()
    out = entropy_from_logits(x, chunk_rows=4)
    x_ref = logits.float().requires_grad_()
    logp = torch.log_softmax(x_ref, -1)
    ref = -(logp.exp() * logp).sum(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    # same math, different fp32 association order (H' = p (E[z] - z) vs autograd through
    # -sum p log p with |z| ~ 10): 1e-5 absolute; exactness is checked in fp64 by gradcheck below
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-6)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=1e-5, rtol=eps)


def test_entropy_gradcheck_and_banned_tokens() -> None:
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_rows=2), (logits,))
    banned = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]], requires_grad=True)
    h = entropy_from_logits(banned)
    torch.testing.assert_close(h, torch.tensor([math.log(2)]), **TOL)
    h.sum().backward()
    assert torch.isfinite(banned.grad).all()


def test_topk_log_softmax() -> None:
    logits = make_logits(torch.float32, seed=5).requires_grad_()
    logp, ids = topk_log_softmax(logits, 4)
    ref_vals, ref_ids = torch.log_softmax(logits, -1).topk(4, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logp, ref_vals, **TOL)
    logp.sum().backward()
    assert logits.grad is not None


def test_bad_inputs_raise() -> None:
    logits = make_logits(torch.float32)
    with pytest.raises(ValueError, match="token ids span"):
        selective_log_softmax(logits, torch.full((B, T), V))
    with pytest.raises(ValueError, match="tokens_BT"):
        selective_log_softmax(logits, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        selective_log_softmax(logits, torch.zeros(B, T))
    with pytest.raises(ValueError, match="chunk_rows=0"):
        selective_log_softmax(logits, torch.zeros(B, T, dtype=torch.long), chunk_rows=0)
    with pytest.raises(ValueError, match="k=0"):
        topk_log_softmax(logits, 0)
