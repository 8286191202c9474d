"""R3 routing math against per-token loop references (algorithms.md, "Rollout Routing Replay")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mopd.algo.routing import replay_gate_weights, route_agreement, routes_dtype

TOL = {"atol": 1e-6, "rtol": 1e-6}
N_TOK, E, k = 6, 16, 4


def ref_gate(logits: torch.Tensor, idx: torch.Tensor, score_func, scaling, normalize):
    rows = []
    for t in range(logits.shape[0]):
        ids = idx[t].tolist()
        if score_func == "sigmoid":
            g = [torch.sigmoid(logits[t, i]) for i in ids]
            total = sum(g) if normalize else 1.0
            rows.append(torch.stack([x / total * scaling for x in g]))
        else:
            pool = ids if normalize else range(logits.shape[1])
            z = sum(torch.exp(logits[t, j]) for j in pool)
            rows.append(torch.stack([torch.exp(logits[t, i]) / z * scaling for i in ids]))
    return torch.stack(rows)


def make(seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N_TOK, E, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N_TOK)])
    return logits, idx


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_gate_weights_match_reference_with_grad(score_func, normalize, scaling) -> None:
    logits, idx = make()
    x = logits.clone().requires_grad_()
    out = replay_gate_weights(x, idx, score_func=score_func, scaling=scaling, normalize=normalize)
    x_ref = logits.clone().requires_grad_()
    ref = ref_gate(x_ref, idx, score_func, scaling, normalize)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(N_TOK, k, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    if normalize:
        torch.testing.assert_close(out.sum(-1), torch.full((N_TOK,), scaling), **TOL)
    if score_func == "softmax" or normalize:
        # experts that were not replayed get a gradient only through a normaliser over all
        # experts (softmax without normalize); with normalize they get none
        others = torch.ones(N_TOK, E, dtype=torch.bool).scatter(1, idx, False)
        assert (x.grad[others] == 0).all() == normalize


def test_gate_weights_bf16_logits_in_fp32_and_leading_dims() -> None:
    logits, idx = make(2, torch.bfloat16)
    out = replay_gate_weights(logits.view(2, 3, E), idx.view(2, 3, k))
    assert out.dtype == torch.float32 and out.shape == (2, 3, k)
    ref = ref_gate(logits.float(), idx, "sigmoid", 1.0, True)
    torch.testing.assert_close(out.view(N_TOK, k), ref, **TOL)


def test_gate_weights_equal_own_topk_when_routes_agree() -> None:
    # Replaying the trainer's own top-k reproduces the MiMo router's weights.
    logits, _ = make(3)
    own_idx = torch.sigmoid(logits).topk(k, dim=-1).indices
    s = torch.sigmoid(logits).gather(-1, own_idx)
    expected = s / (s.sum(-1, keepdim=True) + 1e-20) * 2.0
    out = replay_gate_weights(logits, own_idx, scaling=2.0)
    torch.testing.assert_close(out, expected, **TOL)


def test_gate_weight_errors() -> None:
    logits, idx = make()
    with pytest.raises(ValueError, match=r"score_func='relu'.*sigmoid, softmax"):
        replay_gate_weights(logits, idx, score_func="relu")
    with pytest.raises(ValueError, match="E=16 experts"):
        replay_gate_weights(logits, idx + E)
    with pytest.raises(ValueError, match="must agree on every dim"):
        replay_gate_weights(logits, idx[:-1])
    with pytest.raises(ValueError, match="integer expert ids"):
        replay_gate_weights(logits, idx.float())


def ref_agreement(own: list, replay: list) -> float:
    hits = total = 0
    for row_own, row_replay in zip(own, replay):
        for expert in row_own:
            hits += expert in set(row_replay)
            total += 1
    return hits / total


def test_route_agreement_compares_rows_as_sets() -> None:
    gen = torch.Generator().manual_seed(4)
    T, L = 5, 3
    replay = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T * L)])
    replay = replay.view(T, L, k)
    # same sets in another order: full agreement
    shuffled = replay[..., torch.randperm(k, generator=gen)]
    assert route_agreement(shuffled, replay) == 1.0
    # change one id in some rows
    own = replay.clone()
    own[0, 0, 0] = (set(range(E)) - set(replay[0, 0].tolist())).pop()
    own[2, 1, 3] = (set(range(E)) - set(replay[2, 1].tolist())).pop()
    own = own[..., torch.randperm(k, generator=gen)]
    expected = ref_agreement(own.view(-1, k).tolist(), replay.view(-1, k).tolist())
    assert expected == pytest.approx(1 - 2 / (T * L * k))
    assert route_agreement(own, replay.to(torch.uint8)) == pytest.approx(expected)
    # a mask leaves rows out
    mask = torch.ones(T, L, dtype=torch.bool)
    mask[0, 0] = mask[2, 1] = False
    assert route_agreement(own, replay, mask) == 1.0
    assert route_agreement(own[:0], replay[:0]) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        route_agreement(own[..., :2], replay)


@pytest.mark.parametrize(
    ("num_experts", "torch_dtype", "np_dtype"),
    [(1, torch.uint8, np.uint8), (256, torch.uint8, np.uint8), (257, torch.uint16, np.uint16),
     (65536, torch.uint16, np.uint16)],
)  # fmt: skip
def test_routes_dtype(num_experts, torch_dtype, np_dtype) -> None:
    assert routes_dtype(num_experts) == torch_dtype
    assert routes_dtype(num_experts, library="numpy") == np.dtype(np_dtype)
    # the largest id round-trips through the chosen dtype
    assert int(np.array([num_experts - 1]).astype(np_dtype)[0]) == num_experts - 1


def test_routes_dtype_errors() -> None:
    with pytest.raises(ValueError, match="max 65536"):
        routes_dtype(65537)
    with pytest.raises(ValueError, match="positive int"):
        routes_dtype(0)
    with pytest.raises(ValueError, match=r"library='jax'.*torch, numpy"):
        routes_dtype(8, library="jax")


def test_sigmoid_underflow_stays_finite() -> None:
    logits = torch.full((1, 4), -200.0, requires_grad=True)  # sigmoid underflows to 0
    out = replay_gate_weights(logits, torch.tensor([[0, 1]]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
