"""Losses against slow loop references written straight from algorithms.md (eq. 7-9, stage 2,
stage 1). The references loop over samples and tokens with 0-dim tensors, so autograd through
them gives an independent gradient to compare with."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mopd.algo.losses import mopd_loss, policy_gradient_loss, sft_loss

TOL = {"atol": 1e-6, "rtol": 1e-6}
B, T, K = 4, 7, 5


# ----------------------------------------------------------------------------------------------
# Reference implementations
# ----------------------------------------------------------------------------------------------


def ref_reduce(terms: list[list[torch.Tensor]], aggregation: str) -> torch.Tensor:
    """terms[b] = per-token loss terms of sample b (valid tokens only)."""
    if aggregation == "token_mean":
        flat = [x for sample in terms for x in sample]
        return sum(flat) / len(flat) if flat else torch.tensor(0.0)
    per_sample = [sum(sample) / len(sample) for sample in terms if sample]
    return sum(per_sample) / len(per_sample) if per_sample else torch.tensor(0.0)


def ref_topk_kl(t_k: list[float], s_k: list[float]) -> float:
    support = [i for i, x in enumerate(t_k) if math.isfinite(x)]
    zt = sum(math.exp(t_k[i]) for i in support)
    zs = sum(math.exp(s_k[i]) for i in support)
    kl = 0.0
    for i in support:
        q, p = math.exp(s_k[i]) / zs, math.exp(t_k[i]) / zt
        kl += q * (math.log(q) - math.log(p))
    return kl


def ref_mopd(
    lt, lr, lte, adv, mask, *, alpha, eps_low, eps_high, aggregation, source, topk=None
) -> torch.Tensor:
    terms = []
    for b in range(lt.shape[0]):
        sample = []
        for t in range(lt.shape[1]):
            if not mask[b, t]:
                continue
            r = torch.exp(lt[b, t].detach().float() - lr[b, t].detach().float())
            w = r if eps_low <= r.item() <= eps_high else torch.tensor(0.0)
            if topk is None:
                student = lt[b, t] if source == "train" else lr[b, t]
                teacher_term = (lte[b, t].float() - student.float()).detach()
                a_t = teacher_term + alpha * adv[b].detach().float()
                sample.append(-(w * a_t * lt[b, t].float()))
            else:  # the top-k reverse KL is a loss term of its own, next to the ORM term
                t_k, s_k = topk[0][b, t].tolist(), topk[1][b, t].tolist()
                kl = torch.tensor(ref_topk_kl(t_k, s_k))
                orm = -(w * alpha * adv[b].detach().float() * lt[b, t].float())
                sample.append(orm + w * kl)
        terms.append(sample)
    return ref_reduce(terms, aggregation)


def ref_pg(
    lt, lr, adv, mask, *, corr, eps_low, eps_high, clip_low, clip_high, ref, kl_coef, aggregation
) -> torch.Tensor:
    terms = []
    for b in range(lt.shape[0]):
        sample = []
        for t in range(lt.shape[1]):
            if not mask[b, t]:
                continue
            a_t = adv[b].detach().float()
            x = lt[b, t].float()
            if corr == "ppo_clip":
                ratio = torch.exp(x - lr[b, t].detach().float())
                r = ratio.item()
                if 1 - clip_low <= r <= 1 + clip_high:
                    term = -(ratio * a_t)
                else:  # min(r A, clip(r) A); the clipped branch is a constant (no gradient)
                    clipped = min(max(r, 1 - clip_low), 1 + clip_high) * a_t.item()
                    unclipped = ratio * a_t
                    term = -(unclipped if unclipped.item() < clipped else torch.tensor(clipped))
            else:
                r = math.exp(x.item() - lr[b, t].item())
                if corr == "mask":
                    w = r if eps_low <= r <= eps_high else 0.0
                else:
                    w = min(r, eps_high)
                term = -(w * a_t * x)
            if kl_coef:
                d = x - ref[b, t].detach().float()
                term = term + kl_coef * (torch.exp(-d) - 1 + d)
            sample.append(term)
        terms.append(sample)
    return ref_reduce(terms, aggregation)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def make_inputs(seed: int, dtype=torch.float32, spread: float = 0.4):
    gen = torch.Generator().manual_seed(seed)
    lt = -torch.rand(B, T, generator=gen) * 3
    lr = lt + torch.randn(B, T, generator=gen) * spread  # some r_t fall outside [0.5, 2]
    lte = -torch.rand(B, T, generator=gen) * 3
    adv = torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[1] = False  # an empty sample
    # two valid tokens with r_t outside [0.5, 2]: e^-1.5 and e^1
    mask[0, 0] = mask[2, 1] = True
    lr[0, 0], lr[2, 1] = lt[0, 0] + 1.5, lt[2, 1] - 1.0
    lt, lr, lte, adv = (x.to(dtype) for x in (lt, lr, lte, adv))
    return lt, lr, lte, adv, mask


def leafs(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_() for x in xs]


# ----------------------------------------------------------------------------------------------
# MOPD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("source", ["train", "rollout"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_mopd_matches_reference_with_grads(aggregation, source, alpha, seed) -> None:
    lt, lr, lte, adv, mask = make_inputs(seed)
    lt1, lr1, lte1, adv1 = leafs(lt, lr, lte, adv)
    loss, metrics = mopd_loss(
        lt1, lr1, lte1, adv1, mask, alpha=alpha, aggregation=aggregation,
        student_logprob_source=source,
    )  # fmt: skip
    lt2 = lt.clone().requires_grad_()
    expected = ref_mopd(
        lt2, lr, lte, adv, mask, alpha=alpha, eps_low=0.5, eps_high=2.0,
        aggregation=aggregation, source=source,
    )  # fmt: skip
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(lt1.grad, lt2.grad, **TOL)
    # the gradient flows only through the last logp_train term
    assert lr1.grad is None and lte1.grad is None and adv1.grad is None
    assert metrics["masked_fraction"] > 0  # the inputs put some r_t outside [0.5, 2]
    assert metrics["num_samples"] == B - 1


def test_mopd_gradient_is_w_times_adv() -> None:
    # d loss / d logp_train_t = -w_t A_t / (|y| * num_samples) exactly (eq. 7 with sg).
    lt, lr, lte, adv, mask = make_inputs(3)
    lt = lt.requires_grad_()
    loss, _ = mopd_loss(lt, lr, lte, adv, mask)
    loss.backward()
    r = torch.exp(lt.detach() - lr)
    w = torch.where((r >= 0.5) & (r <= 2.0), r, 0.0)
    a = (lte - lt.detach()) + adv[:, None]
    n_tok = mask.sum(1, keepdim=True).clamp_min(1)
    expected = torch.where(mask, -w * a / n_tok / (mask.any(1).sum()), 0.0)
    torch.testing.assert_close(lt.grad, expected, **TOL)


def test_mopd_metrics_match_definitions() -> None:
    lt, lr, lte, adv, mask = make_inputs(4)
    _, m = mopd_loss(lt, lr, lte, adv, mask, student_logprob_source="rollout")
    valid = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
    rs = [math.exp(lt[b, t].item() - lr[b, t].item()) for b, t in valid]
    assert m["num_tokens"] == len(valid)
    assert m["masked_fraction"] == pytest.approx(sum(not 0.5 <= r <= 2 for r in rs) / len(rs))
    assert m["is_ratio_mean"] == pytest.approx(sum(rs) / len(rs), rel=1e-5)
    assert m["is_ratio_abs_dev"] == pytest.approx(sum(abs(r - 1) for r in rs) / len(rs), rel=1e-5)
    ratios = [lte[b, t].item() - lr[b, t].item() for b, t in valid]
    assert m["teacher_log_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    nonempty = [b for b in range(B) if mask[b].any()]
    assert m["orm_adv_mean"] == pytest.approx(sum(adv[b].item() for b in nonempty) / len(nonempty))
    assert all(isinstance(v, float) for v in m.values())


def test_mopd_per_domain_metrics_equal_metrics_of_the_domain_subset() -> None:
    lt, lr, lte, adv, mask = make_inputs(18)
    domains = ["math", "code", "math", "code"]
    _, m = mopd_loss(lt, lr, lte, adv, mask, domains_B=domains)
    for domain in ("math", "code"):
        rows = [i for i, d in enumerate(domains) if d == domain]
        _, sub = mopd_loss(lt[rows], lr[rows], lte[rows], adv[rows], mask[rows])
        for key in ("teacher_log_ratio", "masked_fraction", "is_ratio_abs_dev", "orm_adv_mean"):
            assert m[f"{key}/{domain}"] == pytest.approx(sub[key], rel=1e-6, abs=1e-7)
        assert m[f"num_tokens/{domain}"] == sub["num_tokens"]
    with pytest.raises(ValueError, match="domains_B must be a sequence of 4 domain names"):
        mopd_loss(lt, lr, lte, adv, mask, domains_B=["math"])


def test_mopd_ratio_exactly_at_bounds_is_kept() -> None:
    lt = torch.tensor([[-1.0, -2.0, -0.5]])
    lr = torch.tensor([[-1.5, -1.0, -0.5]])
    r = torch.exp(lt - lr)  # the same fp32 ops the loss uses
    lte, adv, mask = torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3, dtype=torch.bool)
    # eps_low = r_1 and eps_high = r_0 exactly: every token lies inside the inclusive bounds.
    kw = {"eps_low": r[0, 1].item(), "eps_high": r[0, 0].item()}
    _, m = mopd_loss(lt, lr, lte, adv, mask, **kw)
    assert m["masked_fraction"] == 0.0
    # nudging either bound past the ratio masks exactly that token
    # the ratio is fp32, so step the bounds by one fp32 ulp
    lo = float(np.nextafter(np.float32(kw["eps_low"]), np.float32(1)))
    _, m = mopd_loss(lt, lr, lte, adv, mask, eps_low=lo, eps_high=kw["eps_high"])
    assert m["masked_fraction"] == pytest.approx(1 / 3)
    hi = float(np.nextafter(np.float32(kw["eps_high"]), np.float32(0)))
    _, m = mopd_loss(lt, lr, lte, adv, mask, eps_low=kw["eps_low"], eps_high=hi)
    assert m["masked_fraction"] == pytest.approx(1 / 3)
    # r = 1 exactly with eps_low = eps_high = 1
    _, m = mopd_loss(lt, lt, lte, adv, mask, eps_low=1.0, eps_high=1.0)
    assert m["masked_fraction"] == 0.0


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_mopd_masked_tokens_never_read(aggregation) -> None:
    lt, lr, lte, adv, mask = make_inputs(5)
    poisoned = [x.clone() for x in (lt, lr, lte)]
    for x, v in zip(poisoned, (-math.inf, math.nan, math.inf)):
        x[~mask] = v
    lt_p = poisoned[0].requires_grad_()
    loss, metrics = mopd_loss(lt_p, poisoned[1], poisoned[2], adv, mask, aggregation=aggregation)
    lt_c = lt.clone().requires_grad_()
    clean, _ = mopd_loss(lt_c, lr, lte, adv, mask, aggregation=aggregation)
    torch.testing.assert_close(loss, clean, **TOL)
    loss.backward()
    clean.backward()
    assert torch.isfinite(lt_p.grad).all()
    torch.testing.assert_close(lt_p.grad, lt_c.grad, **TOL)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_name", ["mopd", "rl", "sft"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_all_empty_batch_gives_zero_loss_and_zero_grad(loss_name, aggregation) -> None:
    lt = torch.full((B, T), -math.inf).requires_grad_()
    other = torch.full((B, T), math.nan)
    mask = torch.zeros(B, T)  # float mask
    if loss_name == "mopd":
        loss, m = mopd_loss(lt, other, other, torch.ones(B), mask, aggregation=aggregation)
    elif loss_name == "rl":
        loss, m = policy_gradient_loss(lt, other, torch.ones(B), mask, aggregation=aggregation)
    else:
        loss, m = sft_loss(lt, mask, aggregation=aggregation)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(lt.grad, torch.zeros(B, T))
    assert m["num_tokens"] == 0 and m["num_samples"] == 0
    assert all(v == 0.0 for v in m.values())


def test_mopd_float_mask_equals_bool_mask() -> None:
    lt, lr, lte, adv, mask = make_inputs(6)
    a, ma = mopd_loss(lt, lr, lte, adv, mask)
    b, mb = mopd_loss(lt, lr, lte, adv, mask.float())
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert ma == mb


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mopd_half_inputs_computed_in_fp32(dtype) -> None:
    lt, lr, lte, adv, mask = make_inputs(7, dtype=dtype)
    lt_h = lt.clone().requires_grad_()
    loss, _ = mopd_loss(lt_h, lr, lte, adv, mask)
    assert loss.dtype == torch.float32
    lt_f = lt.float().requires_grad_()
    expected = ref_mopd(
        lt_f, lr.float(), lte.float(), adv.float(), mask, alpha=1.0, eps_low=0.5,
        eps_high=2.0, aggregation="seq_mean_token_mean", source="train",
    )  # fmt: skip
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    assert lt_h.grad.dtype == dtype
    torch.testing.assert_close(lt_h.grad, lt_f.grad.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("padded", [False, True])
def test_mopd_topk_matches_reference(aggregation, padded) -> None:
    lt, lr, _, adv, mask = make_inputs(8)
    gen = torch.Generator().manual_seed(9)
    t_BTK = torch.randn(B, T, K, generator=gen).log_softmax(-1)
    s_BTK = torch.randn(B, T, K, generator=gen).log_softmax(-1) - 0.3
    if padded:  # the teacher returned fewer than K entries at some positions
        t_BTK[:, ::2, -2:] = -math.inf
    lt1, t1, s1 = leafs(lt, t_BTK, s_BTK)
    loss, m = mopd_loss(
        lt1, lr, None, adv, mask, teacher_kl="topk", aggregation=aggregation,
        teacher_topk_logp_BTK=t1, student_topk_logp_BTK=s1,
    )  # fmt: skip
    lt2 = lt.clone().requires_grad_()
    expected = ref_mopd(
        lt2, lr, None, adv, mask, alpha=1.0, eps_low=0.5, eps_high=2.0,
        aggregation=aggregation, source="train", topk=(t_BTK, s_BTK),
    )  # fmt: skip
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(lt1.grad, lt2.grad, **TOL)
    assert t1.grad is None  # the teacher is a constant
    assert s1.grad is not None and s1.grad.abs().sum() > 0  # the student's top-k side learns
    assert m["teacher_log_ratio"] < 0  # -KL


def test_mopd_topk_full_support_gradient_is_the_exact_reverse_kl_gradient() -> None:
    # K = V, alpha = 0, one token: the loss is KL(student || teacher) of the position, so its
    # gradient in the student's logits is the closed form q * (log q - log p - KL).
    gen = torch.Generator().manual_seed(12)
    V = 7
    teacher_V = torch.randn(V, generator=gen).log_softmax(-1)
    logits_V = torch.randn(V, generator=gen).requires_grad_()
    student_V = logits_V.log_softmax(-1)
    one = torch.ones(1, 1, dtype=torch.bool)
    loss, m = mopd_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), one, alpha=0.0,
        teacher_kl="topk", teacher_topk_logp_BTK=teacher_V.view(1, 1, V),
        student_topk_logp_BTK=student_V.view(1, 1, V),
    )  # fmt: skip
    loss.backward()
    q = student_V.detach().exp()
    kl = float((q * (student_V.detach() - teacher_V)).sum())
    expected = q * (student_V.detach() - teacher_V - kl)
    torch.testing.assert_close(logits_V.grad, expected, rtol=1e-5, atol=1e-6)
    assert float(loss.detach()) == pytest.approx(kl, rel=1e-5)
    assert m["teacher_log_ratio"] == pytest.approx(-kl, rel=1e-5)


def test_mopd_topk_full_support_is_exact_reverse_kl() -> None:
    # With K = V, renormalisation is the identity: the term is -KL(student || teacher) exactly.
    gen = torch.Generator().manual_seed(10)
    V = 6
    teacher_V = torch.randn(V, generator=gen).log_softmax(-1)
    student_V = torch.randn(V, generator=gen).log_softmax(-1)
    exact = float((student_V.exp() * (student_V - teacher_V)).sum())
    one = torch.ones(1, 1, dtype=torch.bool)
    _, m = mopd_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), one, teacher_kl="topk",
        teacher_topk_logp_BTK=teacher_V.view(1, 1, V),
        student_topk_logp_BTK=student_V.view(1, 1, V),
    )  # fmt: skip
    assert m["teacher_log_ratio"] == pytest.approx(-exact, rel=1e-5)


def test_mopd_option_and_shape_errors() -> None:
    lt, lr, lte, adv, mask = make_inputs(11)
    with pytest.raises(ValueError, match=r"aggregation='mean'.*seq_mean_token_mean, token_mean"):
        mopd_loss(lt, lr, lte, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match=r"student_logprob_source='teacher'.*train, rollout"):
        mopd_loss(lt, lr, lte, adv, mask, student_logprob_source="teacher")
    with pytest.raises(ValueError, match=r"teacher_kl='full'.*sampled, topk"):
        mopd_loss(lt, lr, lte, adv, mask, teacher_kl="full")
    with pytest.raises(ValueError, match=re.escape("eps_low=3.0 must be <= eps_high=2.0")):
        mopd_loss(lt, lr, lte, adv, mask, eps_low=3.0)
    with pytest.raises(ValueError, match="logp_rollout_BT has shape"):
        mopd_loss(lt, lr[:, :-1], lte, adv, mask)
    with pytest.raises(ValueError, match="mask_BT has shape"):
        mopd_loss(lt, lr, lte, adv, mask[:-1])
    with pytest.raises(ValueError, match=r"adv_orm_B has shape \(3,\)"):
        mopd_loss(lt, lr, lte, adv[:3], mask)
    with pytest.raises(ValueError, match="logp_teacher_BT is required"):
        mopd_loss(lt, lr, None, adv, mask)
    with pytest.raises(ValueError, match="needs both teacher_topk_logp_BTK"):
        mopd_loss(lt, lr, None, adv, mask, teacher_kl="topk")
    with pytest.raises(ValueError, match="teacher_kl='sampled' ignores them"):
        mopd_loss(lt, lr, lte, adv, mask, teacher_topk_logp_BTK=torch.zeros(B, T, K))
    bad = lte.clone()
    bad[mask] = math.nan
    with pytest.raises(ValueError, match="logp_teacher_BT hold NaN or inf"):
        mopd_loss(lt, lr, bad, adv, mask)


# ----------------------------------------------------------------------------------------------
# Teacher RL (stage 2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corr", ["mask", "truncate", "ppo_clip"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_policy_gradient_matches_reference(corr, aggregation, kl_coef) -> None:
    lt, lr, lref, adv, mask = make_inputs(12)
    lt1, lr1, lref1, adv1 = leafs(lt, lr, lref, adv)
    kw = {"clip_low": 0.2, "clip_high": 0.28}
    loss, m = policy_gradient_loss(
        lt1, lr1, adv1, mask, is_correction=corr, aggregation=aggregation,
        logp_ref_BT=lref1, kl_coef=kl_coef, **kw,
    )  # fmt: skip
    lt2 = lt.clone().requires_grad_()
    expected = ref_pg(
        lt2, lr, adv, mask, corr=corr, eps_low=0.5, eps_high=2.0, ref=lref, kl_coef=kl_coef,
        aggregation=aggregation, **kw,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(lt1.grad, lt2.grad, **TOL)
    assert lr1.grad is None and lref1.grad is None and adv1.grad is None
    assert "kl_ref" in m and m["kl_ref"] >= 0
    if corr == "mask":
        assert m["masked_fraction"] > 0
    else:
        assert m["masked_fraction"] == 0 and m["clipped_fraction"] > 0


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("source", ["train", "rollout"])
def test_mopd_without_teacher_term_equals_rl_with_mask(aggregation, source) -> None:
    lt, lr, _, adv, mask = make_inputs(13)
    # "no teacher term": the teacher log-prob equals the student log-prob used in A_t.
    teacher = lt if source == "train" else lr
    lt1, lt2 = lt.clone().requires_grad_(), lt.clone().requires_grad_()
    mopd, m1 = mopd_loss(
        lt1, lr, teacher, adv, mask, alpha=1.0, aggregation=aggregation,
        student_logprob_source=source,
    )  # fmt: skip
    rl, m2 = policy_gradient_loss(lt2, lr, adv, mask, is_correction="mask", aggregation=aggregation)
    torch.testing.assert_close(mopd, rl, atol=0, rtol=0)
    mopd.backward()
    rl.backward()
    torch.testing.assert_close(lt1.grad, lt2.grad, atol=0, rtol=0)
    assert m1["masked_fraction"] == m2["masked_fraction"] > 0


def test_ppo_clip_first_step_gradient_is_plain_policy_gradient() -> None:
    # On-policy (logp_train == logp_rollout) the PPO gradient is -A * dlogp, like mask/truncate.
    lt, _, _, adv, mask = make_inputs(14)
    grads = []
    for corr in ("ppo_clip", "mask", "truncate"):
        x = lt.clone().requires_grad_()
        policy_gradient_loss(x, lt, adv, mask, is_correction=corr)[0].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    torch.testing.assert_close(grads[0], grads[2], **TOL)


def test_token_level_advantages_accepted() -> None:
    lt, lr, _, adv, mask = make_inputs(15)
    a, _ = policy_gradient_loss(lt, lr, adv, mask)
    b, _ = policy_gradient_loss(lt, lr, adv[:, None].expand(B, T).clone(), mask)
    torch.testing.assert_close(a, b, **TOL)


def test_policy_gradient_errors() -> None:
    lt, lr, _, adv, mask = make_inputs(16)
    with pytest.raises(ValueError, match=r"is_correction='clip'.*mask, truncate, ppo_clip"):
        policy_gradient_loss(lt, lr, adv, mask, is_correction="clip")
    with pytest.raises(ValueError, match=re.escape("kl_coef=0.1 needs logp_ref_BT")):
        policy_gradient_loss(lt, lr, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=re.escape("clip_low=1.5 must be < 1")):
        policy_gradient_loss(lt, lr, adv, mask, is_correction="ppo_clip", clip_low=1.5)
    with pytest.raises(ValueError, match="logp_ref_BT has shape"):
        policy_gradient_loss(lt, lr, adv, mask, logp_ref_BT=lt[:2], kl_coef=0.1)


# ----------------------------------------------------------------------------------------------
# SFT (stage 1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sft_matches_reference(aggregation, dtype) -> None:
    lt, _, _, _, mask = make_inputs(17, dtype=dtype)
    x = lt.clone().requires_grad_()
    loss, m = sft_loss(x, mask, aggregation=aggregation)
    ref_x = lt.float().requires_grad_()
    terms = [[-ref_x[b, t] for t in range(T) if mask[b, t]] for b in range(B)]
    expected = ref_reduce(terms, aggregation)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad.float(), ref_x.grad.to(dtype).float(), atol=0, rtol=0)
    assert m["num_tokens"] == mask.sum().item()
    assert m["nll"] == pytest.approx(-lt.float()[mask].mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="accepted values: seq_mean_token_mean, token_mean"):
        sft_loss(x, mask, aggregation="sum")
