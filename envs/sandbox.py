"""Sandboxes that run model-written shell commands with no network and nothing of the host writable.

A ``Sandbox`` owns a working directory (a copy of a task's files) and runs ``bash -c COMMAND``
in it, one call at a time, for the tools of ``envs.tools`` (the ``Toolbox`` keeps a pool of
them). Every call gets fresh isolation, built from what Linux gives and nothing installed:

- **namespaces** (``unshare`` of util-linux): a new mount, pid, network, IPC and UTS namespace.
  The network namespace is empty (only a loopback that is down), so no connection leaves it.
- **a fresh root**: a skeleton directory prepared once per sandbox, with read-only, ``nosuid``
  bind mounts of only what bash, coreutils and Python need (``/usr``, the running Python's
  prefix found from ``sys.base_prefix``/``sys.prefix``, ``ld.so.cache``, a few device nodes),
  the working directory read-write at ``/workspace``, a private size-limited ``/tmp`` and
  ``/dev/shm``, and ``/proc`` of the new pid namespace; then ``chroot``. Nothing else of the
  host (``/root``, ``/home``, ``/etc/shadow``, other sandboxes) exists inside.
- **a dedicated unprivileged uid** per sandbox (``setpriv``: no capabilities, empty bounding
  set, ``no_new_privs``), so files of the host are protected by ordinary permissions even where
  a mount would expose them, and ``RLIMIT_NPROC`` holds (the kernel does not enforce it for
  uid 0, so a fork bomb is only contained for a non-root uid).
- **rlimits** (``prlimit``): CPU seconds, address space, processes, file size, open files,
  no core dumps; and **cgroups** (v1 ``pids`` and ``memory``, under the caller's own cgroup)
  where the host lets us create them: a pid cap and a memory cap on the sandbox as a whole.
- **wall clock**: the host kills the pid namespace's init at ``wall_seconds`` (every process of
  the call dies with it), and a ``timeout`` inside kills it a little later even if the host
  process died; no process outlives its call.
- **output**: stdout and stderr share one pipe; the host keeps at most ``max_output_bytes`` and
  kills the call when more arrives, so printing gigabytes costs neither memory nor disk.

Fail closed: ``check_isolation()`` runs a probe once per process (namespaces, the uid drop,
an empty network, an unreadable host) and raises ``SandboxUnavailable`` with the reason and the
fix; ``Sandbox`` calls it before doing anything, and there is no unconfined fallback.
Sandboxes need root (in a container: root with ``CAP_SYS_ADMIN``, see docs/security.md);
a non-root process is refused, because without a uid to drop to, process limits would count
the caller's own processes and host files owned by the caller would be writable.

Only the working directory persists between calls; ``/tmp`` and every process are fresh per
call. Everything the host does inside it treats its contents as hostile (no sandbox process
runs while it does):

- ``read_text``/``write_text`` confine paths to the working directory (symlinks the sandbox
  planted are resolved before the check), open with ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY``,
  refuse anything but a regular file (a FIFO, socket, device or directory) with
  ``SandboxFileError`` before reading or writing a byte, and read or write at most
  ``max_file_bytes``: a planted FIFO cannot block the host.
- the disk limit counts every entry (directories, empty files, symlinks, hard links) by its
  blocks and against ``max_inodes``, measured after every call whatever ended it; a working
  directory over either limit is emptied at once, so nothing of it stays on the host.
- every walk (measuring, emptying, removing) is iterative and moves one directory fd down
  and up the tree, so a tree deeper than ``PATH_MAX`` or the recursion limit is measured
  and removed like any other, and ``close()`` always removes the sandbox's directory and
  releases its uid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SANDBOX_WORKDIR",
    "DiskUsage",
    "ExecResult",
    "Sandbox",
    "SandboxFileError",
    "SandboxLimits",
    "SandboxUnavailable",
    "check_isolation",
]

log = logging.getLogger(__name__)

SANDBOX_WORKDIR = "/workspace"
"""Where the working directory appears inside the sandbox (the cwd of every command)."""

_UID_BASE = 1_800_000_000  # far above real users and the usual subuid ranges (100000+)
_UID_SLOTS = 4096
_SETUP_FAILED = 125
_SETUP_MARKER = "mopd-sandbox: setup failed"
_DEVICES = ("null", "zero", "full", "random", "urandom")
_TOOLS = ("unshare", "mount", "timeout", "prlimit", "setpriv", "bash", "sh")


class SandboxUnavailable(RuntimeError):
    """Isolation cannot be set up here; the message names why and how to fix it."""


class SandboxFileError(ValueError):
    """A host-side read or write of the working directory refused a path: outside the working
    directory, not a regular file (a FIFO, socket, device, directory), too large, or not
    openable. The message names the path and why; callers turn it into a tool observation
    (a ``ValueError``, as path refusals always were)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits of a sandbox (the ``Toolbox`` config fills them; ``Sandbox`` enforces them).

    ``memory_bytes`` caps each process's address space (RLIMIT_AS) and, with the memory
    cgroup, the resident memory of the whole call. ``max_processes`` counts processes and
    threads of the sandbox's uid. ``max_disk_bytes`` is the size of the private ``/tmp`` and
    the most the working directory may hold after a call: the allocated blocks of every
    entry, directories and symlinks included. ``max_inodes`` is the most entries (files,
    directories, symlinks, hard links) it may hold. Both are checked after every call; a
    working directory over either is emptied, the call reports ``limit_hit="disk"`` and the
    sandbox is unhealthy until reset. ``max_file_bytes`` also bounds what the host-side
    ``read_text``/``write_text`` read or write.
    """

    cpu_seconds: float = 30.0
    wall_seconds: float = 60.0
    memory_bytes: int = 1 << 30
    max_processes: int = 64
    max_output_bytes: int = 65536
    max_file_bytes: int = 64 << 20
    max_disk_bytes: int = 512 << 20
    max_inodes: int = 65536

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"SandboxLimits.{name} must be a number, got {type(value).__name__} {value!r}"
                )
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")
            if name not in ("cpu_seconds", "wall_seconds") and not isinstance(value, int):
                raise ValueError(f"SandboxLimits.{name} must be an integer, got {value!r}")
        if self.memory_bytes < 64 << 20:
            raise ValueError(
                f"SandboxLimits.memory_bytes={self.memory_bytes} is too small for bash and "
                "python to start; use at least 64 MiB"
            )
        if self.max_processes < 4:
            raise ValueError("SandboxLimits.max_processes must be >= 4 (bash needs a few)")


@dataclass(frozen=True)
class ExecResult:
    """What one ``Sandbox.run`` produced; ``envs.tools`` turns it into an observation.

    ``exit_code`` is the command's status (128 + N when a signal N ended it, as bash
    reports), None when the host killed the call (wall time, output size). ``output`` is
    stdout and stderr interleaved, decoded as UTF-8 (invalid bytes replaced), at most
    ``max_output_bytes`` long. ``limit_hit`` names the first limit the call ran into:
    ``"wall_time"``, ``"output"``, ``"cpu_time"``, ``"memory"``, ``"processes"``,
    ``"file_size"`` or ``"disk"``; None when none did. ``"disk"`` wins over the others: the
    working directory was over ``max_disk_bytes`` or ``max_inodes`` after the call and has
    been emptied (``Sandbox.last_disk_usage`` holds the figures).
    """

    exit_code: int | None
    output: str
    truncated: bool
    timed_out: bool
    limit_hit: str | None
    wall_s: float


@dataclass(frozen=True)
class DiskUsage:
    """What the working directory holds: ``bytes`` allocated (``st_blocks * 512`` of every
    entry, directories and the working directory itself included, each inode once) and
    ``inodes`` (every entry below it; a hard link counts as one more). ``complete`` is False
    when the walk stopped early because a limit was already exceeded (the figures are then
    lower bounds, each already over its limit or on the way there)."""

    bytes: int
    inodes: int
    complete: bool


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SandboxUnavailable(
            f"sandbox needs the '{name}' command but it is not on PATH; install util-linux and "
            "coreutils (Debian/Ubuntu: apt-get install util-linux coreutils bash)"
        )
    return path


def _tools() -> dict[str, str]:
    """Absolute paths of the host tools the sandbox chain uses (resolved on every call to
    ``check_isolation`` so that PATH decides, as for any command)."""
    tools = {name: _which(name) for name in _TOOLS}
    for name in ("prlimit", "setpriv", "bash"):  # these run inside the new root: must be in /usr
        real = os.path.realpath(tools[name])
        if not real.startswith("/usr/"):
            raise SandboxUnavailable(
                f"'{name}' resolves to {real}, outside /usr, so it would not exist inside the "
                "sandbox root; install it from the system packages (util-linux / bash)"
            )
        tools[name] = real
    return tools


def _python_prefixes() -> list[str]:
    """The running interpreter's prefixes (a venv and its base), outermost first, minus any
    already under /usr (mounted anyway)."""
    out: list[str] = []
    for prefix in sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}):
        if prefix == "/" or prefix.startswith("/usr/") or prefix == "/usr":
            continue
        if any(prefix.startswith(p + "/") for p in out):
            continue
        out.append(prefix)
    return out


def _fstab_escape(path: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup directory for a v1 controller, or None without one."""
    mount = Path("/sys/fs/cgroup") / controller
    if not mount.is_dir():
        return None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return mount / path.lstrip("/")
    return None


