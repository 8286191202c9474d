"""Every CPU / gloo compatibility shim the Megatron backend needs, in one place.

megatron-core 0.16.1 is written for CUDA machines. Its model, data-parallel, optimizer and
gradient-clipping code run fine on CPU tensors, except for a handful of places that hard-code
the CUDA device, the CUDA RNG or CUDA tensor types. On a machine without CUDA (CI, laptops)
each of those places raises ``AssertionError: Torch not compiled with CUDA enabled``. The shims
below cover exactly those places and nothing else:

    shim_current_device         torch.cuda.current_device() used as a placement device
    shim_cuda_rng_state         CUDA RNG state save/restore (RNG tracker, activation recompute)
    shim_grad_clipping          device='cuda' literals and a torch.cuda.FloatTensor assert in
                                megatron.core.optimizer.clip_grads
    shim_fp32_optimizer_scale   device='cuda' loss-scale tensor of FP32Optimizer

Rules every shim follows:
- it is a named function with a docstring saying which Megatron assumption it covers and why;
- it is idempotent (applying it twice changes nothing) and reports whether it changed anything;
- it is applied only when CUDA is unavailable (``apply_all`` is a no-op on a GPU machine, where
  Megatron runs unpatched).

The other known CUDA assumptions of megatron-core 0.16.1 are kept out of reach by choices,
not patches:

    torch.cuda.Stream and tensor split sizes    the all-to-all token dispatcher is not used on
      in the all-to-all token dispatcher        CPU (``moe_token_dispatcher_type="allgather"``,
                                                model.transformer_config)
    CUDA weight initialisation                  ``use_cpu_initialization`` on CPU
    te_general_gemm NameError without           the router's gating is our own plain F.linear
      Transformer Engine (moe_utils)            (router.ReplayTopKRouter; also needed on GPUs
                                                without TE)
    CUDA causal/sliding masks of the local      our own PackedCoreAttention (THD packing)
      DotProductAttention
    device='cuda' in grad_scaler, the           fp32 on CPU needs no grad scaler; the backend
      pipeline schedules, the distributed       runs its own micro-batch loop and the plain
      optimizer's torch.cuda.*Tensor checks     (non-distributed) optimizer wrapper
    ranks building different weights            ``torch.manual_seed`` before building
                                                (parallel.init_parallel)

The ``device='cuda'`` literals are handled by running the affected Megatron functions under a
``TorchFunctionMode`` that rewrites a CUDA ``device=`` argument of tensor factories to CPU (and
makes ``Tensor.type()`` of a CPU fp32 tensor read as ``torch.cuda.FloatTensor``), active only
for the duration of those calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "SHIMS",
    "apply_all",
    "cuda_available",
    "shim_cuda_rng_state",
    "shim_current_device",
    "shim_fp32_optimizer_scale",
    "shim_grad_clipping",
]

# Marker set on every function a shim installs; makes each shim idempotent and testable.
_MARK = "_mopd_cpu_compat"


def cuda_available() -> bool:
    """True when torch can use a CUDA device (then no shim is applied)."""
    return torch.cuda.is_available()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaLiteralsOnCpu(TorchFunctionMode):
    """Rewrite ``device='cuda'`` of tensor factories to CPU, and report a CPU fp32 tensor's
    ``type()`` as ``torch.cuda.FloatTensor``, for the code that runs inside the mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and out == "torch.FloatTensor":
            return "torch.cuda.FloatTensor"
        return out


def _cuda_literals_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so it runs under ``_CudaLiteralsOnCpu``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaLiteralsOnCpu():
            return fn(*args, **kwargs)

    setattr(wrapper, _MARK, True)
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _wrap_attr(owner: Any, name: str) -> bool:
    """Replace ``owner.name`` by its ``_cuda_literals_on_cpu`` wrapper unless already wrapped."""
    current = getattr(owner, name)
    if getattr(current, _MARK, False):
        return False
    setattr(owner, name, _cuda_literals_on_cpu(current))
    return True


