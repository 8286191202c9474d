"""torch.distributed and Megatron ``parallel_state`` set-up from a ``TrainerConfig``.

One trainer process per rank, launched torchrun-style (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment). A single process with
no such variables becomes a world of one on a free loopback port, so the backend also runs
in a plain ``python`` process or a test.

Layout: ``world = tensor_parallel * pipeline_parallel * data_parallel``. Experts are split
``expert_parallel`` ways across the tensor x data ranks (expert tensor parallelism is 1: an
expert's weights are never split, as in DeepSeek-V3 / MiMo deployments), so
``expert_parallel`` must divide ``tensor_parallel * data_parallel`` and be a multiple of
``tensor_parallel`` (the TP ranks, which hold different token slices under sequence
parallelism, must exchange tokens through the expert dispatcher). Pipeline parallelism is not
supported by this backend.

Backends: NCCL on CUDA machines, gloo otherwise (with ``trainer.megatron.cpu_compat``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mopd.config.schema import TrainerConfig
from trainer.megatron import cpu_compat

__all__ = ["ParallelLayout", "destroy_parallel", "free_port", "init_parallel", "rng_tracker"]


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the parallel grid."""

    rank: int
    world_size: int
    tp: int
    ep: int
    dp: int
    tp_rank: int
    ep_rank: int
    dp_rank: int
    device: torch.device


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_layout(cfg: TrainerConfig, world_size: int) -> None:
    for name in ("tensor_parallel", "expert_parallel", "pipeline_parallel", "data_parallel"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"trainer.{name}={value!r} must be a positive int")
    if cfg.pipeline_parallel != 1:
        raise ValueError(
            f"trainer.pipeline_parallel={cfg.pipeline_parallel}: the Megatron backend does not "
            "support pipeline parallelism; set it to 1 and use tensor/expert/data parallelism"
        )
    expected = cfg.tensor_parallel * cfg.pipeline_parallel * cfg.data_parallel
    if expected != world_size:
        raise ValueError(
            f"trainer.tensor_parallel * pipeline_parallel * data_parallel = {expected} but "
            f"{world_size} trainer process(es) were started (WORLD_SIZE); launch {expected} "
            "processes or change the parallel sizes"
        )
    if (cfg.tensor_parallel * cfg.data_parallel) % cfg.expert_parallel:
        raise ValueError(
            f"trainer.expert_parallel={cfg.expert_parallel} must divide tensor_parallel * "
            f"data_parallel = {cfg.tensor_parallel * cfg.data_parallel}"
        )
    if cfg.expert_parallel % cfg.tensor_parallel:
        # Sequence parallelism gives each TP rank a slice of the tokens; an expert sees all of
        # them only if the TP ranks exchange tokens through the expert-parallel dispatcher.
        # (With experts replicated over TP ranks, Megatron would neither gather the tokens nor
        # reduce the expert gradients over those ranks.)
        raise ValueError(
            f"trainer.expert_parallel={cfg.expert_parallel} must be a multiple of "
            f"tensor_parallel={cfg.tensor_parallel}: experts are split by expert parallelism "
            "only, never by tensor parallelism"
        )


def init_parallel(
    cfg: TrainerConfig, *, seed: int = 0, timeout_minutes: int = 10
) -> ParallelLayout:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups.

    Idempotent for the same sizes within a process; a different layout in the same process
    is refused (Megatron's parallel state is global). Seeds torch's CPU generator and
    Megatron's RNG tracker with ``seed`` so every data-parallel rank builds identical weights.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.apply_all()

    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        from datetime import timedelta

        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    _check_layout(cfg, world_size)

    if ps.model_parallel_is_initialized():
        same = (
            ps.get_tensor_model_parallel_world_size() == cfg.tensor_parallel
            and ps.get_expert_model_parallel_world_size() == cfg.expert_parallel
        )
        if not same:
            raise RuntimeError(
                "Megatron parallel state is already initialised with another layout in this "
                "process; call trainer.megatron.parallel.destroy_parallel() first"
            )
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=cfg.expert_parallel,
            expert_tensor_parallel_size=1,
            distributed_timeout_minutes=timeout_minutes,
            # On CPU every group is gloo already; extra gloo twins would only cost set-up time.
            create_gloo_process_groups=use_cuda,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        rank=dist.get_rank(),
        world_size=world_size,
        tp=cfg.tensor_parallel,
        ep=cfg.expert_parallel,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device())
        if use_cuda
        else torch.device("cpu"),
    )


def rng_tracker() -> Any:
    """Megatron's CUDA RNG tracker, seeded by ``init_parallel``: named forks of the CUDA
    generator (model-parallel regions), whose states a checkpoint saves with the others."""
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def destroy_parallel(*, keep_process_group: bool = False) -> None:
    """Tear down Megatron's groups and, unless ``keep_process_group``, the default process
    group (safe to call twice). Keeping it lets a process re-initialise another layout."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