@dataclass(frozen=True)
class _Uid:
    """A per-sandbox uid, held by an flock on a lock file for the sandbox's lifetime (so
    sandboxes of different processes on one host never share a uid)."""

    uid: int
    lock_fd: int


def _lock_dir() -> Path:
    for candidate in (Path("/run/mopd-sandbox"), Path(tempfile.gettempdir()) / "mopd-sandbox"):
        with contextlib.suppress(OSError):
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
    raise SandboxUnavailable("no writable directory for sandbox uid locks (/run or $TMPDIR)")


def _acquire_uid() -> _Uid:
    lock_dir = _lock_dir()
    for slot in range(_UID_SLOTS):
        fd = os.open(lock_dir / f"uid-{slot}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        uid = _UID_BASE + slot
        _kill_uid(uid)  # a previous owner may have died mid-call
        return _Uid(uid, fd)
    raise SandboxUnavailable(f"all {_UID_SLOTS} sandbox uids are in use on this host")


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == uid:
                pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int) -> None:
    for pid in _pids_of_uid(uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _rmdir_cgroup(path: Path) -> None:
    """Remove a cgroup; its last processes may take a moment to be reaped after SIGKILL."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.01)
    path.rmdir()


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symbolic link",
}


def _refuse_unless_regular(mode: int, shown: str) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise SandboxFileError(
            f"{shown!r} is {kind}, not a regular file; only regular files can be read or "
            "written by this tool (remove or rename it with bash first)"
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ------------------------------------------------------------------- walks of hostile trees
#
# The working directory's contents are the sandbox's: any depth (deeper than PATH_MAX and the
# recursion limit), any number of entries, any file type. Every walk below is iterative and
# holds one directory fd, moved down by name (O_NOFOLLOW: never through a symlink) and up by
# "..", checked against the (st_dev, st_ino) it came from; no path longer than one name is
# ever built. No sandbox process runs while they do, so the tree does not change under them.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_BATCH = 4096  # entries listed at once while emptying a directory (bounds the host's memory)


class _Cursor:
    """One open directory of a walk; ``down``/``up`` move it one level."""

    def __init__(self, top: str | os.PathLike[str]) -> None:
        self.fd = os.open(top, _DIR_FLAGS)
        self._trail: list[tuple[str, tuple[int, int]]] = []  # (name, parent's dev and inode)

    def down(self, name: str) -> None:
        parent = os.fstat(self.fd)
        child = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = child
        self._trail.append((name, (parent.st_dev, parent.st_ino)))

    def up(self) -> str:
        """Back to the parent; returns the name of the directory just left."""
        name, parent_id = self._trail.pop()
        parent = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = parent
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != parent_id:
            raise OSError(errno.ESTALE, f"directory {name!r} moved during a walk of the sandbox")
        return name

    def close(self) -> None:
        os.close(self.fd)


class _Over(Exception):
    """A measuring walk passed a limit: the rest need not be counted."""


def _visit(cursor: _Cursor, scan: Callable[[], list[str]]) -> None:
    """Every directory from the cursor's down, depth-first without recursion: ``scan`` does its
    work in the cursor's directory and returns that directory's subdirectories."""
    levels = [scan()]  # per depth, the subdirectories still to visit
    while levels:
        if levels[-1]:
            cursor.down(levels[-1].pop())
            levels.append(scan())
        else:
            levels.pop()
            if levels:
                cursor.up()


def _measure(top: Path, max_bytes: int, max_inodes: int) -> DiskUsage:
    """What ``top`` holds (see ``DiskUsage``); stops as soon as either limit is exceeded, so a
    flood of entries costs the host at most ``max_inodes`` stat calls."""
    cursor = _Cursor(top)
    total = os.fstat(cursor.fd).st_blocks * 512
    inodes = 0
    linked: set[tuple[int, int]] = set()

    def scan() -> list[str]:
        nonlocal total, inodes
        subdirs = []
        with os.scandir(cursor.fd) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                inodes += 1
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key not in linked:
                        linked.add(key)
                        total += st.st_blocks * 512
                else:
                    total += st.st_blocks * 512
                if total > max_bytes or inodes > max_inodes:
                    raise _Over
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
        return subdirs

    try:
        _visit(cursor, scan)
    except _Over:
        return DiskUsage(bytes=total, inodes=inodes, complete=False)
    finally:
        cursor.close()
    return DiskUsage(bytes=total, inodes=inodes, complete=True)


def _unlink_batch(dir_fd: int) -> list[str] | None:
    """Unlink up to ``_BATCH`` non-directories of a directory; the subdirectories among the
    entries listed, or None when it was empty."""
    subdirs: list[str] = []
    listed = 0
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            listed += 1
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=dir_fd)
            if listed >= _BATCH:
                break
    return subdirs if listed else None


def _empty_tree(top: Path) -> None:
    """Remove everything below ``top`` (which stays), depth-first without recursion; each
    directory is emptied in batches, so memory is bounded by the depth and ``_BATCH``."""
    cursor = _Cursor(top)
    try:
        levels: list[list[str]] = [[]]  # per depth, subdirectories of the current batch
        while levels:
            if levels[-1]:
                cursor.down(levels[-1].pop())
                levels.append([])
                continue
            batch = _unlink_batch(cursor.fd)
            if batch is not None:
                levels[-1] = batch
                continue
            levels.pop()  # this directory is empty now
            if levels:
                os.rmdir(cursor.up(), dir_fd=cursor.fd)
    finally:
        cursor.close()


def _chown_tree(top: Path, uid: int) -> None:
    """``lchown`` every entry below ``top`` (and ``top``) to ``uid``, without recursion."""
    os.chown(top, uid, uid, follow_symlinks=False)
    cursor = _Cursor(top)

    def scan() -> list[str]:
        subdirs = []
        with os.scandir(cursor.fd) as entries:
            for entry in entries:
                os.chown(entry.name, uid, uid, dir_fd=cursor.fd, follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
        return subdirs

    try:
        _visit(cursor, scan)
    finally:
        cursor.close()


def _remove_dir(path: Path) -> None:
    """Remove ``path`` and everything below it; falls back to ``rm -rf`` (bounded in time) if
    the walk fails, and raises ``OSError`` naming what is left if that fails too."""
    try:
        _empty_tree(path)
        os.rmdir(path)
        return
    except Exception as exc:  # whatever it was, rm -rf gets its turn
        error = exc
    if not os.path.lexists(path):
        return
    log.warning("removing %s failed (%s: %s); trying rm -rf", path, type(error).__name__, error)
    rm = shutil.which("rm") or "/bin/rm"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [rm, "-rf", "--one-file-system", "--", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    if os.path.lexists(path):
        raise OSError(errno.ENOTEMPTY, f"could not remove it ({error})", str(path))


class Sandbox:
    """One isolated working directory; see the module docstring for what isolation means.

    ``files_from`` (a directory) is copied into the working directory; None starts empty.
    The sandbox's files (working directory, root skeleton, fstab) live in a new directory
    under ``base_dir`` (default ``$TMPDIR``), removed by ``close``. Not thread-safe: one call
    at a time per sandbox (different sandboxes may run concurrently).
    """

    def __init__(
        self,
        files_from: Path | None = None,
        limits: SandboxLimits = SandboxLimits(),
        base_dir: Path | None = None,
        *,
        _tools_checked: dict[str, str] | None = None,
    ) -> None:
        self.limits = limits
        self._closed = True  # until the uid is held: close() has nothing to undo
        # _tools_checked: only the isolation probe itself passes it (it cannot call itself)
        self._tools = check_isolation() if _tools_checked is None else _tools_checked
        self._closed = False
        self._setup_broken = False
        self._cgroups: dict[str, Path] = {}
        self._disk_over = False
        self.last_disk_usage: DiskUsage | None = None
        """What the working directory held after the last call (or the one that went over
        the disk limit, until ``reset``)."""
        self._uid = _acquire_uid()
        try:
            parent = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._base = Path(tempfile.mkdtemp(prefix=f"mopd-sandbox-{self.uid}-", dir=parent))
            self.workdir = self._base / "workspace"
            self._root = self._base / "root"
            self._fstab = self._base / "fstab"
            self.workdir.mkdir(mode=0o755)
            os.chown(self.workdir, self.uid, self.uid)
            self._build_root()
            self._make_cgroups()
            self.reset(files_from)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------- setup

    @property
    def uid(self) -> int:
        """The host uid every process of this sandbox runs as."""
        return self._uid.uid

    def _build_root(self) -> None:
        """The skeleton of the new root (root-owned, read-only for the sandbox uid) and the
        fstab that mounts into it; built once, mounted in a private namespace per call."""
        root = self._root
        root.mkdir(mode=0o755)
        entries: list[tuple[str, str, str, str]] = []

        def bind(src: str, rel: str, opts: str = "bind,ro,nosuid,nodev") -> None:
            entries.append((src, str(root / rel.lstrip("/")), "none", opts))

        for name in ("usr", "etc", "dev", "dev/shm", "proc", "tmp", SANDBOX_WORKDIR.lstrip("/")):
            (root / name).mkdir(mode=0o755, exist_ok=True)
        bind("/usr", "usr")
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            if host.is_symlink():
                (root / top).symlink_to(os.readlink(host))
            elif host.is_dir():
                (root / top).mkdir(mode=0o755)
                bind(str(host), top)
        for prefix in _python_prefixes():
            (root / prefix.lstrip("/")).mkdir(mode=0o755, parents=True)
            bind(prefix, prefix)
        etc = root / "etc"
        (etc / "passwd").write_text(
            f"root:x:0:0:root:/:/usr/sbin/nologin\nsandbox:x:{self.uid}:{self.uid}:sandbox:"
            f"{SANDBOX_WORKDIR}:/bin/bash\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n"
        )
        (etc / "group").write_text(f"root:x:0:\nsandbox:x:{self.uid}:\nnogroup:x:65534:\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        (etc / "hostname").write_text("sandbox\n")
        (etc / "resolv.conf").write_text("")
        for name in ("ld.so.cache", "nsswitch.conf", "localtime"):
            host = Path("/etc") / name
            if host.is_file():
                (etc / name).touch()
                bind(str(host.resolve()), f"etc/{name}")
        if Path("/etc/alternatives").is_dir():  # symlink farm for awk, editors, ...
            (etc / "alternatives").mkdir()
            bind("/etc/alternatives", "etc/alternatives")
        for dev in _DEVICES:
            (root / "dev" / dev).touch()
            bind(f"/dev/{dev}", f"dev/{dev}", "bind,nosuid,noexec")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
            (root / "dev" / name).symlink_to(target)
        (root / "dev/stdout").symlink_to("/proc/self/fd/1")
        (root / "dev/stderr").symlink_to("/proc/self/fd/2")
        disk = self.limits.max_disk_bytes
        entries += [
            (
                "tmpfs",
                str(root / "tmp"),
                "tmpfs",
                f"size={disk},nr_inodes={self.limits.max_inodes},mode=1777,nosuid,nodev",
            ),
            ("tmpfs", str(root / "dev/shm"), "tmpfs", f"size={disk},mode=1777,nosuid,nodev,noexec"),
            # hidepid: the sandbox uid cannot see the root-owned init and its setup arguments
            ("proc", str(root / "proc"), "proc", "nosuid,nodev,noexec,hidepid=2"),
            (
                str(self.workdir),
                str(root / SANDBOX_WORKDIR.lstrip("/")),
                "none",
                "bind,nosuid,nodev",
            ),
        ]
        self._fstab.write_text(
            "".join(
                f"{_fstab_escape(src)} {_fstab_escape(dst)} {kind} {opts} 0 0\n"
                for src, dst, kind, opts in entries
            )
        )

    def _make_cgroups(self) -> None:
        """Per-sandbox v1 ``pids`` and ``memory`` cgroups under our own, where the host lets
        us (rlimits alone still bound every process; these bound the call as a whole)."""
        settings = {
            "pids": {"pids.max": str(self.limits.max_processes + 8)},
            "memory": {
                "memory.limit_in_bytes": str(self.limits.memory_bytes + self.limits.max_disk_bytes)
            },
        }
        for controller, files in settings.items():
            parent = _own_cgroup(controller)
            if parent is None:
                continue
            path = parent / f"mopd-sandbox-{self.uid}"
            try:
                path.mkdir(exist_ok=True)
                for name, value in files.items():
                    (path / name).write_text(value)
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            self._cgroups[controller] = path

    def _counter(self, controller: str, file: str, key: str | None = None) -> int:
        path = self._cgroups.get(controller)
        if path is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            text = (path / file).read_text()
            if key is None:
                return int(text.strip())
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        return 0

    def _argv(self, command: str, wall_s: float) -> list[str]:
        t, lim = self._tools, self.limits
        cpu = max(1, int(lim.cpu_seconds + 0.999))
        inner = [
            t["timeout"], "-s", "KILL", f"{wall_s + 2:.1f}",
            t["unshare"], f"--root={self._root}", f"--wd={SANDBOX_WORKDIR}",
            t["prlimit"], f"--cpu={cpu}:{cpu + 1}", f"--as={lim.memory_bytes}",
            f"--nproc={lim.max_processes}", f"--fsize={lim.max_file_bytes}",
            "--nofile=256", "--core=0", "--",
            t["setpriv"], f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--",
            t["bash"], "-c", command,
        ]  # fmt: skip
        # pid 1 of the new pid namespace is this root shell: it mounts, then waits for the
        # command instead of exec'ing it, so the command is not an init that ignores
        # SIGXCPU, and its death (or the host's SIGKILL via --kill-child) ends every process.
        setup = (
            f"{shlex.quote(t['mount'])} -a -T {shlex.quote(str(self._fstab))} 2>&1 "
            f"|| {{ echo '{_SETUP_MARKER}: mount' >&2; exit {_SETUP_FAILED}; }}; "
            + shlex.join(inner)
        )
        join = "".join(
            f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))} && " for p in self._cgroups.values()
        )
        outer = (
            f"{join}exec {shlex.quote(t['unshare'])} --mount --propagation private --pid "
            "--kill-child --net --ipc --uts -- "
            f"{shlex.quote(t['sh'])} -c {shlex.quote(setup)}"
        )
        return [t["sh"], "-c", outer]

    # ------------------------------------------------------------------------------- run

    def run(self, command: str, timeout_s: float | None = None) -> ExecResult:
        """Run ``bash -c command`` in the sandbox (cwd ``/workspace``) and wait for it.

        ``timeout_s`` lowers the wall-clock limit for this call (never raises it above
        ``limits.wall_seconds``). Raises ``SandboxUnavailable`` if the isolation could not
        be set up for this call (the sandbox is then unhealthy).
        """
        if self._closed:
            raise RuntimeError("Sandbox.run on a closed sandbox; create a new one")
        lim = self.limits
        wall = lim.wall_seconds if timeout_s is None else min(float(timeout_s), lim.wall_seconds)
        before = {
            "oom": self._counter("memory", "memory.oom_control", "oom_kill"),
            "memfail": self._counter("memory", "memory.failcnt"),
            "pidsmax": self._counter("pids", "pids.events", "max"),
        }
        start = time.monotonic()
        deadline = start + wall
        proc = subprocess.Popen(
            self._argv(command, wall),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            cwd="/",
            env=_sandbox_env(),
        )
        chunks: list[bytes] = []
        size = 0
        killed_for: str | None = None
        fd = proc.stdout.fileno()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    killed_for = "wall_time"
                    break
                ready, _, _ = select.select([fd], [], [], remaining)
                if not ready:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
                if size > lim.max_output_bytes:
                    killed_for = "output"
                    break
            if killed_for is not None:
                self._kill(proc)
                exit_code = None
            else:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
                    exit_code = proc.returncode
                except subprocess.TimeoutExpired:
                    self._kill(proc)
                    killed_for, exit_code = "wall_time", None
        finally:
            if proc.poll() is None:
                self._kill(proc)
            proc.stdout.close()
        wall_s = time.monotonic() - start
        raw = b"".join(chunks)
        truncated = len(raw) > lim.max_output_bytes
        raw = raw[: lim.max_output_bytes]
        output = raw.decode("utf-8", errors="replace")
        if exit_code is not None and exit_code < 0:  # the unshare process itself was signalled
            exit_code = 128 - exit_code
        if exit_code == _SETUP_FAILED and _SETUP_MARKER in output:
            self._setup_broken = True
            raise SandboxUnavailable(f"sandbox isolation failed for this call: {output.strip()}")
        # Measured after every call, whatever ended it: a flood that ran into the wall
        # clock or the output limit counts as much as one that finished.
        disk_over = self._check_disk()
        limit = "disk" if disk_over else killed_for or self._limit_from(exit_code, output, before)
        return ExecResult(
            exit_code=exit_code,
            output=output,
            truncated=truncated,
            timed_out=killed_for == "wall_time",
            limit_hit=limit,
            wall_s=wall_s,
        )

    def _limit_from(self, exit_code: int | None, output: str, before: dict[str, int]) -> str | None:
        if self._counter("memory", "memory.oom_control", "oom_kill") > before["oom"]:
            return "memory"
        if exit_code == 128 + signal.SIGXCPU:
            return "cpu_time"
        if exit_code == 128 + signal.SIGXFSZ or re.search(
            r"File too large|File size limit exceeded", output
        ):
            return "file_size"
        if exit_code not in (None, 0) and re.search(
            r"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory", output
        ):
            return "memory"
        if self._counter("pids", "pids.events", "max") > before["pidsmax"] or (
            "fork: retry" in output or "Resource temporarily unavailable" in output
        ):
            return "processes"
        return None

    def _check_disk(self) -> bool:
        """Measure the working directory; over a limit, empty it (its contents must not stay
        on the host) and mark the sandbox unhealthy until reset. True when it was over."""
        lim = self.limits
        usage = _measure(self.workdir, lim.max_disk_bytes, lim.max_inodes)
        self.last_disk_usage = usage
        if usage.bytes <= lim.max_disk_bytes and usage.inodes <= lim.max_inodes:
            return False
        self._disk_over = True
        log.warning(
            "sandbox uid %d: the working directory went over the disk limit (%d bytes, %d "
            "entries%s; limits %d bytes, %d entries); emptied it",
            self.uid, usage.bytes, usage.inodes, "" if usage.complete else " at least",
            lim.max_disk_bytes, lim.max_inodes,
        )  # fmt: skip
        _empty_tree(self.workdir)
        return True

    def _kill(self, proc: subprocess.Popen) -> None:
        """Kill the call's whole process tree: SIGKILL to ``unshare`` kills the namespace's
        init (``--kill-child``), whose death kills every process in the pid namespace; the
        sweeps by uid and cgroup catch anything caught mid-setup."""
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for _ in range(50):
            _kill_uid(self.uid)
            for cg in self._cgroups.values():
                with contextlib.suppress(OSError, ValueError):
                    for pid in (cg / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            if not _pids_of_uid(self.uid):
                return
            time.sleep(0.01)

    # ------------------------------------------------------------------- host-side files

    def _resolve(self, rel: str | os.PathLike[str]) -> Path:
        """The real path of ``rel`` (relative to the working directory, or under
        /workspace), symlinks resolved; ``SandboxFileError`` if it is outside."""
        rel = os.fspath(rel)
        if rel == SANDBOX_WORKDIR or rel.startswith(SANDBOX_WORKDIR + "/"):
            rel = rel[len(SANDBOX_WORKDIR) :].lstrip("/")
        if os.path.isabs(rel):
            raise SandboxFileError(
                f"path {rel!r} is outside the working directory; use a path relative to "
                f"{SANDBOX_WORKDIR} (or under it)"
            )
        if "\0" in rel:
            raise SandboxFileError(f"path {rel!r} contains a NUL byte")
        root = Path(os.path.realpath(self.workdir))
        # realpath (not Path.resolve, which raises RuntimeError on a symlink loop): a loop or
        # a path too long to resolve is left as it is, and opening it fails below.
        path = Path(os.path.realpath(root / rel))
        if path != root and root not in path.parents:
            raise SandboxFileError(
                f"path {rel!r} resolves outside the working directory {SANDBOX_WORKDIR}; only "
                "files under it can be read or written"
            )
        return path

    def _open_parent(
        self, rel: str | os.PathLike[str], create: bool, follow_last: bool = True
    ) -> tuple[int, str, str]:
        """An fd of the directory that holds ``rel``, reached one name at a time from the
        working directory without following symlinks (missing directories are made, owned
        by the sandbox uid, when ``create``); with the file's name and the path as shown.
        Without ``follow_last``, a symlink as the last component is not resolved: the name
        is the link's own."""
        if follow_last:
            path = self._resolve(rel)
        else:
            head, tail = os.path.split(os.fspath(rel))
            if tail in ("", ".", "..") or "\0" in tail:
                raise SandboxFileError(f"path {os.fspath(rel)!r} does not name a file")
            path = self._resolve(head or ".") / tail
        root = Path(os.path.realpath(self.workdir))
        parts = path.relative_to(root).parts
        if not parts:
            raise SandboxFileError(f"{SANDBOX_WORKDIR} is a directory, not a regular file")
        shown = f"{SANDBOX_WORKDIR}/{'/'.join(parts)}"
        fd = os.open(self.workdir, _DIR_FLAGS)
        try:
            for name in parts[:-1]:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    os.chown(name, self.uid, self.uid, dir_fd=fd, follow_symlinks=False)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:  # a FIFO or file on the way (ENOTDIR), ...
                    raise SandboxFileError(
                        f"cannot reach {shown!r}: {name!r} on the way is not a directory "
                        f"({exc.strerror})"
                    ) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1], shown

    def _open_regular(self, dir_fd: int, name: str, shown: str, flags: int) -> int:
        """Open ``name`` (in ``dir_fd``) only if it is a regular file (or absent, with
        ``O_CREAT``): checked before opening, so a FIFO or device is never opened, and on the
        opened fd, and never blocking (``O_NONBLOCK``), never through a symlink."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
        else:
            _refuse_unless_regular(st.st_mode, shown)
        try:
            fd = os.open(name, flags | _FILE_FLAGS, 0o644, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SandboxFileError(f"cannot open {shown!r}: {exc.strerror}") from None
        try:
            _refuse_unless_regular(os.fstat(fd).st_mode, shown)
            os.set_blocking(fd, True)  # a regular file: reads and writes complete
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_text(self, rel: str | os.PathLike[str]) -> str:
        """A regular file of the working directory (``rel`` relative to it, or under
        /workspace), decoded as UTF-8 (invalid bytes replaced). Raises ``SandboxFileError``
        for a path outside it, anything but a regular file (FIFO, socket, device, directory)
        or a file over ``max_file_bytes``; ``FileNotFoundError`` if there is none."""
        limit = self.limits.max_file_bytes
        dir_fd, name, shown = self._open_parent(rel, create=False)
        try:
            fd = self._open_regular(dir_fd, name, shown, os.O_RDONLY)
        finally:
            os.close(dir_fd)
        with open(fd, "rb", closefd=True) as f:
            size = os.fstat(fd).st_size
            if size > limit:
                raise SandboxFileError(
                    f"{shown!r} is {size} bytes, more than the sandbox's max_file_bytes={limit}; "
                    "read a part of it with bash (head, sed -n)"
                )
            data = f.read(limit + 1)
        if len(data) > limit:
            raise SandboxFileError(f"{shown!r} is more than max_file_bytes={limit} bytes")
        return data.decode("utf-8", errors="replace")

    def write_text(self, rel: str | os.PathLike[str], text: str, *, replace: bool = False) -> None:
        """Write a regular file of the working directory, owned by the sandbox uid; parent
        directories are created. Raises ``SandboxFileError`` for a path outside it, text
        over ``max_file_bytes``, or an existing entry that is not a regular file (FIFO,
        socket, device, directory). With ``replace``, whatever non-directory entry is at the
        path (a FIFO, a socket, a symlink) is replaced by a new regular file instead, never
        opened: for restoring files as shipped over whatever the sandbox put there."""
        data = text.encode("utf-8")
        limit = self.limits.max_file_bytes
        if len(data) > limit:
            raise SandboxFileError(f"{len(data)} bytes exceed the sandbox's max_file_bytes={limit}")
        dir_fd, name, shown = self._open_parent(rel, create=True, follow_last=not replace)
        try:
            if replace:
                self._replace_file(dir_fd, name, shown, data)
                return
            fd = self._open_regular(dir_fd, name, shown, os.O_WRONLY | os.O_CREAT)
            try:
                os.ftruncate(fd, 0)
                _write_all(fd, data)
                os.fchown(fd, self.uid, self.uid)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def _replace_file(self, dir_fd: int, name: str, shown: str, data: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise SandboxFileError(f"{shown!r} is a directory, not a regular file")
        tmp = f".mopd-write-{os.getpid()}-{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644, dir_fd=dir_fd)
        try:
            try:
                _write_all(fd, data)
                os.fchown(fd, self.uid, self.uid)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    def reset(self, files_from: Path | None = None) -> None:
        """Make the working directory a fresh copy of ``files_from`` (empty for None)."""
        if self._closed:
            raise RuntimeError("Sandbox.reset on a closed sandbox")
        _kill_uid(self.uid)
        # Empty it in place: the directory itself is the bind source of every call.
        _empty_tree(self.workdir)
        if files_from is not None:
            src = Path(files_from)
            if not src.is_dir():
                raise ValueError(f"files_from={src} is not a directory")
            shutil.copytree(src, self.workdir, symlinks=True, dirs_exist_ok=True)
            _chown_tree(self.workdir, self.uid)
        self.last_disk_usage = None
        self._disk_over = False
        self._setup_broken = False

    def disk_usage(self) -> DiskUsage:
        """Measure the working directory now (see ``DiskUsage``; the walk stops once a limit
        is exceeded)."""
        return _measure(self.workdir, self.limits.max_disk_bytes, self.limits.max_inodes)

    def healthy(self) -> bool:
        """True if the sandbox can take a call: open, its isolation set up on the last call,
        its working directory within the disk limit, and a trivial command runs."""
        if self._closed or self._setup_broken or self._disk_over:
            return False
        try:
            result = self.run("echo ok", timeout_s=min(10.0, self.limits.wall_seconds))
        except (SandboxUnavailable, OSError) as exc:
            log.warning("sandbox uid %d is unhealthy: %s: %s", self.uid, type(exc).__name__, exc)
            return False
        return result.exit_code == 0 and result.output == "ok\n"

    def close(self) -> None:
        """Kill anything left, remove the cgroups and the base directory, release the uid.
        Each step runs even if an earlier one failed (logged); the uid is always released."""
        if self._closed:
            return
        self._closed = True
        if not hasattr(self, "_uid"):
            return
        try:
            try:
                _kill_uid(self.uid)
            except Exception as exc:
                log.warning("sandbox uid %d: killing its processes failed: %s", self.uid, exc)
            for cg in self._cgroups.values():
                try:
                    _rmdir_cgroup(cg)
                except OSError as exc:
                    log.warning("sandbox uid %d: cannot remove cgroup %s: %s", self.uid, cg, exc)
            base = getattr(self, "_base", None)
            if base is not None:
                try:
                    _remove_dir(base)
                except Exception as exc:
                    log.error("sandbox uid %d: its directory %s is left: %s", self.uid, base, exc)
        finally:
            os.close(self._uid.lock_fd)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._closed:
                self.close()


def _sandbox_env() -> dict[str, str]:
    path = [os.path.join(p, "bin") for p in reversed(_python_prefixes())]
    path += ["/usr/local/bin", "/usr/bin", "/bin"]
    return {
        "PATH": ":".join(path),
        "HOME": SANDBOX_WORKDIR,
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "TERM": "dumb",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


_PROBE = r"""
echo "uid=$(id -u)"
echo "ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ,)"
echo "procs=$(ls /proc | grep -c '^[0-9]')"
for p in /etc/shadow /root/.bash_history "$HOST_BASE"; do test -e "$p" && echo "visible=$p"; done
touch /usr/probe 2>/dev/null && echo "writable=/usr"
echo probe > probe && echo "workdir=rw"
"""


@functools.cache
def _probe(tools: tuple[tuple[str, str], ...]) -> None:
    del tools  # the cache key: a changed PATH probes again
    if os.geteuid() != 0:
        raise SandboxUnavailable(
            f"sandboxes need root (running as uid {os.geteuid()}): each sandbox runs as its own "
            "unprivileged uid and sets up mounts in a private namespace. Run the toolbox as "
            "root in its container with CAP_SYS_ADMIN (see docs/security.md)"
        )
    for ns in ("mnt", "pid", "net", "ipc", "uts"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            raise SandboxUnavailable(f"the kernel lacks {ns} namespaces (no /proc/self/ns/{ns})")
    limits = SandboxLimits(wall_seconds=20.0, cpu_seconds=10.0)
    with Sandbox(None, limits, _tools_checked=_tools()) as sandbox:
        try:
            result = sandbox.run(f"HOST_BASE={shlex.quote(str(sandbox._base))}\n{_PROBE}")
        except SandboxUnavailable as exc:
            raise SandboxUnavailable(
                f"{exc}. The kernel or container refused a mount or namespace; run as root with "
                "CAP_SYS_ADMIN and a seccomp/AppArmor profile that allows unshare and mount "
                "(see docs/security.md)"
            ) from None
    facts = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
    problems = []
    if result.exit_code != 0 or facts.get("workdir") != "rw":
        problems.append(
            f"the probe command failed (exit {result.exit_code}): {result.output.strip()!r}"
        )
    if facts.get("uid") != str(sandbox.uid):
        problems.append(
            f"commands run as uid {facts.get('uid')}, not the sandbox uid {sandbox.uid}"
        )
    if facts.get("ifaces", "").strip(",") not in ("lo", ""):
        problems.append(f"the network namespace has interfaces {facts.get('ifaces')}")
    if "visible" in facts or "writable" in facts:
        problems.append(f"host paths leak into the sandbox: {facts}")
    if problems:
        raise SandboxUnavailable(
            "sandbox isolation probe failed: "
            + "; ".join(problems)
            + ". Check that unshare, mount and setpriv are util-linux's and that the kernel "
            "allows mount/pid/net namespaces (see docs/security.md)"
        )


def check_isolation() -> dict[str, str]:
    """Probe (once per process and PATH) that sandboxes can be isolated here; raises
    ``SandboxUnavailable`` naming why and the fix. Returns the host tools the sandbox uses."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"sandboxes need Linux namespaces; this is {sys.platform}")
    tools = _tools()
    _probe(tuple(sorted(tools.items())))
    return tools