def shim_current_device() -> bool:
    """Make ``torch.cuda.current_device()`` return the CPU device.

    Megatron uses ``device=torch.cuda.current_device()`` as *the* placement device in ~30
    places on the training path: the GlobalMemoryBuffer (parallel_state), gather/scatter
    buffers of the tensor-parallel mappings and the allgather token dispatcher, the
    DistributedDataParallel grad buffers (param_and_grad_buffer), the TopKRouter's expert-bias
    buffers, rotary embeddings. On a CPU-only torch the call raises; returning the CPU device
    places every one of those buffers next to the CPU parameters, which is what they need.
    """
    current = torch.cuda.current_device
    if getattr(current, _MARK, False):
        return False

    def current_device() -> torch.device:
        return torch.device("cpu")

    setattr(current_device, _MARK, True)
    current_device.__wrapped__ = current  # type: ignore[attr-defined]
    torch.cuda.current_device = current_device
    return True


def shim_cuda_rng_state() -> bool:
    """Turn the CUDA RNG state save/restore of megatron.core.tensor_parallel.random into no-ops.

    The CUDA RNG tracker (``model_parallel_cuda_manual_seed`` -> ``CudaRNGStatesTracker.add``,
    and ``get_cuda_rng_tracker().fork()`` around the embedding and, with sequence parallelism,
    the whole decoder) and activation recompute (``tensor_parallel.checkpoint`` saves and restores all RNG states
    around the recomputed forward) call ``torch.cuda`` RNG functions. On CPU there is no CUDA
    generator: the CPU generator, which checkpointing also saves and restores, is the only
    source of randomness, so the CUDA part has nothing to do. Dropout is off in this backend.
    """
    from megatron.core.tensor_parallel import random as mrandom

    if getattr(mrandom._get_cuda_rng_state, _MARK, False):
        return False
    tracker_cls = mrandom.CudaRNGStatesTracker
    original_get, original_set = mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state
    original_add = tracker_cls.add

    def get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_state(*args: Any, **kwargs: Any) -> None:
        return None

    def add(self: Any, name: str, seed: int) -> None:
        # Same book-keeping as CudaRNGStatesTracker.add (which reads torch.cuda.get_rng_state).
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = get_state()

    for fn, original in (
        (get_state, original_get),
        (set_state, original_set),
        (add, original_add),
    ):
        setattr(fn, _MARK, True)
        fn.__wrapped__ = original  # type: ignore[attr-defined]
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    tracker_cls.add = add
    return True


def shim_grad_clipping() -> bool:
    """Run Megatron's grad-norm, grad-clip and zero-count functions with CUDA literals on CPU.

    megatron.core.optimizer.clip_grads allocates its accumulators with ``device='cuda'``
    (``get_grad_norm_fp32``, ``count_zeros_fp32``, and the local ``multi_tensor_l2norm``
    fallback used without apex / Transformer Engine) and asserts
    ``param.grad.type() == 'torch.cuda.FloatTensor'`` before scaling (``clip_grad_by_total_norm_fp32``).
    The math is device-agnostic, so the functions run unchanged under the literal-rewriting
    mode; the optimizer module's imported names are wrapped too.
    """
    from megatron.core.optimizer import clip_grads, optimizer

    changed = False
    for owner in (clip_grads, optimizer):
        for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"):
            if hasattr(owner, name):
                changed |= _wrap_attr(owner, name)
    return changed


def shim_fp32_optimizer_scale() -> bool:
    """Build Megatron's FP32Optimizer with its unit loss scale on CPU.

    ``FP32Optimizer.__init__`` creates ``self._scale = torch.tensor([1.0], device='cuda')``
    (the loss scale it reports, always 1 in fp32). Constructing it under the literal-rewriting
    mode puts that tensor on CPU; nothing else in the class touches CUDA.
    """
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return _wrap_attr(FP32Optimizer, "__init__")


SHIMS: tuple[Callable[[], bool], ...] = (
    shim_current_device,
    shim_cuda_rng_state,
    shim_grad_clipping,
    shim_fp32_optimizer_scale,
)


def apply_all() -> list[str]:
    """Apply every shim when CUDA is unavailable; a no-op on a CUDA machine.

    Returns the names of the shims that changed something (empty when all were already in
    place, and always empty on a CUDA machine).
    """
    if cuda_available():
        return []
    return [shim.__name__ for shim in SHIMS if shim()]
