"""Toolbox: quotas that hold across every caller, pooled sandboxes, health checks, refusals.

The load test measures the limits from timestamps taken *inside* the sandboxes (``date``
at the start and end of each bash command), not from the Toolbox's own counters.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import pytest
import ray

from envs.sandbox import SandboxLimits
from envs.toolbox import Toolbox, ToolboxBusy, ToolboxConfig, ToolQuota, remote_toolbox
from envs.tools import ToolCall
from tests.ray_local import private_ray

LIMITS = SandboxLimits(wall_seconds=10.0, cpu_seconds=5.0)
STAMPED = "echo start=$(date +%s.%N); sleep 0.1; echo end=$(date +%s.%N)"
_STAMP = re.compile(r"start=([\d.]+)\nend=([\d.]+)")


def bash(command: str) -> ToolCall:
    return ToolCall("bash", {"command": command})


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    return peak


def _max_starts_in_window(starts: list[float], window_s: float) -> int:
    starts = sorted(starts)
    best, j = 0, 0
    for i, s in enumerate(starts):
        while starts[j] <= s - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.fixture(scope="module")
def ray_local():
    with private_ray(num_cpus=2):
        yield


def test_quotas_hold_for_64_concurrent_rollouts_through_the_actor(ray_local):
    max_concurrency, max_qps = 4, 10
    config = ToolboxConfig(
        pool_size=32,
        limits=LIMITS,
        quotas={
            "bash": ToolQuota(max_concurrency=max_concurrency, max_qps=max_qps, max_wait_s=120)
        },
        health_interval_s=None,
    )
    toolbox = remote_toolbox(num_cpus=0).remote(config)

    async def rollout(i: int) -> list[str]:
        lease = await toolbox.acquire.remote(None)
        try:
            return [(await toolbox.call.remote(lease, bash(STAMPED))).text for _ in range(2)]
        finally:
            await toolbox.release.remote(lease)

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(rollout(i) for i in range(64)))

    t0 = time.monotonic()
    texts = [t for per_rollout in asyncio.run(main()) for t in per_rollout]
    elapsed = time.monotonic() - t0
    stats = ray.get(toolbox.stats.remote())
    ray.get(toolbox.close.remote())
    ray.kill(toolbox)

    intervals = []
    for text in texts:
        m = _STAMP.search(text)
        assert m, f"a call did not run: {text!r}"
        intervals.append((float(m.group(1)), float(m.group(2))))
    assert len(intervals) == 128
    # Measured inside the sandboxes: never more than the limit running at once ...
    assert _max_overlap(intervals) <= max_concurrency
    # ... and never more than max_qps starts in any 1 s window.
    assert _max_starts_in_window([s for s, _ in intervals], 1.0) <= max_qps
    # The limits bound (64 callers would otherwise run far more at once): the calls took at
    # least as long as the rate allows, and the Toolbox saw both limits reached exactly.
    assert elapsed >= (128 - max_qps) / max_qps
    tool = stats["tools"]["bash"]
    assert tool["calls"] == 128 and tool["refusals"] == 0 and tool["errors"] == 0
    assert tool["peak_concurrency"] == max_concurrency
    assert tool["max_qps_observed"] == max_qps
    assert stats["pool"]["acquires"] == 64 and stats["pool"]["leased"] == 0


def test_exhausted_quota_refuses_with_an_observation_and_the_caller_goes_on():
    config = ToolboxConfig(
        pool_size=3,
        limits=LIMITS,
        quotas={"bash": ToolQuota(max_concurrency=1, max_wait_s=0.3, max_queue=1)},
        health_interval_s=None,
    )

    async def main():
        box = Toolbox(config)
        leases = [await box.acquire(None) for _ in range(3)]
        try:
            slow = asyncio.create_task(box.call(leases[0], bash("sleep 1.5; echo slow")))
            await asyncio.sleep(0.2)
            waits = asyncio.create_task(box.call(leases[1], bash("echo waited")))
            await asyncio.sleep(0.05)
            queue_full = await box.call(leases[2], bash("echo never"))  # 1 already queued
            refused_late = await waits  # queued 0.3 s behind the slow call, then refused
            done = await slow
            after = await box.call(leases[1], bash("echo again"))  # a free slot runs again
            return queue_full, refused_late, done, after, await box.stats()
        finally:
            await box.close()

    queue_full, refused_late, done, after, stats = asyncio.run(main())
    assert queue_full.is_error and "refused" in queue_full.text and "max_queue=1" in queue_full.text
    assert refused_late.is_error and "max_wait_s=0.3" in refused_late.text
    assert "at most 1 running" in refused_late.text
    assert done.text.startswith("slow") and not done.is_error
    assert after.text.startswith("again") and not after.is_error
    assert stats["tools"]["bash"]["refusals"] == 2 and stats["tools"]["bash"]["calls"] == 2


def test_broken_sandboxes_are_replaced_at_release_and_when_idle():
    config = ToolboxConfig(pool_size=2, limits=LIMITS, health_interval_s=0.2)

    async def main():
        box = Toolbox(config)
        try:
            lease = await box.acquire(None)
            shutil.rmtree(box.workdir(lease))  # the sandbox can no longer set up a call
            broken = await box.call(lease, bash("echo hi"))
            await box.release(lease)
            replaced_at_release = (await box.stats())["pool"]["replaced"]

            lease = await box.acquire(None)
            idle_dir = box.workdir(lease)
            await box.release(lease)  # healthy: back in the pool as it is
            shutil.rmtree(idle_dir)  # breaks while idle: the periodic check finds it
            await asyncio.sleep(0.8)
            stats = await box.stats()

            leases = [await box.acquire(None) for _ in range(2)]  # the whole pool works again
            outs = [await box.call(le, bash("echo ok")) for le in leases]
            return broken, replaced_at_release, stats, outs
        finally:
            await box.close()

    broken, replaced_at_release, stats, outs = asyncio.run(main())
    assert broken.is_error and "failed in the sandbox" in broken.text
    assert replaced_at_release == 1
    assert stats["pool"]["replaced"] == 2 and stats["pool"]["idle"] == 2
    assert stats["tools"]["bash"]["errors"] == 1
    assert [o.text for o in outs] == ["ok\n[exit code 0]"] * 2


def test_leases_copy_the_task_files_and_a_full_pool_times_out(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "data.txt").write_text("hello\n")
    config = ToolboxConfig(
        pool_size=1, limits=LIMITS, acquire_timeout_s=0.2, health_interval_s=None
    )

    async def main():
        box = Toolbox(config)
        try:
            lease = await box.acquire(tmp_path / "task")
            seen = await box.call(lease, bash("cat data.txt; echo changed > data.txt"))
            with pytest.raises(ToolboxBusy, match="pool_size"):
                await box.acquire(None)
            check = await box.run_check(lease, "cat data.txt")
            await box.release(lease)
            lease = await box.acquire(tmp_path / "task")  # a fresh copy, not the edited one
            again = await box.call(lease, bash("cat data.txt"))
            with pytest.raises(KeyError, match="unknown or released lease"):
                await box.call("nope", bash("true"))
            await box.release(lease)
            return seen, check, again, await box.stats()
        finally:
            await box.close()

    seen, check, again, stats = asyncio.run(main())
    assert seen.text == "hello\n[exit code 0]"
    assert check.exit_code == 0 and check.output == "changed\n"
    assert again.text == "hello\n[exit code 0]"
    assert stats["tools"]["check"]["calls"] == 1 and stats["pool"]["acquires"] == 2
