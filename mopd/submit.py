"""``mopd submit``: run a config on a Ray cluster as a Ray job and follow its logs.

``mopd submit CONFIG [key=value ...]`` checks the config here, then asks the cluster's job
server (the dashboard, ``http://HEAD:8265``) to run ``mopd train CONFIG [key=value ...]``
in a copy of the working directory, and streams the job's output until it ends. Inside the
job Ray sets ``$RAY_ADDRESS``, so the driver joins that cluster instead of starting one.

What travels with the job (its ``runtime_env``):

- the working directory (default: the current one), minus run outputs, caches and VCS
  folders (``EXCLUDES``, the run's own output_dir when it lies inside, and whatever
  ``.gitignore`` lists, which Ray honours); the config must be inside it, because the job
  names it by its path relative to that directory;
- Python packages: those of the cluster's image, unless ``--pip-requirements`` names a
  requirements file for Ray to install;
- environment variables: only non-secret ones (``PYTHONUNBUFFERED`` so that log lines
  arrive as they are written, and ``--env KEY=VALUE``). Ray keeps the runtime_env in the
  job's record (dashboard, ``ray job list``, ``$RAY_JOB_CONFIG_JSON_ENV_VAR`` of every
  worker), so secrets such as ``$MOPD_REDIS_PASSWORD`` never go there: the cluster's
  nodes hold them in their own environment.

Which cluster: ``--address``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``, else the
config's ``cluster.address`` when it is an http(s) dashboard URL. There is no
auto-detection: a job must never land on a cluster that someone else started on this
machine.

Token authentication: with token auth on, a Ray 2.60 cluster checks a bearer token on every
dashboard request, and ``ray start`` turns it on by itself when it finds a token
(``~/.ray/auth_token`` exists after any ``ray.init()``), while Ray's job client only sends
one when ``RAY_AUTH_MODE=token``. Like ``ray start``, this client sends the token Ray's own
loader finds (``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``) unless ``RAY_AUTH_MODE=disabled``; a refusal says what to set.

Exit codes: 0 the job SUCCEEDED (or was submitted, with ``--no-wait``); 1 it failed or was
stopped, or the cluster could not be reached or refused us; 2 a bad config or bad flags,
nothing submitted; 130 Ctrl-C stopped the streaming (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mopd.config import ConfigError, RunConfig, load_config
from mopd.io import scoped_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

EXIT_OK = 0
EXIT_RUN_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130

# gitignore patterns relative to the working dir: what a run writes, caches, environments
# and VCS data, none of which the job needs and some of which are large.
EXCLUDES: tuple[str, ...] = (
    "runs/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.sqlite",
    ".git/",
    ".hg/",
    ".svn/",
    "__pycache__/",
    "*.pyc",
    ".venv/",
    "venv/",
    ".tox/",
    ".nox/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".ipynb_checkpoints/",
    "*.egg-info/",
    "build/",
    "dist/",
    "wandb/",
)

# Non-secret settings every job gets: Python buffers stdout when it is not a terminal,
# which would hold log lines back from the stream for kilobytes at a time.
DEFAULT_ENV_VARS: Mapping[str, str] = {"PYTHONUNBUFFERED": "1"}

# Words of an environment variable's name that mark it as a secret (HF_TOKEN,
# MOPD_REDIS_PASSWORD, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY; not TOKENIZERS_PARALLELISM).
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIALS?|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY)"
    r"(?:_|$)",
    re.IGNORECASE,
)
_MIN_SECRET_LEN = 8  # shorter values (flags like 1 or true) are no evidence of a copied secret
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_API_ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # what Ray's job client reads before RAY_ADDRESS
_POLL_S = 0.5
_FINAL_STATUS_WAIT_S = 30.0


class SubmitError(Exception):
    """A submission that cannot go ahead; ``exit_code`` is what ``mopd submit`` returns."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Submission:
    """What ``mopd submit`` sends to the job server: built here, read by ``submit_job``."""

    entrypoint: str
    """Shell command the job runs, ``mopd train CONFIG OVERRIDES...``, quoted."""
    runtime_env: dict[str, Any]
    """Ray runtime_env: working_dir, excludes, env_vars and, if asked, pip."""
    metadata: dict[str, str]
    """Shown with the job (``ray job list``): the run's name and config."""


