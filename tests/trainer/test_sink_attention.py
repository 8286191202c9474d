"""``trainer.sink_attention`` against transformers' own MiMo-V2-Flash eager attention.

The ``math`` path is checked in fp64 against ``eager_attention_forward`` of
``transformers.models.mimo_v2_flash`` (forward and the gradients of q, k, v and the sinks),
packed sequences against the same attention run per sequence, and the ``flex`` formula
(FlexAttention's out and lse, the sink folded in as ``sigmoid(lse - sink)``) against ``math``:
on CPU forward only (FlexAttention has no CPU backward), on CUDA compiled, forward and every
gradient (``-m gpu``); and the torch backend with it registered in transformers against its
eager attention."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import eager_attention_forward

from mopd.packing import pack_micro_batches
from tests.trainer.conftest import grads, load_hf, make_samples, max_diff
from trainer.sink_attention import HF_ATTENTION, _hf_attention, sink_window_attention

H, G, D, E = 4, 2, 12, 8  # query heads, KV heads, q/k head dim, v head dim (MiMo: d != e)


def _inputs(B: int, S: int, dtype=torch.float64, device="cpu", dims=(H, G, D, E), seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, g, d, e = dims

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    q, k, v, sinks = r(B, h, S, d), r(B, g, S, d), r(B, g, S, e), r(h)
    return [t.requires_grad_() for t in (q, k, v, sinks)]


def _hf(q, k, v, sinks, window):
    """transformers' eager attention with its additive causal (sliding) mask -> [B, h, S, e]."""
    S = q.shape[2]
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    visible = (j <= i) & ((i - j < window) if window is not None else True)
    mask = torch.zeros(S, S, dtype=q.dtype).masked_fill(~visible, float("-inf"))
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=H // G, training=False)
    out, _ = eager_attention_forward(module, q, k, v, mask[None, None], scaling=D**-0.5)
    return out.transpose(1, 2)  # HF returns [B, S, h, e]


def _grads(out, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    return torch.autograd.grad((out * weight).sum(), [t for t in inputs if t is not None])


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_math_matches_transformers_eager_forward_and_gradients(window, with_sinks):
    q, k, v, sinks = _inputs(2, 19)
    sinks = sinks if with_sinks else None
    ours = sink_window_attention(q, k, v, scale=D**-0.5, window=window, sinks=sinks, impl="math")
    ref = _hf(q, k, v, sinks, window)
    assert ours.shape == (2, H, 19, E)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, b in zip(_grads(ours, [q, k, v, sinks]), _grads(ref, [q, k, v, sinks]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sink_gradient_is_not_zero():
    q, k, v, sinks = _inputs(1, 9)
    out = sink_window_attention(q, k, v, scale=D**-0.5, window=3, sinks=sinks, impl="math")
    (g_sinks,) = torch.autograd.grad(out.square().sum(), [sinks])
    assert bool((g_sinks.abs() > 1e-6).all())


@pytest.mark.parametrize("window", [None, 4])
def test_packed_sequences_attend_only_within_their_own(window):
    """One row of three packed sequences and a padding tail = each sequence alone."""
    cu = [0, 7, 8, 20]  # lengths 7, 1, 12; positions 20..22 are padding
    q, k, v, sinks = _inputs(1, 23)
    packed = sink_window_attention(
        q, k, v, scale=D**-0.5, window=window, sinks=sinks, cu_seqlens=cu, impl="math"
    )
    alone = torch.cat(
        [
            _hf(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], sinks, window)
            for s, e in itertools.pairwise(cu)
        ],
        dim=2,
    )
    torch.testing.assert_close(packed[:, :, :20], alone, rtol=0, atol=1e-12)
    got = _grads(packed[:, :, :20], [q, k, v, sinks])
    want = _grads(alone, [q, k, v, sinks])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cu", [None, [0, 30, 33, 64, 100]])
@pytest.mark.parametrize("window", [None, 16])
def test_flex_formula_matches_math_on_cpu(cu, window):
    """FlexAttention (uncompiled, forward) with the sink folded in through its lse."""
    q, k, v, sinks = (t.detach() for t in _inputs(1, 100))
    kw = dict(scale=D**-0.5, window=window, sinks=sinks, cu_seqlens=cu)
    flex = sink_window_attention(q, k, v, impl="flex", **kw)
    math = sink_window_attention(q, k, v, impl="math", **kw)
    torch.testing.assert_close(flex, math, rtol=0, atol=1e-10)


def test_bad_arguments_are_named():
    q, k, v, _sinks = (t.detach() for t in _inputs(2, 6))
    with pytest.raises(ValueError, match="batch of one row"):
        sink_window_attention(q, k, v, scale=1.0, cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="do not partition 6 positions"):
        sink_window_attention(q[:1], k[:1], v[:1], scale=1.0, cu_seqlens=[0, 4, 9])
    with pytest.raises(ValueError, match="cannot share 3 KV heads"):
        sink_window_attention(q, k[:, :1].expand(2, 3, 6, D), v, scale=1.0)
    with pytest.raises(ValueError, match="window=0"):
        sink_window_attention(q, k, v, scale=1.0, window=0)
    with pytest.raises(ValueError, match="use auto, flex or math"):
        sink_window_attention(q, k, v, scale=1.0, impl="sdpa")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 128])
