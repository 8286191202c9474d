"""``mopd submit`` against a real Ray head started for this module (loopback dashboard,
token auth on, its own ports and temp dir), never an existing cluster on this machine."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from mopd.config import load_config
from mopd.submit import (
    EXCLUDES,
    SubmitError,
    add_submit_parser,
    build_submission,
    connect,
    follow,
    resolve_address,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "mopd_tiny.yaml"  # a plain run config
RAY = shutil.which("ray")

pytestmark = [
    pytest.mark.skipif(RAY is None, reason="the ray CLI is not installed"),
    pytest.mark.timeout(240),
]


@dataclass(frozen=True)
class Cluster:
    address: str  # the dashboard (job server) URL
    token_file: Path


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short temp dir: Ray's unix sockets live under it and paths must stay < 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mopd-ray-"))
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    gcs, dash, client, agent_http, agent_grpc, node_mgr, obj_mgr, metrics, rt_env = _free_ports(9)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    }
    # Token auth on, as on a real cluster: the GCS and raylet listen on all interfaces.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    log = open(temp_dir / "head.log", "w")  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_env}",
            "--num-cpus=1",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, to tear down exactly what it started
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_server(address, token_file, head, temp_dir / "head.log")
        yield Cluster(address=address, token_file=token_file)
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(address: str, token_file: Path, head: subprocess.Popen, log: Path):
    headers = {"Authorization": f"Bearer {token_file.read_text()}"}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{address}/api/jobs/", headers=headers, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray job server at {address} did not come up:\n{log.read_text()[-3000:]}")


def _stop(head: subprocess.Popen) -> None:
    # Ray's workers (job supervisors, job drivers) start their own sessions, so the process
    # group alone misses them: take the tree of pids now, then stop the group, then them.
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    head.terminate()  # `ray start --block` stops what it started on SIGTERM...
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # ...and whatever lingers in its group goes now
    head.wait(timeout=10)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(tree, timeout=10)


@pytest.fixture(autouse=True)
def ray_env(request, monkeypatch):
    """Only this module's cluster and token: nothing inherited points elsewhere."""
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if "cluster" in request.fixturenames:
        cluster = request.getfixturevalue("cluster")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_file))