# ---------------------------------------------------------------------- the CLI
def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mopd submit`` on the ``add_subparsers()`` object of the mopd CLI."""
    p = subparsers.add_parser(
        "submit",
        help="run the config on a Ray cluster as a Ray job and stream its logs",
        description="Validate CONFIG with the overrides here, submit `mopd train CONFIG "
        "OVERRIDES` as a Ray job that runs in a copy of the working directory, and stream "
        "its logs until it ends. Exits 0 if the job succeeded, 1 if it failed, 2 if the "
        "config or the flags are wrong (nothing is submitted then). Secrets such as "
        "$MOPD_REDIS_PASSWORD are never sent: set them on the cluster's nodes.",
    )
    p.add_argument("config", help="YAML run config, inside the working directory")
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides in OmegaConf dot-list syntax, e.g. trainer.lr=1e-5; the job "
        "gets them too",
    )
    p.add_argument(
        "--address",
        help="the cluster's dashboard URL, e.g. http://head:8265 (default: "
        "$RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, or cluster.address when it is an http(s) URL)",
    )
    p.add_argument(
        "--working-dir",
        default=".",
        help="folder uploaded as the job's working directory (default: the current one)",
    )
    p.add_argument(
        "--resume", action="store_true", help="the job continues from the last checkpoint"
    )
    p.add_argument(
        "--pip-requirements",
        metavar="FILE",
        help="requirements file that Ray installs for the job (default: the cluster's image)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra non-secret environment variable for the job (repeatable); secrets "
        "belong in the nodes' environment, never here",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and return instead of streaming the logs",
    )
    p.set_defaults(func=cmd_submit)
    return p


def cmd_submit(args: argparse.Namespace) -> int:
    """``mopd submit``: check everything here, submit, then follow (or not); the exit code."""
    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mopd submit: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        submission = build_submission(
            run,
            args.config,
            args.overrides,
            working_dir=args.working_dir,
            resume=args.resume,
            pip_requirements=args.pip_requirements,
            env=args.env,
        )
        address = resolve_address(args.address, run)
        headers = auth_headers()
        for warning in _warnings(run):
            print(f"mopd submit: warning: {warning}", file=sys.stderr)
        client = connect(address, headers)
        job_id = submit(client, submission)
    except SubmitError as e:
        print(f"mopd submit: {e}", file=sys.stderr)
        return e.exit_code
    hints = _hints(address, job_id, token_sent=bool(headers))
    if args.no_wait:
        print(job_id)
        print(f"submitted job {job_id} to {address}\n{hints}", file=sys.stderr)
        return EXIT_OK
    print(f"submitted job {job_id} to {address}; streaming its logs", file=sys.stderr)
    return follow(client, job_id, hints=hints)


# ---------------------------------------------------------------------- what is sent
def build_submission(
    run: RunConfig,
    config_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    working_dir: str | os.PathLike = ".",
    resume: bool = False,
    pip_requirements: str | os.PathLike | None = None,
    env: Sequence[str] = (),
    parent_run_id: str | None = None,
) -> Submission:
    """The job for a validated ``run``: entrypoint, runtime_env and metadata.
    ``parent_run_id``: the MLflow run the job's run nests under (``mopd train --parent-run-id``).

    Raises:
        SubmitError: the working dir or requirements file is missing, the config is outside
            the working dir, or an ``--env`` item is malformed or looks like a secret.
    """
    workdir = Path(working_dir).resolve()
    if not workdir.is_dir():
        raise SubmitError(
            f"working dir {working_dir} is not a folder; pass --working-dir with the folder "
            "to upload (the one that holds the config and anything it names by relative path)"
        )
    config = Path(config_path).resolve()
    if not config.is_relative_to(workdir):
        raise SubmitError(
            f"config {config_path} is outside the working dir {workdir}, which is all the job "
            "sees; move the config into it, or pass --working-dir with a folder that holds "
            "the config"
        )
    config_rel = config.relative_to(workdir).as_posix()

    argv = ["mopd", "train", config_rel, *overrides]
    if resume:
        argv.append("--resume")
    if parent_run_id:
        argv += ["--parent-run-id", parent_run_id]

    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "excludes": [*EXCLUDES, *_output_dir_excludes(run, workdir)],
        "env_vars": {**DEFAULT_ENV_VARS, **_env_vars(env, run)},
    }
    if pip_requirements is not None:
        req = Path(pip_requirements)
        if not req.is_file():
            raise SubmitError(
                f"--pip-requirements {pip_requirements}: no such file; pass a pip "
                "requirements file, or leave the flag out to use the cluster's packages"
            )
        runtime_env["pip"] = str(req.resolve())  # Ray reads the file here, at submission
    return Submission(
        entrypoint=shlex.join(argv),
        runtime_env=runtime_env,
        metadata={"mopd_run": run.run.name, "mopd_config": config_rel},
    )


def _output_dir_excludes(run: RunConfig, workdir: Path) -> list[str]:
    # A relative output_dir is relative to the job's working dir on the cluster.
    out = Path(run.run.output_dir)
    out = (workdir / out).resolve() if not out.is_absolute() else out.resolve()
    if out == workdir or not out.is_relative_to(workdir):
        return []
    return [f"/{out.relative_to(workdir).as_posix()}/"]  # anchored: this folder only


def _env_vars(items: Sequence[str], run: RunConfig) -> dict[str, str]:
    secret_names = {run.scheduler.redis_password_env} - {None}
    # Values of the secrets in this environment, to catch `--env X=$MOPD_REDIS_PASSWORD`.
    secret_values = {
        v
        for k, v in os.environ.items()
        if (_SECRET_NAME.search(k) or k in secret_names) and len(v) >= _MIN_SECRET_LEN
    }
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise SubmitError(
                f"--env {item!r} is not of the form KEY=VALUE with KEY a variable name "
                "(e.g. --env HF_HUB_OFFLINE=1)"
            )
        if _SECRET_NAME.search(key) or key in secret_names or value in secret_values:
            raise SubmitError(
                f"--env {key}: looks like a secret, and the job's runtime env is stored in "
                "its record for anyone with dashboard access to read; set it in the "
                "environment of the cluster's nodes instead (the job inherits it)"
            )
        out[key] = value
    return out


def _warnings(run: RunConfig) -> list[str]:
    if Path(run.run.output_dir).is_absolute():
        return []
    return [
        f"run.output_dir ({run.run.output_dir}) is relative: on the cluster it lands in the "
        "job's temporary copy of the working dir, which Ray deletes; point it at shared "
        "storage for checkpoints you want to keep"
    ]


# ---------------------------------------------------------------------- the cluster
def resolve_address(address: str | None, run: RunConfig) -> str:
    """The job server to use: --address, $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, or an
    http(s) ``cluster.address``; never a guess."""
    for candidate in (
        address,
        os.environ.get(_API_ADDRESS_ENV),
        os.environ.get("RAY_ADDRESS"),
    ):
        if candidate:
            return candidate.rstrip("/")
    configured = run.cluster.address or ""
    if configured.startswith(("http://", "https://")):
        return configured.rstrip("/")
    raise SubmitError(
        "no Ray cluster to submit to: pass --address http://HEAD:8265 (the dashboard of "
        "the cluster's head node), set $RAY_ADDRESS to it, or set cluster.address to it "
        "in the config"
    )


def auth_headers() -> dict[str, str]:
    """The bearer-token header for the cluster, from Ray's own token loader; empty when
    ``RAY_AUTH_MODE=disabled`` or no token is set and auth was not asked for."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    from ray._raylet import AuthenticationTokenLoader  # the loader `ray get-auth-token` uses
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since it last looked
    try:
        has_token = loader.has_token(ignore_auth_mode=True)
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise SubmitError(
            f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')} cannot be read or "
            "is empty; point it at a file holding the cluster's token (`ray get-auth-token` "
            "on the head node prints it), or set RAY_AUTH_TOKEN"
        ) from None
    if not has_token:
        if mode == "token":
            raise SubmitError(_AUTH_FIX.format(what="RAY_AUTH_MODE=token but no token is set"))
        return {}
    return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"}


