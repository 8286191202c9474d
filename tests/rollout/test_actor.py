"""RolloutWorker on a local Ray cluster, owning a real embedded engine server (tiny MiMo)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
import ray

from mopd.config.schema import RolloutConfig
from mopd.inference.protocol import GenerateRequest, SamplingParams, UpdateWeightsFromDisk
from rollout.build import build_rollout_backend, routed_experts_shape_of
from rollout.launcher import LaunchSpec
from rollout.router import EngineRouter
from tests.ray_local import private_ray

PROMPT = [5, 6, 7, 8]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    with private_ray(num_cpus=2):
        yield


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_rollout_worker_owns_and_forwards_to_its_server(ray_local, tiny_ckpts):
    from rollout.actor import remote_rollout_worker

    student, teacher = str(tiny_ckpts["mimo"]), str(tiny_ckpts["mimo_teacher"])
    shape = routed_experts_shape_of(student)
    spec = LaunchSpec(
        model_path=student,
        enable_return_routed_experts=True,
        weight_version="0",
        extra_argv=("--torch-num-threads", "1"),
    )
    worker = remote_rollout_worker(num_cpus=0).remote(spec, routed_experts_shape=shape)
    request = GenerateRequest(
        input_ids=PROMPT,
        sampling_params=SamplingParams(max_new_tokens=6, temperature=0.0),
        return_logprob=True,
        return_routed_experts=True,
    )
    before = ray.get(worker.generate.remote(request))
    assert before.weight_version == "0" and len(before.output_ids) == 6
    assert before.routed_experts.shape == (len(PROMPT) + 6 - 1, *shape)
    assert ray.get(worker.health.remote())

    ray.get(worker.update_weights.remote(UpdateWeightsFromDisk(teacher, weight_version="1")))
    assert ray.get(worker.weight_version.remote()) == "1"
    after = ray.get(worker.generate.remote(request))
    assert after.weight_version == "1"
    # Different weights give different log-probs for the prompt's continuation.
    assert not np.allclose(before.output_logprobs, after.output_logprobs)

    pid = ray.get(worker.server_pid.remote())
    assert ray.get(worker.shutdown.remote()) is not None
    assert _gone(pid)
    ray.kill(worker)


def test_build_rollout_backend_local_processes(tmp_path):
    # Two server processes (the SGLang-shaped stand-in, cheap to start) behind the router.
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 3, "num_experts_per_tok": 2}')
    cfg = RolloutConfig(num_servers=2, max_running_requests=8)
    standin = {"module": "tests.inference.sglang_standin", "cwd": str(REPO)}
    service = build_rollout_backend(
        cfg,
        str(tmp_path),
        use_ray=False,
        spec_overrides=[{**standin, "weight_version": v} for v in ("a", "b")],
        startup_timeout_s=60,
    )
    request = GenerateRequest(
        input_ids=PROMPT, sampling_params=SamplingParams(max_new_tokens=3), return_logprob=True,
        return_routed_experts=True,
    )  # fmt: skip

    router = service.router
    assert isinstance(router, EngineRouter)  # generate_many and loads are the router's own

    async def go():
        try:
            outs = await router.generate_many([request] * 4)
            return outs, router.loads(), await router.weight_versions()
        finally:
            await service.aclose()

    outs, loads, versions = asyncio.run(go())
    assert [load.served for load in loads] == [1, 1]  # one batched call of 2 per server
    assert versions == ["a", "b"]
    assert all(o.routed_experts.shape == (len(PROMPT) + 3 - 1, 3, 2) for o in outs)
    assert all(not w.alive() for w in service.workers)
    assert "--enable-return-routed-experts" in service.workers[0].command
