"""Toolbox: the one place where tool calls of every concurrent rollout meet their limits.

Each rollout (a ``ToolManager`` in a rollout worker) leases one sandbox for its whole
trajectory, sends its tool calls here and releases the lease when the trajectory ends. The
Toolbox runs as one Ray actor (``remote_toolbox``) whose async methods all run on one event
loop, so what it counts it counts across every caller:

- **a pool of pre-warmed sandboxes** (``ToolboxConfig.pool_size``), built when the Toolbox
  starts; ``acquire`` takes an idle one and resets its working directory to a fresh copy of
  the task's files, waiting at most ``acquire_timeout_s`` for one to come free (then
  ``ToolboxBusy``); ``release`` hands it back.
- **per-tool quotas** (``ToolQuota``): at most ``max_concurrency`` calls of a tool running at
  once, and at most ``max_qps`` call starts in any 1 s window (below 1 QPS: one start per
  ``1 / max_qps`` s). The rate is enforced so that it also holds for the start times seen
  *inside* the sandboxes, which come a variable few milliseconds after admission (process
  spawn): a call counts against its tool's window from its admission until one window after
  it returns, so a new call is admitted only while fewer than ``max_qps`` calls are running or
  returned within the last second. Whatever the spawn delays, no 1 s window then holds more
  than ``max_qps`` starts. A call that cannot start at once queues; it waits at most
  ``max_wait_s`` behind at most ``max_queue`` others, then gets a refusal observation
  (``is_error``, naming the limit) instead of running: the model sees it and the rollout goes
  on. Admission is FIFO.
- **off the event loop**: a call runs ``envs.tools.run_tool`` (a blocking subprocess) in a
  thread pool with one thread per slot of every quota, so the loop keeps admitting and
  counting while calls run. A call's concurrency slot is held until its thread returns,
  even when the caller stopped waiting (``call_timeout_s``): the limit counts processes
  that really run, not awaits. Calls in one sandbox run one at a time (a later one waits
  for an overrunning one, which the sandbox's wall limit ends).
- **health**: a sandbox whose call failed, or that fails ``Sandbox.healthy()`` (a trivial
  command in it), is closed and replaced by a new one when its lease is released; idle
  sandboxes are checked every ``health_interval_s``. ``stats()["pool"]["replaced"]`` counts
  replacements.

``check`` (``run_check``) is not a model tool: it is the environment's own command (the
code-repair test command that decides the reward), with its own quota key ``"check"``.

``stats()`` reports per quota key: calls, refusals, errors, peak concurrency, the largest
number of call starts seen in any 1 s window (``max_qps_observed``), running and waiting now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.sandbox import ExecResult, Sandbox, SandboxLimits, check_isolation
from envs.tools import TOOL_SPECS, Observation, ToolCall, run_tool

__all__ = [
    "CHECK",
    "ToolQuota",
    "Toolbox",
    "ToolboxBusy",
    "ToolboxConfig",
    "remote_toolbox",
]

log = logging.getLogger(__name__)

CHECK = "check"
"""Quota key of ``Toolbox.run_check`` (the environment's reward command, not a model tool)."""
_OTHER = "_unknown"
"""Quota key shared by calls that name no known tool (run_tool answers them with an error)."""


class ToolboxBusy(RuntimeError):
    """No sandbox came free within the acquire timeout (every lease is in use)."""


@dataclass(frozen=True)
class ToolQuota:
    """Limits of one tool, enforced across every caller of the Toolbox."""

    max_concurrency: int = 8
    """Calls of this tool running at once."""
    max_qps: float | None = None
    """Call starts per second in any sliding 1 s window (None: no rate limit)."""
    max_wait_s: float = 30.0
    """How long a call may queue for a slot before it is refused."""
    max_queue: int = 1024
    """Calls that may queue at once; one more is refused immediately."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"ToolQuota.max_concurrency={self.max_concurrency} must be >= 1")
        if self.max_qps is not None and not self.max_qps > 0:
            raise ValueError(f"ToolQuota.max_qps={self.max_qps} must be > 0 (or None: no limit)")
        if self.max_wait_s < 0 or self.max_queue < 0:
            raise ValueError("ToolQuota.max_wait_s and max_queue must be >= 0")

    @property
    def window(self) -> tuple[int, float]:
        """(starts allowed, window seconds) of the rate limit."""
        assert self.max_qps is not None
        if self.max_qps >= 1:
            return int(self.max_qps), 1.0
        return 1, 1.0 / self.max_qps


def _default_quotas() -> dict[str, ToolQuota]:
    return {
        "bash": ToolQuota(max_concurrency=8),
        "str_replace": ToolQuota(max_concurrency=8),
        "finish": ToolQuota(max_concurrency=8),
        CHECK: ToolQuota(max_concurrency=4),
        _OTHER: ToolQuota(max_concurrency=2),
    }


@dataclass(frozen=True)
class ToolboxConfig:
    """How the Toolbox is built. Consumed by ``Toolbox`` (and the actor that wraps it)."""

    pool_size: int = 8
    """Sandboxes built at start (the most rollouts that can hold a lease at once)."""
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    """Per-call limits of every sandbox."""
    quotas: Mapping[str, ToolQuota] = field(default_factory=_default_quotas)
    """Per-tool quotas by tool name (and ``"check"``); a tool not named gets ``ToolQuota()``."""
    acquire_timeout_s: float = 300.0
    """How long ``acquire`` waits for a free sandbox before raising ``ToolboxBusy``."""
    call_timeout_s: float | None = None
    """How long a caller waits for one call (default: the sandbox wall limit + 10 s); past it
    the call's observation says so and its sandbox is checked at release."""
    health_interval_s: float | None = 60.0
    """Period of the health check of idle sandboxes (None: only at release)."""
    base_dir: str | None = None
    """Where sandboxes keep their files (default: the system temporary directory)."""

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"ToolboxConfig.pool_size={self.pool_size} must be >= 1")
        if not self.acquire_timeout_s > 0:
            raise ValueError("ToolboxConfig.acquire_timeout_s must be > 0")
        for name, quota in self.quotas.items():
            if not isinstance(quota, ToolQuota):
                raise TypeError(f"ToolboxConfig.quotas[{name!r}] must be a ToolQuota")

    def quota(self, key: str) -> ToolQuota:
        return self.quotas.get(key) or _default_quotas().get(key) or ToolQuota()


