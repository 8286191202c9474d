"""The torch trainer on one GPU: bf16 autocast over fp32 master weights, R3, exact-enough
resume, bf16 export, CUDA tensor handoff. Skipped without CUDA (run through the device
machine: ``pytest -m gpu tests/trainer``)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.packing import build_micro_batch, pack_micro_batches
from tests.trainer.conftest import grads, load_hf, make_samples, max_diff, params
from tests.trainer.test_r3 import ExpertInputs
from trainer import checkpoint as ckpt
from trainer.torch_backend import TorchTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _gpu_trainer(path, dtype="auto", model_dtype="auto", **cfg):
    cfg.setdefault("lr", 1e-2)
    return TorchTrainer(
        TrainerConfig(dtype=dtype, **cfg),
        ModelConfig(path=str(path), dtype=model_dtype),
        AlgorithmConfig(),
        device="cuda",
    )


def _padded_rows(cu_seqlens_B1: np.ndarray) -> np.ndarray:
    """The row of each packed token in the flat [B, T] batch the trainer runs."""
    lengths = np.diff(cu_seqlens_B1)
    T = int(lengths.max())
    return np.concatenate([b * T + np.arange(n) for b, n in enumerate(lengths)])


def test_bf16_step_with_replay(tiny_models):
    path = tiny_models["mimo_v2_flash"]
    samples = make_samples(load_hf(path), 6, seed=60)
    (mbs,) = pack_micro_batches(samples, micro_batch_tokens=48)
    trainer = _gpu_trainer(path)
    assert trainer.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.model.parameters())
    seen = ExpertInputs(trainer.model)
    m = trainer.forward_backward(mbs)
    seen.remove()
    for slot, layer in enumerate(sorted(seen.calls)):
        for got, mb in zip(seen.calls[layer], mbs, strict=True):
            # Micro-batches run as padded [B, T] rows: compare the real tokens' rows.
            expected = torch.from_numpy(mb.routes_NLk[:, slot].astype(np.int64)).cuda()
            rows = torch.from_numpy(_padded_rows(mb.cu_seqlens_B1)).cuda()
            assert torch.equal(got[rows].sort(-1).values, expected.sort(-1).values)
    g = trainer.model.model.layers[1].mlp.gate.weight.grad
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0
    m |= trainer.optim_step()
    assert all(np.isfinite(v) for v in m.values()), m
    # bf16 log-probs stay close to the fp32 ones of the same weights.
    fp32 = _gpu_trainer(path, dtype="float32")
    (a,) = trainer.compute_logprobs(mbs[:1])
    (b,) = _gpu_trainer(path).compute_logprobs(mbs[:1])
    (c,) = fp32.compute_logprobs(mbs[:1])
    assert np.abs(b - c).max() < 0.1 and np.abs(a - c).max() > 0  # a: after the step


def test_fp32_accumulation_and_resume_on_gpu(tiny_models, tmp_path):
    path = tiny_models["mimo_v2_flash"]
    hf = load_hf(path)
    samples = make_samples(hf, 7, seed=61)
    one = _gpu_trainer(path, dtype="float32")
    one.forward_backward([build_micro_batch(samples)])
    three = _gpu_trainer(path, dtype="float32")
    three.forward_backward(pack_micro_batches(samples, micro_batch_tokens=32)[0])
    # CUDA's index_add_ (MoE expert outputs) sums in a nondeterministic order: 1e-6 level.
    assert max_diff(grads(one.model), grads(three.model)) < 1e-5

    steps = [pack_micro_batches(make_samples(hf, 4, seed=70 + s), micro_batch_tokens=40)[0] for s in range(3)]  # fmt: skip
    straight = _gpu_trainer(path, dtype="float32")
    first = _gpu_trainer(path, dtype="float32")
    for mbs in steps[:2]:
        for t in (straight, first):
            t.forward_backward(mbs)
            t.optim_step()
    saved = first.save(ckpt.checkpoint_dir(tmp_path, 2))
    resumed = _gpu_trainer(path, dtype="float32")
    resumed.load(saved)
    ms = straight.forward_backward(steps[2]) | straight.optim_step()
    mr = resumed.forward_backward(steps[2]) | resumed.optim_step()
    assert abs(ms["loss"] - mr["loss"]) < 1e-5
    assert max_diff(params(straight.model), params(resumed.model)) < 1e-5


def test_bf16_export_and_cuda_handoff(tiny_models, tmp_path):
    path = tiny_models["qwen3_moe"]
    trainer = _gpu_trainer(path)
    assert trainer.export_dtype == torch.bfloat16
    out = trainer.export_weights(tmp_path / "v0", 0)
    reloaded = load_hf(out)  # loads the bf16 weights into fp32, on the CPU
    # Reference: the trainer's weights rounded to bf16, in an fp32 CPU copy of its model.
    rounded = copy.deepcopy(trainer.model).cpu().float()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
        tokens = torch.arange(3, 40)[None]
        assert torch.allclose(
            rounded(input_ids=tokens).logits, reloaded(input_ids=tokens).logits, atol=1e-5
        )

    named = trainer.handoff_weights("checkpoint")
    assert all(t.is_cuda for _, t in named)
    [payload] = trainer.serialized_weights("checkpoint")
    (tmp_path / "payload.bin").write_bytes(payload)
    code = textwrap.dedent(
        f"""
        import pickle, torch
        from safetensors.torch import save_file
        named = pickle.loads(open({str(tmp_path / "payload.bin")!r}, "rb").read())
        assert all(t.is_cuda for _, t in named)
        save_file({{n: t.cpu() for n, t in named}}, {str(tmp_path / "got.safetensors")!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "got.safetensors"))
    assert all(torch.equal(got[n], t.cpu()) for n, t in named)
