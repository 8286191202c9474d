"""Hostile working directories (issue 20, items 1-3), with real sandboxes: whatever the
sandbox leaves in its working directory (FIFOs, sockets, devices, symlinks out, floods of
directories and empty files, trees deeper than PATH_MAX), everything the host does there
(read_text, write_text, the disk check after a call, healthy, reset, close) returns promptly
with a clear result, the disk limit counts it, and nothing of it is left on the host.

These need root (the sandbox drops to a per-sandbox uid); elsewhere they are skipped."""

from __future__ import annotations

import fcntl
import os
import shlex
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from envs.sandbox import _UID_BASE, Sandbox, SandboxFileError, SandboxLimits, _lock_dir
from tests.envs.marks import needs_root

LIMITS = SandboxLimits(
    cpu_seconds=5,
    wall_seconds=5,
    memory_bytes=256 << 20,
    max_processes=32,
    max_output_bytes=4096,
    max_file_bytes=1 << 20,
    max_disk_bytes=16 << 20,
    max_inodes=4000,
)
PROMPT_S = 2.0  # what "returns promptly" means here; a blocked call is given up at 3x this


def _bounded(
    fn: Any, *args: Any, give_up_s: float = 3 * PROMPT_S, **kwargs: Any
) -> tuple[Any, BaseException | None, float]:
    """``fn(*args, **kwargs)`` in a daemon thread: (result, exception, seconds). Fails the
    test if it has not returned within ``give_up_s`` (on a FIFO it would never return)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(give_up_s)
    elapsed = time.monotonic() - start
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)}{args} blocked the host for {elapsed:.1f} s")
    return out.get("result"), out.get("error"), elapsed


def _python(code: str) -> str:
    """A sandbox command running ``code`` (python is faster than a bash loop for floods)."""
    return f"python3 -c {shlex.quote(code)}"


def _uid_lock_held(uid: int) -> bool:
    """Whether the flock of ``uid``'s lock file is held (by this process or another)."""
    fd = os.open(_lock_dir() / f"uid-{uid - _UID_BASE}.lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.fixture
def task(tmp_path: Path) -> Path:
    src = tmp_path / "task"
    src.mkdir()
    (src / "test_calc.py").write_text("assert 1 + 1 == 2\n")
    return src


@pytest.fixture
def sandbox(task: Path, tmp_path: Path):
    with Sandbox(task, LIMITS, base_dir=tmp_path / "sandboxes") as sb:
        yield sb


# ------------------------------------------------------------- item 1: non-regular files

PLANTS = {
    "fifo": "mkfifo target",
    "socket": _python("import socket; socket.socket(socket.AF_UNIX).bind('target')"),
    "directory": "mkdir target",
    "symlink to outside": "ln -s /etc/passwd target",
    "symlink loop": "ln -s loop2 target; ln -s target loop2",
    "fifo behind a symlink": "mkfifo fifo; ln -s fifo target",
}
REFUSAL = {
    "fifo": "is a FIFO (named pipe), not a regular file",
    "socket": "is a socket, not a regular file",
    "directory": "is a directory, not a regular file",
    "symlink to outside": "resolves outside the working directory",
    "symlink loop": "is a symbolic link, not a regular file",
    "fifo behind a symlink": "is a FIFO (named pipe), not a regular file",
}


@needs_root
@pytest.mark.parametrize("kind", list(PLANTS))
def test_host_side_read_and_write_refuse_what_is_not_a_regular_file(sandbox, kind):
    planted = sandbox.run(PLANTS[kind])
    assert planted.exit_code == 0, planted.output
    before = os.lstat(sandbox.workdir / "target")
    for op, args in (("read_text", ("target",)), ("write_text", ("target", "new text"))):
        _, error, elapsed = _bounded(getattr(sandbox, op), *args)
        assert isinstance(error, SandboxFileError), (op, error)
        assert isinstance(error, ValueError)  # what the tools already catch
        assert REFUSAL[kind] in str(error), (op, str(error))
        assert elapsed < PROMPT_S
    after = os.lstat(sandbox.workdir / "target")
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # left as it was
    # and the sandbox goes on: a call, the disk check after it, health, reset
    assert sandbox.run("echo alive").output == "alive\n"
    assert _bounded(sandbox.healthy)[0] is True
    _, error, elapsed = _bounded(sandbox.reset, None)
    assert error is None and elapsed < PROMPT_S and os.listdir(sandbox.workdir) == []


@needs_root
def test_a_device_node_is_refused_without_being_opened(sandbox):
    # the sandbox cannot mknod (no capabilities, nodev); a root host process could plant one
    os.mknod(sandbox.workdir / "tty", stat.S_IFCHR | 0o666, os.makedev(5, 0))  # /dev/tty
    for call in (lambda: sandbox.read_text("tty"), lambda: sandbox.write_text("tty", "x")):
        _, error, elapsed = _bounded(call)
        assert isinstance(error, SandboxFileError) and "a character device" in str(error)
        assert elapsed < PROMPT_S


@needs_root
def test_a_fifo_on_the_way_to_a_file_is_refused(sandbox):
    sandbox.run("mkfifo pipe")
    for call in (lambda: sandbox.read_text("pipe/x"), lambda: sandbox.write_text("pipe/x", "")):
        _, error, elapsed = _bounded(call)
        assert isinstance(error, SandboxFileError) and "'pipe' on the way" in str(error)
        assert elapsed < PROMPT_S


@needs_root
def test_write_with_replace_puts_a_regular_file_over_a_planted_one(sandbox):
    """How a protected file is restored: whatever the sandbox put at its path (FIFO, socket,
    a symlink, even one pointing out) is replaced, never opened; a directory is refused."""
    sandbox.run("mkfifo a; ln -s /etc/passwd b; mkdir -p sub; ln -s ../a sub/c; mkdir d")
    for rel in ("a", "b", "sub/c", "test_calc.py"):
        _, error, elapsed = _bounded(sandbox.write_text, rel, f"restored {rel}\n", replace=True)
        assert error is None and elapsed < PROMPT_S
        st = os.lstat(sandbox.workdir / rel)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == sandbox.uid
        assert sandbox.read_text(rel) == f"restored {rel}\n"
    assert Path("/etc/passwd").read_text().startswith("root:")
    with pytest.raises(SandboxFileError, match="is a directory"):
        sandbox.write_text("d", "x", replace=True)
    with pytest.raises(SandboxFileError, match="outside the working directory"):
        sandbox.write_text("../escape", "x", replace=True)
    assert sorted(os.listdir(sandbox.workdir)) == ["a", "b", "d", "sub", "test_calc.py"]


@needs_root
def test_read_and_write_are_bounded_by_max_file_bytes(sandbox):
    limit = LIMITS.max_file_bytes
    sandbox.run(f"head -c {limit} /dev/zero > full")
    assert len(sandbox.read_text("full")) == limit
    os.truncate(sandbox.workdir / "full", limit + 1)  # larger than the sandbox could write
    with pytest.raises(SandboxFileError, match=f"more than the sandbox's max_file_bytes={limit}"):
        sandbox.read_text("full")
    with pytest.raises(SandboxFileError, match=f"exceed the sandbox's max_file_bytes={limit}"):
        sandbox.write_text("big", "x" * (limit + 1))
    assert not (sandbox.workdir / "big").exists()


# -------------------------------------------------- item 2: the disk limit counts everything

FLOODS = {
    "5000 sibling directories": "import os\nfor i in range(5000): os.mkdir(f'd{i}')",
    "5000 nested directories": "import os\nfor _ in range(5000): os.mkdir('d'); os.chdir('d')",
    "5000 empty files": "for i in range(5000): open(f'f{i}', 'w').close()",
    "5000 symlinks": "import os\nfor i in range(5000): os.symlink('/nowhere', f'l{i}')",
    "5000 hard links": (
        "import os\nopen('f', 'w').close()\nfor i in range(5000): os.link('f', f'h{i}')"
    ),
}


@needs_root
@pytest.mark.parametrize("flood", list(FLOODS))
def test_floods_of_entries_hit_the_disk_limit_and_leave_nothing(sandbox, task, flood):
    result = sandbox.run(_python(FLOODS[flood]))
    assert result.exit_code == 0 and result.limit_hit == "disk", result
    usage = sandbox.last_disk_usage
    assert usage is not None and not usage.complete  # the walk stopped at the first excess
    # exactly one of the limits was passed, by at most one entry's worth
    if usage.inodes > LIMITS.max_inodes:
        assert usage.inodes == LIMITS.max_inodes + 1 and usage.bytes <= LIMITS.max_disk_bytes
    else:
        assert LIMITS.max_disk_bytes < usage.bytes <= LIMITS.max_disk_bytes + (64 << 10)
    assert os.listdir(sandbox.workdir) == []  # emptied at once: nothing stays on the host
    assert not sandbox.healthy()
    sandbox.reset(task)
    assert sandbox.healthy() and os.listdir(sandbox.workdir) == ["test_calc.py"]


@needs_root
def test_directories_count_by_their_blocks(tmp_path):
    """Megabytes of directories against a limit of a few (the flood of the issue), with an
    inode limit far away: the blocks of the directories alone are over (on a filesystem
    whose directories have blocks: ext4, xfs, btrfs; tmpfs has none)."""
    limits = SandboxLimits(**{**LIMITS.__dict__, "max_disk_bytes": 4 << 20, "max_inodes": 1 << 20})
    with Sandbox(None, limits, base_dir=tmp_path) as sb:
        probe = sb.run("mkdir probe && stat -c %b probe && rmdir probe")
        if int(probe.output.split()[0]) == 0:
            pytest.skip("directories take no blocks on this filesystem (tmpfs)")
        result = sb.run(_python("import os\nfor i in range(3000): os.mkdir(f'd{i}')"))
        assert result.limit_hit == "disk"
        assert sb.last_disk_usage.bytes > limits.max_disk_bytes
        assert sb.last_disk_usage.inodes < 3000
        assert os.listdir(sb.workdir) == []


@needs_root
def test_disk_usage_counts_every_entry_once(sandbox):
    sandbox.run(
        _python(
            "import os\nos.makedirs('a/b/c')\nopen('a/b/c/f', 'wb').write(bytes(100000))\n"
            "open('e', 'w').close()\nos.symlink('e', 'l')\nos.link('a/b/c/f', 'h')\n"
            "os.mkfifo('p')"
        )
    )
    usage = sandbox.disk_usage()
    seen, expected = set(), os.lstat(sandbox.workdir).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(sandbox.workdir):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                expected += st.st_blocks * 512
    # test_calc.py, a, a/b, a/b/c, a/b/c/f, e, l, h (a second name of f), p
    assert (usage.inodes, usage.bytes, usage.complete) == (9, expected, True)
    assert usage.bytes >= 100000


@needs_root
def test_a_flood_killed_by_the_wall_clock_is_counted_too(sandbox):
    result = sandbox.run("mkdir d{1..5000}; echo made; sleep 100", timeout_s=3.0)
    assert result.output == "made\n" and result.timed_out and result.limit_hit == "disk", result
    assert sandbox.last_disk_usage.inodes > LIMITS.max_inodes or (
        sandbox.last_disk_usage.bytes > LIMITS.max_disk_bytes
    )
    assert os.listdir(sandbox.workdir) == [] and not sandbox.healthy()


# ------------------------------------------------------------ item 3: trees deeper than PATH_MAX


def _deep(name: str) -> str:
    """A sandbox command making a chain of 1500 directories called ``name`` with a file at
    the bottom; prints the length of the bottom's path."""
    return _python(
        f"import os\nfor _ in range(1500): os.mkdir({name!r}); os.chdir({name!r})\n"
        "open('leaf', 'w').write('x')\nprint(len(os.getcwd()))"
    )


@needs_root
@pytest.mark.parametrize(
    "name",
    [
        "d",  # 3000 characters: under PATH_MAX, over the recursion limit of a recursive walk
        "dddddddd",  # 13500 characters: over PATH_MAX (a walk by paths stops there)
    ],
)
def test_a_deep_tree_breaks_nothing_and_leaves_nothing(task, tmp_path, name):
    base = tmp_path / "sandboxes"
    sb = Sandbox(task, LIMITS, base_dir=base)
    try:
        (sandbox_dir,) = base.iterdir()
        made = sb.run(_deep(name))
        assert made.exit_code == 0 and made.limit_hit is None, made
        assert int(made.output) > 1500 * (len(name) + 1)
        counted = sb.last_disk_usage  # the check after the call saw all of it
        assert counted.complete and counted.inodes == 1 + 1500 + 1  # test_calc.py, dirs, leaf
        # each step walks the whole tree (no more than this machine's load makes it take)
        listed, error, _ = _bounded(sb.run, "ls", give_up_s=30)
        assert error is None and listed.output == f"{name}\ntest_calc.py\n", error
        assert listed.limit_hit is None and sb.last_disk_usage == counted
        assert _bounded(sb.healthy, give_up_s=30)[:2] == (True, None)
        assert _bounded(sb.reset, task, give_up_s=30)[1] is None
        assert os.listdir(sb.workdir) == ["test_calc.py"]
        assert sb.run(_deep(name)).exit_code == 0  # deep again, then close
        assert sb.disk_usage() == counted
        uid = sb.uid
        assert _uid_lock_held(uid)
        assert _bounded(sb.close, give_up_s=30)[1] is None
        assert not sandbox_dir.exists() and list(base.iterdir()) == []
        assert not _uid_lock_held(uid)
    finally:
        sb.close()  # a failed assertion must not leave a deep tree behind


def test_max_inodes_is_validated():
    assert SandboxLimits().max_inodes == 65536
    with pytest.raises(ValueError, match="max_inodes must be > 0"):
        SandboxLimits(max_inodes=0)
    with pytest.raises(ValueError, match="max_inodes must be an integer"):
        SandboxLimits(max_inodes=1.5)
    with pytest.raises(ValueError, match="max_disk_bytes must be a number"):
        SandboxLimits(max_disk_bytes="1G")