@pytest.fixture
def work(tmp_path: Path, monkeypatch) -> Path:
    """A working dir holding the quickstart config, made the current directory."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copy(QUICKSTART, root / "quickstart.yaml")
    monkeypatch.chdir(root)
    return root


def mopd_submit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mopd")
    add_submit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["submit", *argv])
    return args.func(args)


def _job_id(stderr: str) -> str:
    match = re.search(r"submitted job (\S+) to", stderr)
    assert match, stderr
    return match.group(1)


# ---------------------------------------------------------------------- against the cluster
def test_streams_the_logs_of_mopd_train_and_fails_with_its_error(cluster, work, capsys):
    out_dir = work / "out"
    rc = mopd_submit(
        "quickstart.yaml",
        "tracking.enabled=false",
        f"run.output_dir={out_dir}",
        "--address",
        cluster.address,
    )
    captured = capsys.readouterr()
    assert rc == 1, captured
    # the job's own output, streamed while it ran
    assert "Running entrypoint for job" in captured.out
    assert f"mopd train: model folder {out_dir}/models/sft does not exist" in captured.out
    job_id = _job_id(captured.err)
    assert f"job {job_id} FAILED" in captured.err
    info = connect(cluster.address).get_job_info(job_id)
    assert info.status == "FAILED"
    assert info.entrypoint == (
        f"mopd train quickstart.yaml tracking.enabled=false run.output_dir={out_dir}"
    )
    assert info.metadata["mopd_run"] == "quickstart"


def test_no_wait_prints_the_job_id_and_sends_no_secret(cluster, work, capsys, monkeypatch):
    redis_password = "redis-" + secrets.token_hex(8)
    hf_token = "hf_" + secrets.token_hex(8)
    monkeypatch.setenv("MOPD_REDIS_PASSWORD", redis_password)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    (work / "runs").mkdir()
    rc = mopd_submit(
        "quickstart.yaml",
        "tracking.enabled=false",
        f"run.output_dir={work / 'ckpt'}",
        "--address",
        cluster.address,
        "--env",
        "HF_HUB_OFFLINE=1",
        "--resume",
        "--no-wait",
    )
    captured = capsys.readouterr()
    assert rc == 0, captured
    job_id = captured.out.strip()
    assert job_id and captured.out == f"{job_id}\n"  # stdout is the id alone: scriptable
    assert f"ray job stop --address {cluster.address} {job_id}" in captured.err
    client = connect(cluster.address)
    try:
        info = client.get_job_info(job_id)
        assert info.entrypoint.startswith("mopd train quickstart.yaml ")
        assert info.entrypoint.endswith(" --resume")
        env = info.runtime_env
        assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        recorded = json.dumps(env)
        assert redis_password not in recorded and hf_token not in recorded
        assert "MOPD_REDIS_PASSWORD" not in recorded
        assert env["working_dir"].startswith("gcs://")  # uploaded, not a path on this machine
        assert "runs/" in env["excludes"] and "/ckpt/" in env["excludes"]
    finally:
        client.stop_job(job_id)


def test_follow_streams_a_job_to_the_end_and_returns_0_when_it_succeeds(cluster, capsys):
    client = connect(cluster.address)
    job_id = client.submit_job(entrypoint="echo first-line && echo second-line")
    rc = follow(client, job_id)
    captured = capsys.readouterr()
    assert rc == 0, captured
    assert captured.out.index("first-line") < captured.out.index("second-line")
    assert f"job {job_id} SUCCEEDED" in captured.err


def test_ctrl_c_stops_the_streaming_and_leaves_the_job_running(cluster):
    client = connect(cluster.address)
    job_id = client.submit_job(
        entrypoint="python -u -c \"import time; print('started'); time.sleep(120)\""
    )
    script = textwrap.dedent(
        f"""
        import sys
        from mopd.submit import connect, follow
        client = connect({cluster.address!r})
        sys.exit(follow(client, {job_id!r}, hints="  stop: ray job stop {job_id}"))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    follower = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "RAY_AUTH_TOKEN_PATH": str(cluster.token_file)},
        # As from a shell: Ctrl-C at its default whatever this test process inherited.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in follower.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if "started" in lines.get(timeout=1):
                    break
            except queue.Empty:
                assert follower.poll() is None, follower.stderr.read()
        else:
            pytest.fail("the job's output never reached the follower")
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=90)  # a loaded 2-core CI machine is slow
        assert follower.returncode == 130, err
        assert f"stopped following job {job_id}; it keeps running" in err
        assert f"ray job stop {job_id}" in err
        assert client.get_job_status(job_id) == "RUNNING"
    finally:
        if follower.poll() is None:
            follower.kill()
        client.stop_job(job_id)


def test_a_bad_config_exits_2_and_submits_nothing(cluster, work, capsys):
    client = connect(cluster.address)
    before = len(client.list_jobs())
    rc = mopd_submit("quickstart.yaml", "algorithm.eps_low=5", "--address", cluster.address)
    captured = capsys.readouterr()
    assert rc == 2
    assert "algorithm.eps_low" in captured.err
    assert len(client.list_jobs()) == before


def test_a_config_outside_the_working_dir_is_refused(cluster, work, tmp_path, capsys):
    client = connect(cluster.address)
    before = len(client.list_jobs())
    outside = tmp_path / "elsewhere.yaml"
    shutil.copy(QUICKSTART, outside)
    rc = mopd_submit(str(outside), "--address", cluster.address)
    captured = capsys.readouterr()
    assert rc == 2
    assert f"config {outside} is outside the working dir {work}" in captured.err
    assert "--working-dir" in captured.err
    assert len(client.list_jobs()) == before
    # the fix it names works: a working dir that holds the config
    sub = build_submission(load_config(outside), outside, working_dir=tmp_path)
    assert sub.entrypoint == "mopd train elsewhere.yaml"


def test_a_wrong_or_missing_token_says_what_to_set(cluster, work, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert mopd_submit("quickstart.yaml", "--address", cluster.address) == 1
    err = capsys.readouterr().err
    assert f"the Ray cluster at {cluster.address} refused us" in err
    assert "the token sent came from $RAY_AUTH_TOKEN" in err
    assert "set RAY_AUTH_TOKEN to the cluster's token" in err

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    assert mopd_submit("quickstart.yaml", "--address", cluster.address) == 1
    err = capsys.readouterr().err
    assert "no token was sent" in err and "RAY_AUTH_TOKEN_PATH" in err

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert mopd_submit("quickstart.yaml", "--address", cluster.address) == 2
    assert "RAY_AUTH_MODE=token but no token is set" in capsys.readouterr().err


def test_address_flag_wins_over_the_environment(cluster, monkeypatch):
    # Ray's client would otherwise take $RAY_ADDRESS over its argument.
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_free_ports(1)[0]}")
    run = load_config(QUICKSTART)
    assert resolve_address(cluster.address, run) == cluster.address
    client = connect(resolve_address(cluster.address, run))
    assert isinstance(client.list_jobs(), list)
    assert os.environ.get("RAY_API_SERVER_ADDRESS") is None  # the pin is undone