class _Gate:
    """Concurrency + sliding-window rate limit of one quota key, FIFO, with a bounded wait.

    Lives on the Toolbox's event loop; every method is called from it.
    """

    def __init__(self, key: str, quota: ToolQuota) -> None:
        self.key, self.quota = key, quota
        self._slots = asyncio.Semaphore(quota.max_concurrency)
        self._rate_lock = asyncio.Lock()
        self._ends: deque[float] = deque()  # returns of calls inside the rate window
        self._changed = asyncio.Event()
        self._last_second: deque[float] = deque()  # admissions of the last 1 s (observed QPS)
        self.running = self.waiting = 0
        self.calls = self.refusals = self.errors = self.peak_concurrency = 0
        self.max_qps_observed = 0

    async def admit(self) -> str | None:
        """Wait for a slot (and room in the rate window); None when admitted, else why the
        call is refused. An admitted call must ``leave()`` exactly once."""
        q = self.quota
        if self.waiting >= q.max_queue:
            self.refusals += 1
            return f"{self.waiting} calls are already queued (max_queue={q.max_queue})"
        self.waiting += 1
        try:
            async with asyncio.timeout(q.max_wait_s):
                await self._slots.acquire()
                try:
                    async with self._rate_lock:
                        await self._wait_for_rate()
                        self._admitted()
                except BaseException:
                    self._slots.release()
                    raise
        except TimeoutError:
            self.refusals += 1
            return f"no slot came free within max_wait_s={q.max_wait_s} s"
        finally:
            self.waiting -= 1
        return None

    def _admitted(self) -> None:
        now = time.monotonic()
        self.calls += 1
        self.running += 1
        self.peak_concurrency = max(self.peak_concurrency, self.running)
        while self._last_second and self._last_second[0] <= now - 1.0:
            self._last_second.popleft()
        self._last_second.append(now)
        self.max_qps_observed = max(self.max_qps_observed, len(self._last_second))

    async def _wait_for_rate(self) -> None:
        """Until fewer than the allowed calls are running or returned within the window."""
        if self.quota.max_qps is None:
            return
        allowed, window_s = self.quota.window
        while True:
            now = time.monotonic()
            while self._ends and self._ends[0] <= now - window_s:
                self._ends.popleft()
            if self.running + len(self._ends) < allowed:
                return
            self._changed.clear()
            # Woken by a call that returns, or when the oldest return leaves the window
            # (asyncio may fire a timer a clock tick early: the loop checks again).
            timeout = self._ends[0] + window_s - now if self._ends else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def leave(self) -> None:
        self.running -= 1
        self._ends.append(time.monotonic())
        self._changed.set()
        self._slots.release()

    def describe(self) -> str:
        q = self.quota
        rate = f", {q.max_qps:g} starts/s" if q.max_qps is not None else ""
        return f"at most {q.max_concurrency} running{rate}; {self.running} running now"

    def stats(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "refusals": self.refusals,
            "errors": self.errors,
            "peak_concurrency": self.peak_concurrency,
            "max_qps_observed": self.max_qps_observed,
            "running": self.running,
            "waiting": self.waiting,
            "max_concurrency": self.quota.max_concurrency,
            "max_qps": self.quota.max_qps if self.quota.max_qps is not None else float("inf"),
        }