_AUTH_FIX = (
    "{what}: set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head "
    "node prints it) or RAY_AUTH_TOKEN_PATH to a file holding it; RAY_AUTH_MODE=disabled "
    "only for a cluster that runs without token auth"
)


def connect(address: str, headers: Mapping[str, str] | None = None) -> JobSubmissionClient:
    """A job client for ``address``; ``headers`` default to ``auth_headers()``.

    Raises:
        SubmitError: unreachable, not a Ray job server, or authentication refused.
    """
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = dict(auth_headers() if headers is None else headers)
    try:
        # Ray's client lets $RAY_API_SERVER_ADDRESS override its address argument; pin it to
        # the address chosen above so that --address wins over the environment.
        with scoped_env(**{_API_ADDRESS_ENV: address}):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        refused = f"the Ray cluster at {address} refused us ({_first_line(e)}; {_sent(headers)})"
        raise SubmitError(_AUTH_FIX.format(what=refused), EXIT_RUN_ERROR) from None
    except (ConnectionError, RuntimeError, ValueError, requests.RequestException) as e:
        raise SubmitError(
            f"cannot reach a Ray job server at {address}: {_first_line(e)}; pass the "
            "dashboard URL of the head node (http://HEAD:8265) and check that it is "
            "reachable from here",
            EXIT_RUN_ERROR,
        ) from None