# ---------------------------------------------------------------------- local checks
def test_address_comes_from_flag_env_or_an_http_cluster_address(monkeypatch):
    run = load_config(QUICKSTART, ["cluster.address=http://head:8265/"])
    assert resolve_address(None, run) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    assert resolve_address(None, run) == "http://env-head:8265"
    assert resolve_address("https://flag-head:443", run) == "https://flag-head:443"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SubmitError, match="pass --address http://HEAD:8265"):
        resolve_address(None, load_config(QUICKSTART, ["cluster.address=auto"]))


def test_no_address_anywhere_exits_2(work, capsys):
    assert mopd_submit("quickstart.yaml") == 2
    assert "no Ray cluster to submit to" in capsys.readouterr().err


def test_env_flags_take_settings_and_refuse_secrets(work, monkeypatch):
    run = load_config(work / "quickstart.yaml")
    cfg = work / "quickstart.yaml"
    ok = build_submission(run, cfg, env=["TOKENIZERS_PARALLELISM=false", "MOPD_DATA_DIR=/d"])
    assert ok.runtime_env["env_vars"] == {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MOPD_DATA_DIR": "/d",
    }
    for secret in ("MOPD_REDIS_PASSWORD=x", "HF_TOKEN=hf_x", "AWS_SECRET_ACCESS_KEY=k"):
        with pytest.raises(SubmitError, match="looks like a secret"):
            build_submission(run, cfg, env=[secret])
    # the password variable the config names, whatever it is called
    custom = load_config(cfg, ["scheduler.redis_password_env=REDIS_PW"])
    with pytest.raises(SubmitError, match="REDIS_PW: looks like a secret"):
        build_submission(custom, cfg, env=["REDIS_PW=x"])
    # a secret's value copied under an innocent name
    monkeypatch.setenv("MOPD_REDIS_PASSWORD", "correct-horse-battery")
    with pytest.raises(SubmitError, match="CACHE_KEY: looks like a secret"):
        build_submission(run, cfg, env=["CACHE_KEY=correct-horse-battery"])
    with pytest.raises(SubmitError, match="KEY=VALUE"):
        build_submission(run, cfg, env=["NOVALUE"])


def test_entrypoint_quotes_overrides_and_pip_requirements_reach_ray(work):
    from ray.runtime_env import RuntimeEnv

    (work / "requirements.txt").write_text("pyyaml\nsafetensors>=0.4\n")
    cfg = work / "quickstart.yaml"
    overrides = ['rollout.sampling.stop=["</s>"]', "tracking.experiment=team a"]
    sub = build_submission(
        load_config(cfg, overrides), cfg, overrides, pip_requirements="requirements.txt"
    )
    assert sub.entrypoint == (
        "mopd train quickstart.yaml 'rollout.sampling.stop=[\"</s>\"]' 'tracking.experiment=team a'"
    )
    assert sub.metadata == {"mopd_run": "quickstart", "mopd_config": "quickstart.yaml"}
    # Ray reads the file at submission; what it will install:
    pip = RuntimeEnv(pip=sub.runtime_env["pip"]).pip_config()
    assert pip["packages"] == ["pyyaml", "safetensors>=0.4"]
    assert set(EXCLUDES) <= set(sub.runtime_env["excludes"])
    with pytest.raises(SubmitError, match=r"--pip-requirements nope\.txt: no such file"):
        build_submission(load_config(cfg), cfg, pip_requirements="nope.txt")


def test_a_pipeline_stage_job_names_its_parent_run_on_the_command_line(work):
    from mopd.cli import _parser

    cfg = work / "quickstart.yaml"
    sub = build_submission(load_config(cfg), cfg, resume=True, parent_run_id="0f3a9c")
    assert sub.entrypoint == "mopd train quickstart.yaml --resume --parent-run-id 0f3a9c"
    assert not any("PARENT" in k for k in sub.runtime_env["env_vars"])
    args = _parser().parse_args(shlex.split(sub.entrypoint)[1:])
    assert (args.config, args.resume, args.parent_run_id) == ("quickstart.yaml", True, "0f3a9c")
    assert _parser().parse_args(["train", "x.yaml"]).parent_run_id is None
