"""Toolbox: nothing a sandbox does on the host side can wedge a lease, the pool or a slot.

Defence in depth: whatever host-side sandbox operation hangs or raises (a file access that
blocks in the kernel, a walk that recurses too deep), the Toolbox bounds it in time,
retires that sandbox (closed in the background, logged) and puts a fresh one in its place.
The sandboxes here are real; ``Faulty`` makes one of their methods hang (until the test
ends) or raise on demand, the faults the Toolbox must survive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import ClassVar

import pytest

from envs.sandbox import Sandbox, SandboxLimits
from envs.toolbox import Toolbox, ToolboxConfig, ToolQuota
from envs.tools import ToolCall
from tests.envs.marks import needs_root

pytestmark = needs_root

LIMITS = SandboxLimits(wall_seconds=1.0, cpu_seconds=1.0)


class Faulty(Sandbox):
    """A real sandbox; the next call of a method named in ``faults`` (any sandbox's) hangs
    (``"hang"``: until ``unblock`` is set) or raises the given exception."""

    faults: ClassVar[dict[str, object]] = {}
    unblock = threading.Event()

    def _fault(self, name: str) -> None:
        fault = self.faults.pop(name, None)
        if fault == "hang":
            self.unblock.wait()
        elif isinstance(fault, BaseException):
            raise fault

    def read_text(self, rel):
        self._fault("read_text")
        return super().read_text(rel)

    def reset(self, files_from=None):
        self._fault("reset")
        return super().reset(files_from)

    def healthy(self):
        self._fault("healthy")
        return super().healthy()

    def close(self):
        self._fault("close")
        return super().close()


class FaultyToolbox(Toolbox):
    """A Toolbox whose sandboxes are ``Faulty`` (built like its own, from its config)."""

    def _new_sandbox(self):
        return Faulty(None, self.config.limits, self.config.base_dir)


@pytest.fixture
def faults():
    Faulty.faults = {}
    Faulty.unblock = threading.Event()
    yield Faulty.faults
    Faulty.faults = {}
    Faulty.unblock.set()  # frees the threads that hung


def _sandboxes_left(base) -> list[str]:
    return sorted(os.listdir(base)) if base.exists() else []


def test_a_call_that_never_returns_frees_its_slot_and_its_sandbox_is_replaced(faults, tmp_path):
    base = tmp_path / "sandboxes"
    config = ToolboxConfig(
        pool_size=2,
        limits=LIMITS,
        quotas={"str_replace": ToolQuota(max_concurrency=1, max_wait_s=5.0)},
        call_timeout_s=0.3,
        call_grace_s=0.5,
        upkeep_timeout_s=2.0,
        acquire_timeout_s=1.0,
        health_interval_s=None,
        base_dir=str(base),
    )
    edit = ToolCall("str_replace", {"path": "f.txt", "old": "a", "new": "b"})

    async def main():
        box = FaultyToolbox(config)
        try:
            hung, other = await box.acquire(None), await box.acquire(None)
            await box.call(other, ToolCall("bash", {"command": "echo a > f.txt"}))
            faults["read_text"] = "hang"
            t0 = time.monotonic()
            stuck = await box.call(hung, edit)  # its thread never returns
            waited = time.monotonic() - t0
            # The one str_replace slot comes back at the call's bound (wall 1 s + grace
            # 0.5 s), although the thread still hangs: the other rollout's edit runs.
            t0 = time.monotonic()
            edited = await box.call(other, edit)
            slot_back = time.monotonic() - t0
            t0 = time.monotonic()
            await asyncio.wait_for(box.release(hung), 10)  # bounded; the sandbox is replaced
            release_s = time.monotonic() - t0
            await box.release(other)
            stats = await box.stats()
            leases = [await box.acquire(None) for _ in range(2)]  # the whole pool works
            outs = [await box.call(le, ToolCall("bash", {"command": "echo ok"})) for le in leases]
            return stuck, waited, edited, slot_back, release_s, stats, outs
        finally:
            await asyncio.wait_for(box.close(), 10)

    stuck, waited, edited, slot_back, release_s, stats, outs = asyncio.run(main())
    assert stuck.is_error and "did not return within 0.3 s" in stuck.text
    assert "reset" not in stuck.text  # nothing was reset: the observation does not claim it
    assert waited < 2.0
    assert edited.text.startswith("Replaced 1 occurrence"), edited.text
    assert slot_back < 3.0
    assert release_s < 3.0
    assert stats["pool"] | {"health_checks": 0} == {
        "size": 2, "idle": 2, "leased": 0, "replaced": 1, "missing": 0, "unclosed": 0,
        "health_checks": 0, "acquires": 2,
    }  # fmt: skip
    tool = stats["tools"]["str_replace"]
    assert (tool["running"], tool["calls"], tool["errors"]) == (0, 2, 1)
    assert [o.text for o in outs] == ["ok\n[exit code 0]"] * 2
    assert _sandboxes_left(base) == []  # the retired one too, although its thread still hangs


def test_upkeep_that_hangs_or_raises_replaces_the_sandbox_and_says_so(faults, tmp_path, caplog):
    base = tmp_path / "sandboxes"
    config = ToolboxConfig(
        pool_size=2,
        limits=LIMITS,
        upkeep_timeout_s=1.0,
        acquire_timeout_s=1.0,
        health_interval_s=None,
        base_dir=str(base),
    )
    echo = ToolCall("bash", {"command": "echo ok"})

    async def main():
        box = FaultyToolbox(config)
        seen = {}
        try:
            for name, fault in [
                ("reset", RecursionError("maximum recursion depth exceeded")),
                ("reset", "hang"),
                ("healthy", OSError(36, "File name too long")),
                ("healthy", "hang"),
            ]:
                # the fault hits the sandbox the lease gets (reset) or hands back (healthy)
                faults[name] = fault
                t0 = time.monotonic()
                lease = await asyncio.wait_for(box.acquire(None), 10)
                out = await box.call(lease, echo)
                await asyncio.wait_for(box.release(lease), 10)
                seen[(name, str(fault))] = (out.text, time.monotonic() - t0)
            lease = await box.acquire(None)
            faults["healthy"] = OSError("broken")
            faults["close"] = RuntimeError("cannot close")
            await box.release(lease)  # replaced; the old one's close fails (once)
            await asyncio.sleep(0.2)  # its retirement runs in the background
            stats = await box.stats()
            leases = [await box.acquire(None) for _ in range(2)]
            for le in leases:
                await box.release(le)
            return seen, stats, await box.stats()
        finally:
            await asyncio.wait_for(box.close(), 10)

    with caplog.at_level(logging.WARNING, logger="envs.toolbox"):
        seen, stats, after = asyncio.run(main())
    for key, (text, took) in seen.items():
        assert text == "ok\n[exit code 0]", key
        assert took < 5.0, key  # a hung reset or health check costs its bound (1 s), no more
    logged = caplog.text
    assert "RecursionError: maximum recursion depth exceeded" in logged
    assert "reset did not return within upkeep_timeout_s=1 s" in logged
    assert "OSError: [Errno 36] File name too long" in logged
    assert "health check did not return within upkeep_timeout_s=1 s" in logged
    assert "could not be closed (RuntimeError: cannot close)" in logged
    assert stats["pool"]["replaced"] == 5 and stats["pool"]["unclosed"] == 1
    assert (stats["pool"]["idle"], stats["pool"]["missing"]) == (2, 0)
    assert after["pool"]["idle"] == 2 and after["pool"]["acquires"] == 7
    # The Toolbox's close tried the one whose close had raised again: nothing is left.
    assert _sandboxes_left(base) == []
