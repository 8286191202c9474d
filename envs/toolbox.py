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
- **off the event loop, bounded in time**: a call runs ``envs.tools.run_tool`` (a blocking
  subprocess) on a thread of its own, so the loop keeps admitting and counting while calls
  run. A call's concurrency slot is held until its thread returns, even when the caller
  stopped waiting (``call_timeout_s``): the limit counts processes that really run, not
  awaits; but never longer than the longest a call can legitimately take (the sandbox's wall
  limit + ``call_grace_s``): past it the slot is returned and the sandbox is retired at
  release. Calls in one sandbox run one at a time (a later one waits for an overrunning one,
  which the sandbox's wall limit ends).
- **host-side upkeep, bounded in time**: every other operation on a sandbox (reset to the
  task's files, health check, close, building a new one) runs on a thread of its own for at
  most ``upkeep_timeout_s``. Nothing the model leaves in a sandbox (FIFOs, deep trees, floods
  of files) can make ``acquire``, ``release`` or ``close`` wait longer than that: a sandbox
  whose operation overran or raised is **retired** (closed on a background thread; logged)
  and a fresh one takes its place, so the pool stays full. A thread that never returns (a
  host call blocked in the kernel) holds nothing but itself: no pool worker, no slot, no
  exit of the interpreter. ``stats()["pool"]`` counts ``replaced`` sandboxes, ``missing``
  ones (a fresh one could not be built yet: retried at every release and health check) and
  ``unclosed`` ones (their close failed: named in the log).
- **health**: a sandbox whose call failed, or that fails ``Sandbox.healthy()`` (a trivial
  command in it), is retired and replaced when its lease is released; idle sandboxes are
  checked every ``health_interval_s``.

``check`` (``run_check``) is not a model tool: it is the environment's own command (the
code-repair test run that decides the reward), with its own quota key ``"check"``. The files
it restores first (the task's tests, as shipped) are put in place by the sandbox itself:
whatever the model left at their paths (a FIFO, a directory, a symlink) is removed without
being opened, so no restore can block the check or hold its slot.

``stats()`` reports per quota key: calls, refusals, errors, peak concurrency, the largest
number of call starts seen in any 1 s window (``max_qps_observed``), running and waiting now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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
    """How long a caller waits for one call (default: the sandbox wall limit +
    ``call_grace_s``); past it the call's observation says so and its sandbox is checked at
    release."""
    call_grace_s: float = 10.0
    """What a call may take beyond the sandbox's wall limit (isolation setup, teardown)
    before the Toolbox stops counting it as running: its concurrency slot is returned and
    its sandbox retired at release."""
    upkeep_timeout_s: float = 60.0
    """The longest one host-side operation on a sandbox (reset, health check, close, building
    one) may take; past it the sandbox is retired and replaced."""
    health_interval_s: float | None = 60.0
    """Period of the health check of idle sandboxes (None: only at release)."""
    base_dir: str | None = None
    """Where sandboxes keep their files (default: the system temporary directory)."""

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"ToolboxConfig.pool_size={self.pool_size} must be >= 1")
        for name in ("acquire_timeout_s", "upkeep_timeout_s", "call_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ToolboxConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.call_timeout_s is not None and not self.call_timeout_s > 0:
            raise ValueError("ToolboxConfig.call_timeout_s must be > 0 (or None: the default)")
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
    busy_until: float = 0.0  # monotonic time by which the running call must have returned

    def __post_init__(self) -> None:
        self.idle.set()


class _Overran(Exception):
    """A host-side operation on a sandbox did not return within its bound."""


def _in_thread(fn: Any, *args: Any) -> asyncio.Future:
    """``fn(*args)`` on a new daemon thread; the future of its outcome, on the running loop.

    Not a pool worker: a thread that never returns (a host call blocked in the kernel) holds
    only itself, never a worker later calls need, and does not keep the interpreter from
    exiting. Cancelling the future stops nothing (threads cannot be stopped); it only stops
    waiting.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as e:  # handed to the loop, which decides
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    name = f"toolbox-{getattr(fn, '__name__', 'op')}"
    threading.Thread(target=target, name=name, daemon=True).start()
    return future


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
        self._idle_sandboxes: list[Sandbox] = [
            self._new_sandbox() for _ in range(self.config.pool_size)
        ]
        self._leases: dict[str, _Lease] = {}
        self._gates: dict[str, _Gate] | None = None
        self._idle: asyncio.Queue[Sandbox] | None = None
        self._health_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # retirements and releases in progress
        self._unclosed: list[Sandbox] = []  # retired sandboxes whose close failed
        self._replaced = self._health_checks = self._acquires = self._missing = 0
        self._checking = 0  # idle sandboxes out of the queue for a health check
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

    async def _upkeep(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on its own thread, waited for at most ``upkeep_timeout_s``.

        Raises ``_Overran`` past the bound (the thread goes on; the caller retires the
        sandbox), else returns or raises what ``fn`` did.
        """
        limit = self.config.upkeep_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(_in_thread(fn, *args)), limit)
        except TimeoutError:
            raise _Overran(f"{what} did not return within upkeep_timeout_s={limit:g} s") from None

    def _background_task(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---------------------------------------------------------------------------- leases

    async def acquire(self, files_from: str | Path | None = None) -> str:
        """Lease a sandbox whose working directory is a fresh copy of ``files_from`` (a
        directory on the Toolbox's host; None: empty). Returns the lease id.

        Raises:
            ToolboxBusy: no sandbox came free within ``acquire_timeout_s``.
            ValueError: ``files_from`` is not a directory.
            RuntimeError: not even a fresh sandbox could be reset to ``files_from``.
        """
        self._started()
        assert self._idle is not None
        src = None if files_from is None else Path(files_from)
        if src is not None and not src.is_dir():
            raise ValueError(f"files_from={src} is not a directory")
        await self._refill()
        try:
            sandbox = await asyncio.wait_for(self._idle.get(), self.config.acquire_timeout_s)
        except TimeoutError:
            raise ToolboxBusy(
                f"no sandbox came free within {self.config.acquire_timeout_s} s: all "
                f"{self.config.pool_size} are leased; raise ToolboxConfig.pool_size or "
                "acquire_timeout_s, or run fewer rollouts at once"
            ) from None
        # A caller that stops waiting (cancelled) does not lose the sandbox: the reset goes
        # on, and what it leaves goes back to the pool.
        preparing = self._background_task(self._prepare(sandbox, src))
        try:
            sandbox = await asyncio.shield(preparing)
        except asyncio.CancelledError:
            preparing.add_done_callback(self._return_prepared)
            raise
        if self._closed:  # closed while the reset ran
            self._shelve(sandbox)
            raise RuntimeError("the Toolbox is closed")
        lease = uuid.uuid4().hex
        self._leases[lease] = _Lease(sandbox, time.monotonic())
        self._acquires += 1
        return lease

    async def _prepare(self, sandbox: Sandbox, src: Path | None) -> Sandbox:
        """``sandbox`` reset to ``src``; a broken one is replaced and the fresh one tried."""
        assert self._idle is not None
        for attempt in range(2):
            try:
                await self._upkeep("reset", sandbox.reset, src)
                return sandbox
            except Exception as e:
                fresh = await self._replace(sandbox, f"its reset failed ({_describe(e)})")
                if fresh is None or attempt == 1:
                    if fresh is not None:
                        self._shelve(fresh)
                    raise RuntimeError(
                        f"no sandbox could be reset to {src}: {_describe(e)}"
                    ) from None
                sandbox = fresh
        raise AssertionError("unreachable")

    def _return_prepared(self, preparing: asyncio.Task) -> None:
        if not preparing.cancelled() and preparing.exception() is None:
            self._shelve(preparing.result())

    def _shelve(self, sandbox: Sandbox | None) -> None:
        """Back to the idle pool; closed instead once the Toolbox is."""
        if sandbox is None:
            return
        if self._closed or self._idle is None:
            self._background_task(self._retire(sandbox))
        else:
            self._idle.put_nowait(sandbox)

    def _lease(self, lease: str) -> _Lease:
        try:
            return self._leases[lease]
        except KeyError:
            raise KeyError(
                f"unknown or released lease {lease!r}; acquire() a sandbox before calling tools"
            ) from None

    async def release(self, lease: str) -> None:
        """Hand the lease's sandbox back to the pool: checked, and replaced if broken or if a
        call in it is still running past its bound.

        Bounded in time (the running call's bound, then ``upkeep_timeout_s`` twice at most);
        a caller that stops waiting does not stop the recycling.
        """
        self._started()
        held = self._leases.pop(lease, None)
        if held is None:
            return
        await asyncio.shield(self._background_task(self._recycle(held)))

    async def _recycle(self, held: _Lease) -> None:
        assert self._idle is not None
        sandbox = held.sandbox
        if not held.idle.is_set():  # a call that overran still runs (until its wall limit)
            with contextlib.suppress(TimeoutError):
                wait = max(0.0, held.busy_until - time.monotonic())
                await asyncio.wait_for(held.idle.wait(), wait)
        if not held.idle.is_set():
            why = "a call in it did not return within its bound"
        elif held.suspect:
            why = "a call in it failed or overran"
        elif not await self._healthy(sandbox):
            why = "it failed its health check"
        else:
            self._shelve(sandbox)
            return
        self._shelve(await self._replace(sandbox, why))

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
        """Run the environment's own command (e.g. the task's test run) in the lease's
        sandbox under the ``"check"`` quota, after restoring ``files`` (relative path ->
        text) in its working directory: whatever is at each path (a file, a FIFO, a
        directory, a symlink), and any non-directory on the way to it, is removed without
        being opened, and the text is written there. The restore is part of the sandboxed
        command, so ``timeout_s`` bounds both.

        Raises ``RuntimeError`` naming the reason when it could not run (refused, overran,
        sandbox broken), ``ValueError`` for a path that is not a plain relative one.
        """
        gates = self._started()
        held = self._lease(lease)
        files = {_relative(rel): text for rel, text in (files or {}).items()}
        result = await self._gated(
            gates[CHECK], held, _restore_and_run, held.sandbox, command, timeout_s, files
        )
        if isinstance(result, str):
            raise RuntimeError(f"check command did not run: {result}")
        return result

    async def _gated(self, gate: _Gate, held: _Lease, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on its own thread under ``gate``; a str (the reason) when refused or
        failed, else what ``fn`` returned."""
        bound = self.config.limits.wall_seconds + self.config.call_grace_s
        timeout = self.config.call_timeout_s
        if timeout is None:
            timeout = bound
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
        held.busy_until = time.monotonic() + max(timeout, bound)
        loop = asyncio.get_running_loop()
        left = counted = False

        def leave() -> None:  # the slot goes back exactly once: thread returned or bound hit
            nonlocal left
            if not left:
                left = True
                gate.leave()

        def failed() -> None:  # one error per call, however many ways it failed
            nonlocal counted
            held.suspect = True
            if not counted:
                counted = True
                gate.errors += 1

        def overran() -> None:
            if not future.done():
                failed()
                log.warning(
                    "tool %r still runs %g s after it started (a host-side call that blocks?): "
                    "its slot is returned and its sandbox is retired at release",
                    gate.key, max(timeout, bound),
                )  # fmt: skip
                leave()

        watchdog = loop.call_later(max(timeout, bound), overran)

        def done(_: Any) -> None:  # the slot is held until the thread really returns
            watchdog.cancel()
            held.idle.set()
            leave()

        future = _in_thread(fn, *args)
        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            failed()
            return (
                f"tool '{gate.key}' did not return within {timeout:g} s and its result is "
                "lost; later calls wait until it has stopped, and the sandbox is checked "
                "(replaced if broken) when the trajectory ends"
            )
        except Exception as e:  # the sandbox could not run it (isolation setup failed, ...)
            failed()
            log.warning("tool %r failed in its sandbox: %s", gate.key, _describe(e))
            return f"tool '{gate.key}' failed in the sandbox ({_describe(e)})"

    # ---------------------------------------------------------------------------- health

    async def _healthy(self, sandbox: Sandbox) -> bool:
        self._health_checks += 1
        try:
            return bool(await self._upkeep("health check", sandbox.healthy))
        except Exception as e:
            log.warning("sandbox health check failed: %s", _describe(e))
            return False

    async def _replace(self, sandbox: Sandbox, why: str) -> Sandbox | None:
        """Retire ``sandbox`` (closed in the background) and build a fresh one; None (and
        one more ``missing``, built later by ``_refill``) when that fails too."""
        log.warning("retiring sandbox %s: %s", sandbox.workdir.parent, why)
        self._background_task(self._retire(sandbox))
        self._replaced += 1
        if self._closed:
            return None
        try:
            return await self._build()
        except Exception as e:
            self._missing += 1
            log.error("could not build a sandbox to replace a retired one: %s", _describe(e))
            return None

    async def _build(self) -> Sandbox:
        """A new sandbox, built on its own thread within ``upkeep_timeout_s``; one that is
        built after its caller stopped waiting is closed, not leaked."""
        building = _in_thread(self._new_sandbox)
        try:
            return await asyncio.wait_for(asyncio.shield(building), self.config.upkeep_timeout_s)
        except BaseException as e:
            building.add_done_callback(_close_orphan)
            if isinstance(e, TimeoutError):
                limit = self.config.upkeep_timeout_s
                raise _Overran(
                    f"building a sandbox took over upkeep_timeout_s={limit:g} s"
                ) from None
            raise

    async def _retire(self, sandbox: Sandbox) -> None:
        """Close a sandbox that is out of the pool; a close that raises or overruns is
        logged and counted (``unclosed``), never waited for longer than the bound."""
        try:
            await self._upkeep("close", sandbox.close)
        except Exception as e:
            self._unclosed.append(sandbox)
            log.error(
                "sandbox %s could not be closed (%s); its files may stay on disk",
                sandbox.workdir.parent, _describe(e),
            )  # fmt: skip

    async def _refill(self) -> None:
        """Build the sandboxes that could not be built when theirs were retired."""
        assert self._idle is not None
        while self._missing > 0 and not self._closed:
            try:
                sandbox = await self._build()
            except Exception as e:
                log.error("the pool is %d sandboxes short: %s", self._missing, _describe(e))
                return
            self._missing -= 1
            self._shelve(sandbox)

    async def check_idle(self) -> int:
        """Check every idle sandbox now, one at a time (the others stay available), and
        replace the broken ones; returns how many."""
        self._started()
        assert self._idle is not None
        replaced = 0
        for _ in range(self._idle.qsize()):
            if self._idle.empty():
                break
            sandbox = self._idle.get_nowait()
            self._checking += 1
            try:
                healthy = await self._healthy(sandbox)
            except BaseException:  # cancelled mid-check: it goes back unchecked
                self._shelve(sandbox)
                raise
            finally:
                self._checking -= 1
            if healthy:
                self._shelve(sandbox)
                continue
            replaced += 1
            self._shelve(await self._replace(sandbox, "it failed its health check while idle"))
        await self._refill()
        return replaced

    async def _health_loop(self) -> None:
        assert self.config.health_interval_s
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_idle()
            except Exception as e:  # a failed check must not stop later ones
                log.warning("toolbox health check failed: %s", _describe(e))

    # ----------------------------------------------------------------------------- stats

    async def stats(self) -> dict[str, Any]:
        """``{"tools": {key: {calls, refusals, errors, peak_concurrency, max_qps_observed,
        running, waiting, max_concurrency, max_qps}}, "pool": {size, idle, leased, replaced,
        missing, unclosed, health_checks, acquires}}``; ``idle`` counts the idle sandboxes
        whose health is being checked too."""
        gates = self._started()
        assert self._idle is not None
        return {
            "tools": {k: g.stats() for k, g in sorted(gates.items())},
            "pool": {
                "size": self.config.pool_size,
                "idle": self._idle.qsize() + self._checking,
                "leased": len(self._leases),
                "replaced": self._replaced,
                "missing": self._missing,
                "unclosed": len(self._unclosed),
                "health_checks": self._health_checks,
                "acquires": self._acquires,
            },
        }

    async def close(self) -> None:
        """Stop the health checks and close every sandbox (leased ones too, and those being
        retired), each close on its own thread; waits at most ``upkeep_timeout_s`` for
        them, and a close that fails or overruns is logged (``unclosed``)."""
        if self._closed:
            return
        self._closed = True  # from here on, a sandbox handed back is closed, not pooled
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.wait([self._health_task])  # it hands back what it was checking
        # leased, idle, and retired ones whose close failed (tried again)
        sandboxes = [h.sandbox for h in self._leases.values()] + self._idle_sandboxes
        while self._idle is not None and not self._idle.empty():
            sandboxes.append(self._idle.get_nowait())
        sandboxes += self._unclosed
        self._leases.clear()
        self._idle_sandboxes, self._unclosed = [], []
        closes = [_in_thread(s.close) for s in sandboxes]
        deadline = time.monotonic() + self.config.upkeep_timeout_s
        # releases, resets and retirements under way (those finishing now retire theirs)
        while self._background and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._background), timeout=left)
        if closes:
            await asyncio.wait(closes, timeout=max(0.0, deadline - time.monotonic()))
        for sandbox, closing in zip(sandboxes, closes, strict=True):
            error = closing.exception() if closing.done() else _Overran("close overran")
            if error is not None:
                self._unclosed.append(sandbox)
                log.error(
                    "sandbox %s could not be closed (%s); its files may stay on disk",
                    sandbox.workdir.parent, _describe(error),
                )  # fmt: skip


def _close_orphan(building: asyncio.Future) -> None:
    if not building.cancelled() and building.exception() is None:
        threading.Thread(target=building.result().close, daemon=True).start()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _relative(rel: str) -> str:
    """``rel`` as a plain relative path (no ``..``, no ``.``, not absolute), else ValueError."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(p in ("..", ".") for p in path.parts):
        raise ValueError(
            f"restore path {rel!r} must be a plain path relative to the working directory"
        )
    return str(path)


_RESTORE = r"""_mopd_restore() {
  local staged=$1 target=$2 dir p= part
  local -a parts=()
  dir=$(dirname -- "$target")
  [ "$dir" = . ] || IFS=/ read -ra parts <<< "$dir"
  for part in "${parts[@]}"; do
    p=${p:+$p/}$part
    if [ -L "$p" ] || { [ -e "$p" ] && [ ! -d "$p" ]; }; then rm -f -- "$p" || return; fi
    [ -d "$p" ] || mkdir -- "$p" || return
    chmod u+rwx -- "$p" || return
  done
  if [ -d "$target" ] && [ ! -L "$target" ]; then chmod -R u+rwX -- "$target" 2>/dev/null; fi
  rm -rf -- "$target" && mv -fT -- "$staged" "$target"
}
"""
"""Run inside the sandbox (as its uid) by ``_restore_and_run``: puts a staged file in place
of whatever is at the target path, and makes every component of the path a directory.
Nothing is opened: FIFOs, symlinks and devices are unlinked, directories (however deep,
whatever their modes) removed."""


def _restore_and_run(
    sandbox: Sandbox, command: str, timeout_s: float | None, files: Mapping[str, str]
) -> ExecResult:
    """Stage ``files`` host-side under a new, unguessable directory (nothing the sandbox
    made is at those paths, so nothing there can block), then, in one sandboxed command,
    move them into place (``_RESTORE``) and run ``command``."""
    if not files:
        return sandbox.run(command, timeout_s)
    stage = f".mopd-restore-{uuid.uuid4().hex}"
    moves = []
    for i, (rel, text) in enumerate(files.items()):
        sandbox.write_text(f"{stage}/{i}", text)
        moves.append(f"_mopd_restore {shlex.quote(f'{stage}/{i}')} {shlex.quote(rel)}")
    script = (
        f"{_RESTORE}{' && '.join(moves)} || "
        "{ echo 'mopd: the protected files could not be restored' >&2; exit 97; }\n"
        f"rm -rf -- {shlex.quote(stage)}\n{command}"
    )
    return sandbox.run(script, timeout_s)


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