def _sent(headers: Mapping[str, str]) -> str:
    # Which token went out, in the loader's order, so that a refusal says what to change.
    if not headers:
        return "no token was sent"
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if os.environ.get(var):
            return f"the token sent came from ${var}"
    return "the token sent came from ~/.ray/auth_token"


def submit(client: JobSubmissionClient, submission: Submission) -> str:
    """Upload the working dir and submit the job; its submission id."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            metadata=submission.metadata,
        )
    except AuthenticationError as e:
        raise SubmitError(
            _AUTH_FIX.format(what=f"the Ray cluster refused the job ({_first_line(e)})"),
            EXIT_RUN_ERROR,
        ) from None
    except (RuntimeError, ValueError, OSError, requests.RequestException) as e:
        raise SubmitError(f"the job server refused the job: {e}", EXIT_RUN_ERROR) from None


def follow(
    client: JobSubmissionClient, job_id: str, *, hints: str = "", out: TextIO | None = None
) -> int:
    """Stream the job's logs to ``out`` (stdout) until it ends; 0 if it SUCCEEDED, else 1.

    Ctrl-C stops the streaming only: the job keeps running, and ``hints`` (how to follow
    or stop it) is printed; returns 130 then.
    """
    out = out if out is not None else sys.stdout
    try:
        asyncio.run(_stream(client, job_id, out))
        status = _final_status(client, job_id)
        info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(f"\nmopd submit: stopped following job {job_id}; it keeps running.", file=sys.stderr)
        if hints:
            print(hints, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the stream or the server went away; the job may live on
        print(
            f"mopd submit: lost the connection to job {job_id} ({_first_line(e)}); it may "
            "still be running.",
            file=sys.stderr,
        )
        if hints:
            print(hints, file=sys.stderr)
        return EXIT_RUN_ERROR
    # The first line only: Ray appends the last logs, which were just streamed.
    message = f": {_first_line(info.message)}" if info.message else ""
    print(f"mopd submit: job {job_id} {status}{message}", file=sys.stderr)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_RUN_ERROR


async def _stream(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _final_status(client: JobSubmissionClient, job_id: str) -> str:
    # The log stream closes once the job is terminal; allow the record a moment to agree.
    deadline = time.monotonic() + _FINAL_STATUS_WAIT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        status = client.get_job_status(job_id)
    return str(status.value)


def _hints(address: str, job_id: str, *, token_sent: bool = False) -> str:
    # Ray's CLI sends a token only when RAY_AUTH_MODE=token (it does not look for one).
    prefix = "RAY_AUTH_MODE=token " if token_sent and not os.environ.get("RAY_AUTH_MODE") else ""
    return (
        f"  follow: {prefix}ray job logs --follow --address {address} {job_id}\n"
        f"  stop:   {prefix}ray job stop --address {address} {job_id}"
    )


def _first_line(what: object) -> str:
    text = str(what).strip()
    return text.splitlines()[0] if text else type(what).__name__