@dataclass
class _Lease:
    sandbox: Sandbox
    since: float
    suspect: bool = False  # a call failed or overran: check health at release
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no call runs in it now

    def __post_init__(self) -> None:
        self.idle.set()


class Toolbox:
    """Pooled sandboxes and quota-limited tool calls; see the module docstring.

    Use it directly from one event loop (tests, a single process) or as a Ray actor through
    ``remote_toolbox``; the methods are the same. Raises ``SandboxUnavailable`` at
    construction when isolation cannot be set up here (fail closed).
    """

    def __init__(self, config: ToolboxConfig | None = None) -> None:
        self.config = config or ToolboxConfig()
        check_isolation()
        keys = {_spec_name(s) for s in TOOL_SPECS} | set(self.config.quotas) | {CHECK, _OTHER}
        self._gates_quota = {k: self.config.quota(k) for k in keys}
        threads = sum(q.max_concurrency for q in self._gates_quota.values())
        self._calls = ThreadPoolExecutor(threads, thread_name_prefix="toolbox-call")
        self._upkeep = ThreadPoolExecutor(2, thread_name_prefix="toolbox-upkeep")
        self._idle_sandboxes: list[Sandbox] = [
            self._new_sandbox() for _ in range(self.config.pool_size)
        ]
        self._leases: dict[str, _Lease] = {}
        self._gates: dict[str, _Gate] | None = None
        self._idle: asyncio.Queue[Sandbox] | None = None
        self._health_task: asyncio.Task | None = None
        self._replaced = self._health_checks = self._acquires = 0
        self._closed = False

    # ----------------------------------------------------------------------------- setup

    def _new_sandbox(self) -> Sandbox:
        base = Path(self.config.base_dir) if self.config.base_dir else None
        return Sandbox(None, self.config.limits, base)

    def _started(self) -> dict[str, _Gate]:
        """Build the loop-bound state on first use (a Ray actor's loop is not running in
        ``__init__``)."""
        if self._closed:
            raise RuntimeError("the Toolbox is closed")
        if self._gates is None:
            self._gates = {k: _Gate(k, q) for k, q in self._gates_quota.items()}
            self._idle = asyncio.Queue()
            for sandbox in self._idle_sandboxes:
                self._idle.put_nowait(sandbox)
            self._idle_sandboxes = []
            if self.config.health_interval_s:
                self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self._gates

    async def _in_thread(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # ---------------------------------------------------------------------------- leases

    async def acquire(self, files_from: str | Path | None = None) -> str:
        """Lease a sandbox whose working directory is a fresh copy of ``files_from`` (a
        directory on the Toolbox's host; None: empty). Returns the lease id.

        Raises:
            ToolboxBusy: no sandbox came free within ``acquire_timeout_s``.
            ValueError: ``files_from`` is not a directory.
        """
        self._started()
        assert self._idle is not None
        try:
            sandbox = await asyncio.wait_for(self._idle.get(), self.config.acquire_timeout_s)
        except TimeoutError:
            raise ToolboxBusy(
                f"no sandbox came free within {self.config.acquire_timeout_s} s: all "
                f"{self.config.pool_size} are leased; raise ToolboxConfig.pool_size or "
                "acquire_timeout_s, or run fewer rollouts at once"
            ) from None
        src = None if files_from is None else Path(files_from)
        try:
            try:
                await self._in_thread(self._upkeep, sandbox.reset, src)
            except ValueError:
                raise
            except Exception as e:  # the sandbox itself is broken: replace it, try once more
                log.warning("sandbox reset failed (%s); replacing it", e)
                sandbox = await self._replace(sandbox)
                await self._in_thread(self._upkeep, sandbox.reset, src)
        except BaseException:
            self._idle.put_nowait(sandbox)
            raise
        lease = uuid.uuid4().hex
        self._leases[lease] = _Lease(sandbox, time.monotonic())
        self._acquires += 1
        return lease

    def _lease(self, lease: str) -> _Lease:
        try:
            return self._leases[lease]
        except KeyError:
            raise KeyError(
                f"unknown or released lease {lease!r}; acquire() a sandbox before calling tools"
            ) from None

    async def release(self, lease: str) -> None:
        """Hand the lease's sandbox back to the pool (checked, and replaced if broken)."""
        self._started()
        assert self._idle is not None
        held = self._leases.pop(lease, None)
        if held is None:
            return
        sandbox = held.sandbox
        await held.idle.wait()  # a call that overran still runs in it (until its wall limit)
        if held.suspect or not await self._healthy(sandbox):
            sandbox = await self._replace(sandbox)
        self._idle.put_nowait(sandbox)

    def workdir(self, lease: str) -> str:
        """The host path of the lease's working directory (for tests and debugging)."""
        return str(self._lease(lease).sandbox.workdir)

    # ----------------------------------------------------------------------------- calls

    async def call(self, lease: str, call: ToolCall) -> Observation:
        """Run one tool call in the lease's sandbox under the tool's quota.

        Returns the tool's observation, or a refusal / failure observation (``is_error``)
        when the quota was exhausted, the call overran ``call_timeout_s`` or the sandbox
        broke. Raises ``KeyError`` only for an unknown lease (a caller bug).
        """
        gates = self._started()
        held = self._lease(lease)
        key = call.name if call.name in gates and call.name != CHECK else _OTHER
        result = await self._gated(gates[key], held, run_tool, held.sandbox, call)
        if isinstance(result, Observation):
            return result
        return Observation(text=result, is_error=True, finished=False, answer=None)

    async def run_check(
        self,
        lease: str,
        command: str,
        timeout_s: float | None = None,
        files: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run the environment's own command (e.g. the task's test command) in the lease's
        sandbox under the ``"check"`` quota, after writing ``files`` (relative path -> text)
        into its working directory (the task's tests, restored as shipped). Raises
        ``RuntimeError`` naming the reason when it could not run (refused, overran, sandbox
        broken)."""
        gates = self._started()
        held = self._lease(lease)
        result = await self._gated(
            gates[CHECK], held, _restore_and_run, held.sandbox, command, timeout_s, files or {}
        )
        if isinstance(result, str):
            raise RuntimeError(f"check command did not run: {result}")
        return result

    async def _gated(self, gate: _Gate, held: _Lease, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the call pool under ``gate``; a str (the reason) when refused or
        failed, else what ``fn`` returned."""
        timeout = self.config.call_timeout_s
        if timeout is None:
            timeout = self.config.limits.wall_seconds + 10.0
        # One call at a time per sandbox (a Sandbox is not thread-safe): a call whose caller
        # stopped waiting still runs until the sandbox's wall limit ends it.
        try:
            await asyncio.wait_for(held.idle.wait(), timeout)
        except TimeoutError:
            return f"tool '{gate.key}' could not start: the sandbox's previous call still runs"
        refused = await gate.admit()
        if refused is not None:
            return (
                f"tool '{gate.key}' refused: quota exhausted ({gate.describe()}): {refused}. "
                "Try again later with fewer calls."
            )
        held.idle.clear()

        def done(_: Any) -> None:  # the slot is held until the thread really returns
            held.idle.set()
            gate.leave()

        future = asyncio.get_running_loop().run_in_executor(self._calls, fn, *args)
        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            gate.errors += 1
            held.suspect = True
            return f"tool '{gate.key}' did not return within {timeout} s; its sandbox is reset"
        except Exception as e:  # the sandbox could not run it (isolation setup failed, ...)
            gate.errors += 1
            held.suspect = True
            log.warning("tool %r failed in its sandbox: %s: %s", gate.key, type(e).__name__, e)
            return f"tool '{gate.key}' failed in the sandbox ({type(e).__name__}: {e})"

    # ---------------------------------------------------------------------------- health

    async def _healthy(self, sandbox: Sandbox) -> bool:
        self._health_checks += 1
        try:
            return bool(await self._in_thread(self._upkeep, sandbox.healthy))
        except Exception:
            return False

    async def _replace(self, sandbox: Sandbox) -> Sandbox:
        with contextlib.suppress(Exception):
            await self._in_thread(self._upkeep, sandbox.close)
        fresh = await self._in_thread(self._upkeep, self._new_sandbox)
        self._replaced += 1
        log.info("replaced a broken sandbox (%d replaced so far)", self._replaced)
        return fresh

    async def check_idle(self) -> int:
        """Check every idle sandbox now and replace the broken ones; returns how many."""
        self._started()
        assert self._idle is not None
        idle = []
        while not self._idle.empty():
            idle.append(self._idle.get_nowait())
        replaced = 0
        for sandbox in idle:
            try:
                if not await self._healthy(sandbox):
                    sandbox = await self._replace(sandbox)
                    replaced += 1
            finally:
                self._idle.put_nowait(sandbox)
        return replaced

    async def _health_loop(self) -> None:
        assert self.config.health_interval_s
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_idle()
            except Exception as e:  # a failed check must not stop later ones
                log.warning("toolbox health check failed: %s", e)

    # ----------------------------------------------------------------------------- stats

    async def stats(self) -> dict[str, Any]:
        """``{"tools": {key: {calls, refusals, errors, peak_concurrency, max_qps_observed,
        running, waiting, max_concurrency, max_qps}}, "pool": {size, idle, leased, replaced,
        health_checks, acquires}}``."""
        gates = self._started()
        assert self._idle is not None
        return {
            "tools": {k: g.stats() for k, g in sorted(gates.items())},
            "pool": {
                "size": self.config.pool_size,
                "idle": self._idle.qsize(),
                "leased": len(self._leases),
                "replaced": self._replaced,
                "health_checks": self._health_checks,
                "acquires": self._acquires,
            },
        }

    async def close(self) -> None:
        """Stop the health checks and close every sandbox (leased ones too)."""
        if self._closed:
            return
        if self._health_task is not None:
            self._health_task.cancel()
        sandboxes = [h.sandbox for h in self._leases.values()] + self._idle_sandboxes
        if self._idle is not None:
            while not self._idle.empty():
                sandboxes.append(self._idle.get_nowait())
        self._closed = True
        self._leases.clear()
        for sandbox in sandboxes:
            with contextlib.suppress(Exception):
                sandbox.close()
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._upkeep.shutdown(wait=False, cancel_futures=True)


def _restore_and_run(
    sandbox: Sandbox, command: str, timeout_s: float | None, files: Mapping[str, str]
) -> ExecResult:
    for rel, text in files.items():
        sandbox.write_text(rel, text)
    return sandbox.run(command, timeout_s)


def _spec_name(spec: Mapping[str, Any]) -> str:
    """The tool name of one ``TOOL_SPECS`` entry (OpenAI style ``{"type": "function",
    "function": {"name": ...}}`` or flat ``{"name": ...}``)."""
    inner = spec.get("function", spec)
    return str(inner["name"])


def remote_toolbox(**ray_options: Any) -> Any:
    """The Ray actor class for ``Toolbox`` (``num_cpus=...`` etc. as ray.remote options).

    Its methods are async, so Ray runs them concurrently on the actor's one event loop
    (``max_concurrency`` defaults to 1000 for async actors): the quotas count every caller.
    """
    import ray

    return ray.remote(**ray_options)(Toolbox) if ray_options else ray.remote(Toolbox)
