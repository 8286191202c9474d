"""trainer.megatron.cpu_compat: every shim is idempotent, does what its docstring says on CPU,
keeps the original reachable, and nothing is applied on a CUDA machine."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "megatron.core", reason="needs the [megatron] extra: pip install -e '.[megatron]'"
)
from trainer.megatron import cpu_compat

torch.set_num_threads(1)


def _targets():
    """(owner, attribute) pairs each shim replaces."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.tensor_parallel import random as mrandom

    clip = ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32")
    return {
        "shim_current_device": [(torch.cuda, "current_device")],
        "shim_cuda_rng_state": [
            (mrandom, "_get_cuda_rng_state"),
            (mrandom, "_set_cuda_rng_state"),
            (mrandom.CudaRNGStatesTracker, "add"),
        ],
        "shim_grad_clipping": [(m, n) for m in (clip_grads, optimizer) for n in clip],
        "shim_fp32_optimizer_scale": [(FP32Optimizer, "__init__")],
    }


@pytest.fixture(scope="module")
def world():
    """A one-process gloo world with Megatron's groups (which applies every shim)."""
    from mopd.config.schema import TrainerConfig
    from trainer.megatron.parallel import destroy_parallel, init_parallel

    if cpu_compat.cuda_available():
        pytest.skip("the shims are for machines without CUDA")
    yield init_parallel(TrainerConfig(backend="megatron"), seed=0)
    destroy_parallel()


def test_every_shim_is_listed_and_documented():
    assert {s.__name__ for s in cpu_compat.SHIMS} == set(_targets())
    for shim in cpu_compat.SHIMS:
        doc = shim.__doc__ or ""
        assert "Megatron" in doc or "megatron" in doc, shim.__name__
        assert len(doc.split()) > 30, f"{shim.__name__} must say which assumption it covers"


@pytest.mark.parametrize("name", sorted(_targets()))
def test_each_shim_is_idempotent_and_keeps_the_original(world, monkeypatch, name):
    shim = getattr(cpu_compat, name)
    targets = _targets()[name]
    # Put the unpatched originals back (monkeypatch restores the shimmed ones afterwards).
    for owner, attr in targets:
        current = getattr(owner, attr)
        assert getattr(current, cpu_compat._MARK, False), f"{attr} is not shimmed by {name}"
        monkeypatch.setattr(owner, attr, current.__wrapped__)
        assert not getattr(getattr(owner, attr), cpu_compat._MARK, False)
    assert shim() is True
    first = [getattr(owner, attr) for owner, attr in targets]
    assert all(getattr(f, cpu_compat._MARK, False) for f in first)
    assert all(callable(f.__wrapped__) for f in first)
    assert shim() is False  # applying again changes nothing
    assert [getattr(owner, attr) for owner, attr in targets] == first


def test_apply_all_is_a_no_op_with_cuda(monkeypatch):
    """On a CUDA machine Megatron runs unpatched: apply_all calls no shim at all."""
    called = []
    fake = tuple((lambda n=n: called.append(n) or True) for n in range(len(cpu_compat.SHIMS)))
    monkeypatch.setattr(cpu_compat, "SHIMS", fake)
    monkeypatch.setattr(cpu_compat, "cuda_available", lambda: True)
    assert cpu_compat.apply_all() == []
    assert called == []
    monkeypatch.setattr(cpu_compat, "cuda_available", lambda: False)
    assert len(cpu_compat.apply_all()) == len(fake) and len(called) == len(fake)


def test_apply_all_twice_reports_nothing_new(world):
    assert cpu_compat.apply_all() == []


def test_current_device_is_the_cpu(world):
    assert torch.cuda.current_device() == torch.device("cpu")
    from megatron.core import parallel_state as ps

    buf = ps.get_global_memory_buffer().get_tensor((3, 2), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (3, 2)


def test_rng_tracker_and_activation_recompute_run_on_cpu(world):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("x", 1234)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("x", 99)
    with tracker.fork("x"):
        torch.randn(3)

    # tensor_parallel.checkpoint saves/restores RNG states around the recomputed forward.
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(5, 4, requires_grad=True)

    def fn(inp):
        return torch.nn.functional.dropout(lin(inp).tanh(), p=0.5, training=True)

    torch.manual_seed(0)
    plain = fn(x)
    plain.sum().backward()
    g_plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(0)
    again = tensor_parallel.checkpoint(fn, False, x)
    again.sum().backward()
    assert torch.equal(plain, again)  # same dropout mask in forward and recompute
    assert torch.allclose(g_plain, x.grad)


def test_grad_norm_clip_and_zero_count_run_on_cpu(world):
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    group = ps.get_model_parallel_group()
    norm = clip_grads.get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=group)
    assert norm == pytest.approx(5.0)
    assert clip_grads.count_zeros_fp32(params, grad_stats_parallel_group=group) == 8
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    assert float(params[0].grad[0, 0]) == pytest.approx(3.0 / (5.0 + 1e-6))
    assert float(params[1].grad[1]) == pytest.approx(4.0 / (5.0 + 1e-6))


def test_fp32_optimizer_builds_on_cpu(world):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    p = torch.nn.Parameter(torch.ones(2))
    opt = FP32Optimizer(torch.optim.SGD([p], lr=0.1), OptimizerConfig(lr=0.1), None)
    scale = opt.get_loss_scale()
    assert scale.device.type == "cpu" and float(scale) == 1.0
