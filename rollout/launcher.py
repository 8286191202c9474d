"""Start and stop one engine server process: SGLang or the project's embedded engine.

Both servers take SGLang's command-line flags (``python -m sglang.launch_server`` and
``python -m rollout.server``; the embedded server reads the core flags and ignores the rest),
so one command builder serves both and only the module differs. A ``LaunchSpec`` names the
common settings with SGLang's meaning; anything else goes through ``extra_args`` (field names
or flags, checked against the flags of SGLang 0.5.23 in ``mopd.inference.sglang_schema``) or,
unchecked, ``extra_argv``.

The process runs in its own session (process group), with stdout and stderr in a log file.
``ServerProcess.wait_healthy`` polls ``/health`` and, if the process dies first, raises with
the tail of that log. ``stop`` sends SIGTERM to the group, then SIGKILL after a grace period:
servers are stopped by the pid we started, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from mopd.inference.sglang_schema import SERVER_FLAGS, SGLANG_VERSION

__all__ = [
    "LaunchSpec",
    "ServerProcess",
    "ServerStartError",
    "SpeculativeSpec",
    "build_command",
    "flags_of",
    "launch_server",
    "spec_from_server_args",
]

Backend = Literal["embedded", "sglang"]
_MODULES: dict[str, str] = {"embedded": "rollout.server", "sglang": "sglang.launch_server"}
# SGLang's built-in speculative algorithms; NEXTN (alias EAGLE) drafts with the checkpoint's
# own multi-token-prediction (MTP) layers, as MiMo-V2-Flash and DeepSeek-V3 ship them.
_SPECULATIVE_ALGORITHMS = ("EAGLE", "EAGLE3", "NEXTN", "STANDALONE", "NGRAM")


class ServerStartError(RuntimeError):
    """The server process exited or did not become healthy in time (carries its log tail)."""


@dataclass(frozen=True)
class SpeculativeSpec:
    """Speculative decoding (``--speculative-*`` flags)."""

    algorithm: str
    """One of EAGLE, EAGLE3, NEXTN (MTP layers of the checkpoint), STANDALONE, NGRAM."""
    num_steps: int | None = None
    """Draft steps per verification."""
    eagle_topk: int | None = None
    """Branching factor of the draft tree."""
    num_draft_tokens: int | None = None
    """Tokens verified per step."""
    draft_model_path: str | None = None
    """Separate draft model (EAGLE/EAGLE3/STANDALONE); MTP uses the target checkpoint."""

    def __post_init__(self) -> None:
        if self.algorithm not in _SPECULATIVE_ALGORITHMS:
            raise ValueError(
                f"speculative algorithm {self.algorithm!r} is not one of {_SPECULATIVE_ALGORITHMS}"
                " (for MTP use NEXTN)"
            )


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one server. Fields map one-to-one onto SGLang flags of the same name."""

    model_path: str
    """Checkpoint folder (HF layout)."""
    backend: Backend = "embedded"
    """embedded (``python -m rollout.server``) or sglang (``python -m sglang.launch_server``)."""
    tokenizer_path: str | None = None
    """Tokenizer folder when it differs from model_path."""
    host: str = "127.0.0.1"
    """Interface to bind: loopback for local runs, the cluster interface on a cluster."""
    port: int = 0
    """Port to bind; 0 picks a free one at start."""
    dtype: str | None = None
    """Weight and activation dtype (auto, bfloat16, float16, float32)."""
    context_length: int | None = None
    """Maximum prompt + response tokens; None keeps the model's own."""
    random_seed: int | None = None
    """Server-wide seed."""
    enable_return_routed_experts: bool = False
    """Capture the experts every token was routed to (needed for R3 routing replay)."""
    tp_size: int = 1
    """Tensor-parallel size."""
    ep_size: int = 1
    """Expert-parallel size."""
    dp_size: int = 1
    """Data-parallel replicas inside the server."""
    mem_fraction_static: float | None = None
    """Share of GPU memory for weights and KV cache."""
    max_running_requests: int | None = None
    """Continuous-batching width."""
    quantization: str | None = None
    """Online quantization, e.g. fp8."""
    speculative: SpeculativeSpec | None = None
    """Speculative decoding (MTP/EAGLE), off when None."""
    weight_version: str | None = None
    """Version label of the initial weights (reported in every response)."""
    enable_memory_saver: bool = False
    """Allow release/resume of GPU memory (colocated trainer and engine)."""
    trust_remote_code: bool = False
    """Run model code shipped inside the checkpoint."""
    log_level: str | None = None
    """Server log level."""
    extra_args: Mapping[str, Any] = field(default_factory=dict)
    """More SGLang flags by field name (``chunked_prefill_size``) or flag (``--chunked-prefill-size``);
    True adds a bare switch, False/None omit it, a list passes several values."""
    extra_argv: tuple[str, ...] = ()
    """Raw arguments appended as they are (not checked against SGLang's flags)."""
    module: str | None = None
    """Run ``python -m MODULE`` instead of the backend's server module."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for the server process."""
    cwd: str | None = None
    """Working directory of the server process (default: the caller's)."""

    def __post_init__(self) -> None:
        if self.backend not in _MODULES:
            raise ValueError(f"backend must be one of {sorted(_MODULES)}, got {self.backend!r}")
        for name in ("tp_size", "ep_size", "dp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )
        _extra_flags(self.extra_args)  # fail at construction on an unknown flag


def _flag_name(key: str) -> str:
    return key if key.startswith("--") else "--" + key.replace("_", "-")


def _extra_flags(extra: Mapping[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in extra.items():
        flag = _flag_name(key)
        kind = SERVER_FLAGS.get(flag)
        if kind is None:
            raise ValueError(
                f"{flag} (from {key!r}) is not a flag of SGLang {SGLANG_VERSION}; check the "
                "spelling against `python -m sglang.launch_server --help`, or pass it through "
                "extra_argv unchecked"
            )
        if value is None or value is False:
            continue
        if kind == "bool":
            if value is not True:
                raise ValueError(f"{flag} is a switch: give True or False, got {value!r}")
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def build_command(spec: LaunchSpec, port: int | None = None) -> list[str]:
    """The full command line (``python -m MODULE --flag value ...``) for ``spec``."""
    port = spec.port if port is None else port
    named: dict[str, Any] = {
        "model_path": spec.model_path,
        "tokenizer_path": spec.tokenizer_path,
        "host": spec.host,
        "port": port,
        "dtype": spec.dtype,
        "context_length": spec.context_length,
        "random_seed": spec.random_seed,
        "enable_return_routed_experts": spec.enable_return_routed_experts,
        "tp_size": spec.tp_size if spec.tp_size != 1 else None,
        "ep_size": spec.ep_size if spec.ep_size != 1 else None,
        "dp_size": spec.dp_size if spec.dp_size != 1 else None,
        "mem_fraction_static": spec.mem_fraction_static,
        "max_running_requests": spec.max_running_requests,
        "quantization": spec.quantization,
        "weight_version": spec.weight_version,
        "enable_memory_saver": spec.enable_memory_saver,
        "trust_remote_code": spec.trust_remote_code,
        "log_level": spec.log_level,
    }
    if spec.speculative is not None:
        s = spec.speculative
        named |= {
            "speculative_algorithm": s.algorithm,
            "speculative_num_steps": s.num_steps,
            "speculative_eagle_topk": s.eagle_topk,
            "speculative_num_draft_tokens": s.num_draft_tokens,
            "speculative_draft_model_path": s.draft_model_path,
        }
    clash = {_flag_name(k) for k in spec.extra_args} & {_flag_name(k) for k in named}
    if clash:
        raise ValueError(f"extra_args repeat flags the spec already sets: {sorted(clash)}")
    module = spec.module or _MODULES[spec.backend]
    return [
        sys.executable,
        "-m",
        module,
        *_extra_flags(named),
        *_extra_flags(spec.extra_args),
        *spec.extra_argv,
    ]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """One running server process that this object started (and alone may stop)."""

    def __init__(self, spec: LaunchSpec, log_path: str | os.PathLike[str] | None = None):
        """Start the server (returns at once; call ``wait_healthy``)."""
        self.spec = spec
        self.port = spec.port or _free_port(spec.host)
        self.command = build_command(spec, self.port)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"mopd-server-{self.port}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        env = {**os.environ, **spec.env}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,  # its own process group: stop() reaches its children
            )
        self.pid = self._proc.pid

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "") else self.spec.host
        return f"http://{host}:{self.port}"

    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def wait_healthy(self, timeout_s: float = 600.0, poll_s: float = 0.25) -> None:
        """Block until ``/health`` answers 200.

        Raises:
            ServerStartError: the process exited, or ``timeout_s`` passed (the process is then
                stopped); the message carries the command and the log tail.
        """
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=max(poll_s, 1.0)) as http:
            while True:
                if not self.alive():
                    raise ServerStartError(
                        f"server exited with code {self.returncode} before becoming healthy.\n"
                        f"command: {' '.join(self.command)}\nlog {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(
                        f"server not healthy after {timeout_s:.0f}s; stopped it.\ncommand: "
                        f"{' '.join(self.command)}\nlog {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(poll_s)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; returns the exit code."""
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(timeout=30)
        # The leader is gone; children it left in its group would still hold GPUs or ports.
        self._signal_group(signal.SIGKILL)
        return self._proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        # The group id is the pid we started (start_new_session=True).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProcess(pid={self.pid}, url={self.url!r}, alive={self.alive()})"


def launch_server(
    spec: LaunchSpec,
    startup_timeout_s: float = 600.0,
    log_path: str | os.PathLike[str] | None = None,
) -> ServerProcess:
    """Start a server and wait until it is healthy (stopping it if it never is)."""
    server = ServerProcess(spec, log_path)
    try:
        server.wait_healthy(startup_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def spec_from_server_args(
    model_path: str, backend: Backend, server_args: Mapping[str, Any], **fields: Any
) -> LaunchSpec:
    """A spec from a config: ``fields`` from named config options, plus the free-form
    ``server_args``, whose keys that are spec fields set them and the rest become
    ``extra_args`` (checked against SGLang's flags). A key given both ways is an error."""
    names = set(LaunchSpec.__dataclass_fields__)
    own = {k: v for k, v in server_args.items() if k in names}
    extra = {k: v for k, v in server_args.items() if k not in names}
    repeated = sorted(set(own) & set(fields))
    if repeated:
        raise ValueError(
            f"server_args repeat {repeated}, which the config sets already; set them once"
        )
    return LaunchSpec(model_path=model_path, backend=backend, **fields, **own, extra_args=extra)


def flags_of(argv: Sequence[str]) -> list[str]:
    """The ``--flags`` in a command line (helper for checks and logs)."""
    return [a for a in argv if a.startswith("--")]
