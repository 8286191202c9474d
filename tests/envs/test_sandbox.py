"""Real sandboxes (no mocks): every escape attempt of the issue is contained with a clear result,
the host is left as it was, and isolation that cannot be set up is refused (fail closed).

These need root (the sandbox drops to a per-sandbox uid); elsewhere they are skipped, except the
fail-closed tests, which hold everywhere."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from envs.sandbox import (
    SANDBOX_WORKDIR,
    ExecResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    check_isolation,
)
from tests.envs.marks import needs_root

FAST = SandboxLimits(
    cpu_seconds=5,
    wall_seconds=4,
    memory_bytes=256 << 20,
    max_processes=32,
    max_output_bytes=4096,
    max_file_bytes=1 << 20,
    max_disk_bytes=16 << 20,
)


def _host_pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _uid_pids(uid: int) -> list[int]:
    return [p for p in _host_pids() if _owner(p) == uid]


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.fixture
def task(tmp_path: Path) -> Path:
    src = tmp_path / "task"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (src / "test_calc.py").write_text(
        "import unittest\nfrom pkg.calc import add\n\n"
        "class T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
    )
    return src


@pytest.fixture
def sandbox(task: Path, tmp_path: Path):
    with Sandbox(task, FAST, base_dir=tmp_path / "sandboxes") as sb:
        yield sb
        assert _uid_pids(sb.uid) == [], "a sandbox process outlived its call"


@needs_root
def test_runs_commands_in_the_copied_workdir_as_an_unprivileged_uid(sandbox, task):
    result = sandbox.run("pwd; id -u; ls; cat /etc/hostname; echo err >&2; exit 7")
    assert result.exit_code == 7 and result.limit_hit is None and not result.timed_out
    lines = result.output.splitlines()
    assert lines[0] == SANDBOX_WORKDIR
    assert int(lines[1]) == sandbox.uid and sandbox.uid != 0
    assert lines[2:4] == ["pkg", "test_calc.py"] and "err" in lines
    assert (sandbox.workdir / "pkg" / "calc.py").read_text() == (task / "pkg/calc.py").read_text()


@needs_root
def test_no_privileges_inside(sandbox):
    result = sandbox.run(
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; unshare --user --map-root-user "
        "true; mount -t tmpfs none /tmp; ps -e --no-headers | wc -l"
    )
    lines = result.output.splitlines()
    assert lines[:3] == ["CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "NoNewPrivs:\t1"]
    assert result.output.count("Operation not permitted") == 1  # no nested user namespace
    assert "must be superuser to use mount" in result.output
    assert int(lines[-1]) <= 3  # bash, ps, wc: the root init is hidden, the host's are absent


@needs_root
def test_python_unittest_runs_inside(sandbox):
    failing = sandbox.run("python3 -m unittest -q test_calc")
    assert failing.exit_code == 1 and "AssertionError: -1 != 5" in failing.output
    sandbox.write_text("pkg/calc.py", "def add(a, b):\n    return a + b\n")
    passing = sandbox.run("python3 -m unittest -q test_calc")
    assert passing.exit_code == 0, passing.output
    assert "Ran 1 test" in passing.output and "OK" in passing.output


@needs_root
def test_no_network_neither_host_loopback_nor_outside(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        for _ in range(25):
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    script = (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {port}), ('127.0.0.1', 6379), ('8.8.8.8', 53), "
        "('1.1.1.1', 443)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=2)\n"
        "        print('CONNECTED', host, port)\n"
        "    except OSError as exc:\n"
        "        print('refused', host, port, exc.errno)\n"
        "try:\n    socket.getaddrinfo('example.com', 80)\n    print('RESOLVED')\n"
        "except OSError as exc:\n    print('no dns', exc)\n"
    )
    sandbox.write_text("net.py", script)
    result = sandbox.run("python3 net.py; cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    thread.join()
    server.close()
    assert "CONNECTED" not in result.output and "RESOLVED" not in result.output
    assert result.output.count("refused") == 4 and "no dns" in result.output
    assert "101" in result.output  # ENETUNREACH: there is no route at all
    assert result.output.split()[-1] == "lo"  # the only interface
    assert accepted == []


@needs_root
def test_cannot_write_outside_the_workdir(sandbox, tmp_path):
    marker = f"mopd-escape-{os.getpid()}"
    host_tmp = Path("/tmp") / marker
    result = sandbox.run(
        f"echo x > /{marker}; echo x > /tmp/{marker}; echo x > ../{marker}; "
        f"echo x > /usr/{marker}; echo x > {tmp_path}/{marker}; mkdir /etc/{marker}; "
        f"touch {os.path.realpath(os.__file__)}; ls /tmp"
    )
    assert "Read-only file system" in result.output or "Permission denied" in result.output
    for path in (Path("/") / marker, Path("/usr") / marker, tmp_path / marker, host_tmp):
        assert not path.exists(), f"the sandbox wrote {path} on the host"
    assert not (sandbox.workdir.parent / marker).exists()
    assert result.output.split()[-1] == marker  # its own /tmp was writable, and private
    assert not host_tmp.exists()


@needs_root
def test_cannot_read_host_files(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    secret.chmod(0o644)  # even world-readable host files are not there
    result = sandbox.run(
        f"cat {secret}; cat /etc/shadow; ls -a /root; ls /home; cat /proc/1/environ; "
        f"ls {sandbox.workdir.parent}; grep -r TOP-SECRET / 2>/dev/null | head -1"
    )
    assert "TOP-SECRET" not in result.output
    assert "No such file or directory" in result.output
    # a symlink planted in the workdir does not let host-side file access escape either
    sandbox.run(f"ln -s {secret} leak; ln -s /etc/shadow shadow; ln -s .. up")
    for name in ("leak", "shadow", "up/secret.txt"):
        with pytest.raises(ValueError, match="outside the working directory"):
            sandbox.read_text(name)
    with pytest.raises(ValueError, match="outside the working directory"):
        sandbox.write_text("leak", "overwritten")
    assert secret.read_text() == "TOP-SECRET-42"
    with pytest.raises(ValueError, match="outside the working directory"):
        sandbox.read_text("/etc/passwd")


@needs_root
@pytest.mark.parametrize(
    "bomb",
    [
        ":(){ :|:& };:; sleep 2",  # the classic, given time to grow
        "python3 -c 'import os\nwhile True:\n    try: os.fork()\n    except OSError: pass'",
    ],
)
def test_fork_bomb_is_contained(sandbox, bomb):
    before = len(_host_pids())
    start = time.monotonic()
    result = sandbox.run(bomb)
    elapsed = time.monotonic() - start
    assert elapsed < FAST.wall_seconds + 2
    assert result.limit_hit in ("processes", "wall_time")
    assert _uid_pids(sandbox.uid) == []
    assert len(_host_pids()) - before < 10  # other jobs on the host may start a few
    assert sandbox.run("echo alive").output == "alive\n"


@needs_root
def test_run_forever_is_killed_at_the_wall_limit(sandbox):
    start = time.monotonic()
    result = sandbox.run("sleep 1000 & (while :; do :; done) & echo started; wait")
    elapsed = time.monotonic() - start
    assert result.timed_out and result.limit_hit == "wall_time" and result.exit_code is None
    assert FAST.wall_seconds <= elapsed < FAST.wall_seconds + 2
    assert result.output == "started\n"
    assert _uid_pids(sandbox.uid) == []
    short = sandbox.run("sleep 5", timeout_s=0.5)
    assert short.timed_out and short.wall_s < 2


@needs_root
def test_background_processes_die_with_the_call(sandbox):
    result = sandbox.run("nohup sleep 1000 >/dev/null 2>&1 & setsid sleep 1000 & echo bg")
    assert result.exit_code == 0 and result.output == "bg\n" and result.wall_s < 2
    assert _uid_pids(sandbox.uid) == []


@needs_root
@pytest.mark.parametrize("command", ["yes", "head -c 5000000000 /dev/urandom", "cat /dev/zero"])
def test_printing_gigabytes_is_truncated_quickly(sandbox, command):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = sandbox.run(command)
    assert result.truncated and result.limit_hit == "output" and result.exit_code is None
    assert len(result.output) <= FAST.max_output_bytes  # each kept byte is at most one character
    assert result.wall_s < 2
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 50 * 1024
    assert _uid_pids(sandbox.uid) == []


@needs_root
def test_memory_hog_hits_the_limit(sandbox):
    result = sandbox.run("python3 -c 'x = bytearray(2 << 30)'")
    assert result.exit_code == 1 and "MemoryError" in result.output
    assert result.limit_hit == "memory"
    assert sandbox.run("echo alive").exit_code == 0


@needs_root
def test_cpu_hog_is_stopped_at_the_cpu_limit(tmp_path):
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=20, max_output_bytes=1024)
    with Sandbox(None, limits, base_dir=tmp_path) as sb:
        result = sb.run("while :; do :; done")
    assert result.limit_hit == "cpu_time" and result.exit_code == 152  # 128 + SIGXCPU
    assert result.wall_s < 10


@needs_root
def test_file_larger_than_max_file_bytes(sandbox):
    result = sandbox.run("head -c 3000000 /dev/zero > big")
    assert result.limit_hit == "file_size" and result.exit_code == 153  # 128 + SIGXFSZ
    assert (sandbox.workdir / "big").stat().st_size == FAST.max_file_bytes
    py = sandbox.run("python3 -c \"open('big2', 'wb').write(bytes(3000000))\"")
    assert py.limit_hit == "file_size" and "File too large" in py.output


@needs_root
def test_disk_limit_marks_the_sandbox_unhealthy_until_reset(sandbox, task):
    assert sandbox.healthy()
    result = sandbox.run("for i in $(seq 20); do head -c 1000000 /dev/zero > f$i; done")
    assert result.limit_hit == "disk"
    assert not sandbox.healthy()
    tmp = sandbox.run(f"head -c {FAST.max_disk_bytes + (1 << 20)} /dev/zero > /tmp/x")
    assert tmp.exit_code != 0  # /tmp is a tmpfs of max_disk_bytes (and max_file_bytes holds)
    sandbox.reset(task)
    assert sandbox.healthy()


@needs_root
def test_reset_gives_a_fresh_copy(sandbox, task):
    sandbox.run("echo changed > pkg/calc.py; rm test_calc.py; mkdir -p new/deep; touch new/deep/f")
    sandbox.write_text("notes/todo.txt", "x")
    assert (task / "pkg/calc.py").read_text().startswith("def add")  # the source is untouched
    sandbox.reset(task)
    files = sorted(str(p.relative_to(sandbox.workdir)) for p in sandbox.workdir.rglob("*"))
    assert files == ["pkg", "pkg/__init__.py", "pkg/calc.py", "test_calc.py"]
    assert sandbox.read_text("pkg/calc.py") == (task / "pkg/calc.py").read_text()
    assert sandbox.run("echo x >> pkg/calc.py && echo ok").output == "ok\n"  # owned by the sandbox
    sandbox.reset(None)
    assert list(sandbox.workdir.iterdir()) == []


@needs_root
def test_each_call_gets_a_fresh_tmp_and_the_workdir_persists(sandbox):
    sandbox.run("echo a > /tmp/t; echo b > kept")
    result = sandbox.run("cat /tmp/t; cat kept")
    assert "No such file" in result.output and result.output.endswith("b\n")


@needs_root
def test_sandboxes_are_separate(tmp_path):
    with (
        Sandbox(None, FAST, base_dir=tmp_path) as a,
        Sandbox(None, FAST, base_dir=tmp_path) as b,
    ):
        assert a.uid != b.uid
        a.run("echo mine > f")
        assert b.run("cat f; ls /").output.count("mine") == 0
        assert not (b.workdir / "f").exists()
        assert a.healthy() and b.healthy()
    a_closed = a
    assert not a_closed.healthy()
    with pytest.raises(RuntimeError, match="closed"):
        a_closed.run("true")
    assert not a.workdir.exists()


@needs_root
def test_per_call_overhead_is_tens_of_ms(sandbox):
    times = sorted(sandbox.run("true").wall_s for _ in range(10))
    assert times[5] < 0.25  # about 25 ms on an idle 2-core machine; loose for shared CI


def test_fail_closed_without_the_unshare_tool(monkeypatch, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SandboxUnavailable, match=r"'unshare' command .* not on PATH"):
        check_isolation()
    with pytest.raises(SandboxUnavailable):
        Sandbox(None, FAST, base_dir=tmp_path / "sb")
    assert not (tmp_path / "sb").exists()  # nothing was set up, nothing ran


@needs_root
def test_fail_closed_when_the_kernel_refuses_namespaces(monkeypatch, tmp_path):
    """A PATH whose ``unshare`` fails the way a container without CAP_SYS_ADMIN (or with a
    seccomp profile blocking unshare) does: the probe reports it and no sandbox starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mount", "timeout", "prlimit", "setpriv", "bash", "sh", "id", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    (bin_dir / "unshare").write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    (bin_dir / "unshare").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(SandboxUnavailable, match=r"probe failed.*Operation not permitted"):
        check_isolation()
    with pytest.raises(SandboxUnavailable):
        Sandbox(None, FAST, base_dir=tmp_path / "sb")
    monkeypatch.undo()
    check_isolation()  # the real tools pass again (success is cached, failure is not)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_seconds must be > 0"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=1 << 20)
    assert isinstance(ExecResult(0, "", False, False, None, 0.0), ExecResult)
