"""``mopd train`` with its Redis killed mid-run (issue 20, item 7).

- The embedded Redis the run owns is restarted on its append-only file and the run goes on
  to the end: every sample trained once, the stream's trained set equal to the audit log,
  ``logs/processes.json`` naming the live Redis.
- An external Redis: the run ends with a clear error (exit status 1, no traceback) that names
  the Redis without its password, says that nothing acknowledged was lost and how to resume;
  the stream it leaves agrees with the audit log of the committed steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from mopd.models.tiny import build_tiny_checkpoint
from mopd.run import trained_sample_ids
from mopd.run.ledger import read_audit_log
from mopd.run.state import RunPaths
from mopd.scheduler.redis_server import EmbeddedRedis
from mopd.scheduler.stream import TrainingStream
from tests.run.conftest import sum_sft_config

pytestmark = pytest.mark.timeout(400)

PASSWORD = "kill-test-s3cret"


def _config(tmp_path: Path, out: Path, steps: int, **scheduler) -> Path:
    student = build_tiny_checkpoint(tmp_path / "student", "qwen3_moe", seed=0)
    cfg = sum_sft_config(
        out,
        student,
        run={"name": out.name, "output_dir": str(out), "eval_every": 0},
        rollout={"max_running_requests": 4, "sampling": {"max_new_tokens": 2}},
        scheduler={"prompts_per_step": 2, **scheduler},
        trainer={"steps": steps, "checkpoint_every": 1, "micro_batch_tokens": 64},
    )
    cfg["data"]["sources"][0]["num_eval_prompts"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_for_steps(proc: subprocess.Popen, out: Path, samples: int) -> None:
    deadline = time.monotonic() + 240
    while len(trained_sample_ids(out)) < samples:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def test_the_embedded_redis_killed_mid_run_is_restarted_and_the_run_goes_on(tmp_path: Path):
    out = tmp_path / "embedded-kill"
    path = _config(tmp_path, out, steps=8)
    processes = out / "logs" / "processes.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mopd.cli", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = []
    try:
        for step in (2, 4, 6):
            _wait_for_steps(proc, out, step * 4)
            pid = json.loads(processes.read_text())["redis"]
            assert pid not in killed
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert stderr.count("restarting it on its append-only file") == 3, stderr
    live = json.loads(processes.read_text())["redis"]
    assert live not in killed

    ids = trained_sample_ids(out)
    assert len(ids) == 8 * 4 and len(set(ids)) == len(ids)  # every step full, none twice
    with EmbeddedRedis(out / "redis", keep_alive=False) as server:
        stream = TrainingStream(redis.Redis.from_url(server.url), out.name)
        assert stream.trained_ids() == set(ids)
        assert stream.depth()["pending"] == 0


def test_an_external_redis_killed_mid_run_is_a_clear_error(tmp_path: Path):
    out = tmp_path / "redis-kill"
    # The user's Redis, played by a redis-server this test owns (never restarted by anyone),
    # on loopback TCP with a password.
    redis_dir = tmp_path / ("r" * 60) / ("s" * 60)
    server = EmbeddedRedis(redis_dir, keep_alive=False, extra_config=[f"requirepass {PASSWORD}"])
    server.start()
    assert server.url is not None and server.url.startswith("redis://127.0.0.1:")
    path = _config(tmp_path, out, steps=1000, redis_url=server.url)
    env = {**os.environ, "MOPD_REDIS_PASSWORD": PASSWORD}
    mopd = [sys.executable, "-m", "mopd.cli", "train", str(path)]
    proc = subprocess.Popen(
        mopd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        _wait_for_steps(proc, out, 3 * 4)  # three steps trained: mid-stream
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert PASSWORD not in stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("mopd train:")]
    assert f"lost the connection to the Redis at {server.url}" in line
    assert "Nothing acknowledged was lost" in line
    assert "mopd train <config> --resume" in line and str(out) in line
    assert len(line) < 1000

    # The Redis comes back on its append-only file: what it holds as trained is what the
    # committed checkpoints trained (the last one's commit may be left to --resume).
    latest = RunPaths(out.resolve()).latest_checkpoint()
    assert latest is not None
    step = int(latest.name.rsplit("_", 1)[1])
    records = [r for r in read_audit_log(out / "trained_samples.jsonl") if r["step"] <= step]
    committed = [sid for r in records for sid in r["samples"]]
    assert len(committed) == len(set(committed)) >= 3 * 4
    server.start()
    try:
        client = redis.Redis.from_url(server.url, password=PASSWORD)
        trained = TrainingStream(client, "redis-kill").trained_ids()
    finally:
        server.stop()
    assert trained <= set(committed)
    assert set(committed) - trained <= set(records[-1]["samples"])