def test_compiled_flex_on_cuda_matches_math_forward_and_gradients(dtype, window):
    d = 192  # the production q/k head dim (v 128)
    cu = [0, 700, 701, 1500, 2048]
    q, k, v, sinks = _inputs(1, 2048, dtype=dtype, device="cuda", dims=(8, 4, d, 128))
    kw = dict(scale=d**-0.5, window=window, cu_seqlens=cu)
    flex = sink_window_attention(q, k, v, sinks=sinks, **kw)  # auto: flex
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    qm, km, vm, sm = ref_inputs
    math = sink_window_attention(qm, km, vm, sinks=sm, impl="math", **kw)
    tol = 2e-2
    errors = {"out": _rel_err(flex, math)}
    for name, a, b in zip(
        "qkvs", _grads(flex, [q, k, v, sinks]), _grads(math, ref_inputs), strict=True
    ):
        errors[f"d{name}"] = _rel_err(a, b)
    assert max(errors.values()) <= tol, errors


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference."""
    return (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def test_the_torch_backend_with_sink_attention_equals_its_eager_attention(
    tiny_models, make_trainer
):
    """``attn_implementation="mopd_sink"`` (the torch backend's GPU default for MiMo-V2-Flash)
    on padded micro-batches of uneven sequences: the loss, the metrics and every gradient of
    transformers' eager attention."""
    path = tiny_models["mimo_v2_flash"]
    samples = make_samples(load_hf(path), 6, seed=3)
    (mbs,) = pack_micro_batches(samples, micro_batch_tokens=48)
    runs = {}
    for impl in ("eager", HF_ATTENTION):
        trainer = make_trainer(path, trainer_kwargs={"attn_implementation": impl})
        assert trainer.model.config._attn_implementation == impl
        assert not trainer.packed  # padded [B, T] rows
        runs[impl] = (trainer.forward_backward(mbs), grads(trainer.model))
    (m_eager, g_eager), (m_sink, g_sink) = runs["eager"], runs[HF_ATTENTION]
    assert max_diff(g_eager, g_sink) < 1e-6
    for key in ("loss", "entropy", "train_rollout_k3", "teacher_log_ratio", "route_agreement"):
        assert m_sink[key] == pytest.approx(m_eager[key], abs=1e-6), key


def test_the_hf_adapter_refuses_dropout_and_a_kv_cache():
    q, k, v, sinks = (t.detach() for t in _inputs(1, 5))
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="no dropout"):
        _hf_attention(module, q, k, v, None, scaling=1.0, dropout=0.1)
    with pytest.raises(ValueError, match="no KV cache"):
        _hf_attention(module, q[:, :, -1:], k, v, None, scaling=1.0, s_aux=sinks)
