"""The MOPD loop end to end on this machine: a tiny MiMo-V2-Flash student, two teachers on two
domains, embedded engine servers on Ray, an embedded Redis, a local MLflow store.

- a short MOPD run trains, logs the metrics of design.md to MLflow, checkpoints, and resumes;
- kill -9 of the trainer process and of a rollout server mid-run: every produced sample is
  trained exactly once (none lost, none twice);
- async mode never trains a token staler than max_staleness.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mopd.config import load_config
from mopd.models.tiny import build_tiny_checkpoint
from mopd.run import RunError, train, trained_log, trained_sample_ids
from mopd.scheduler.redis_server import EmbeddedRedis, connect
from mopd.scheduler.stream import TrainingStream
from mopd.tracking import resolve_model

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: build_tiny_checkpoint(root / name, "mimo_v2_flash", seed=seed)
        for name, seed in (("student", 0), ("arith", 1), ("spell", 2))
    }


def write_config(path: Path, models: dict[str, Path], out: Path, **sections) -> Path:
    cfg = {
        "run": {"name": out.name, "output_dir": str(out), "seed": 3},
        "model": {"path": str(models["student"]), "dtype": "float32"},
        "rollout": {"max_running_requests": 32, "sampling": {"max_new_tokens": 5}},
        "teachers": [
            {"name": "arith", "model": str(models["arith"]), "domains": ["arithmetic"]},
            {"name": "spell", "model": str(models["spell"]), "domains": ["spelling"]},
        ],
        "data": {
            "sources": [
                {
                    "name": "sum",
                    "domain": "arithmetic",
                    "generator": "chain_sum",
                    "generator_args": {
                        "format": "compact",
                        "min_terms": 2,
                        "max_terms": 2,
                        "max_digits": 2,
                    },
                    "reward": "reasoning_gym",
                    "group_size": 4,
                    "num_eval_prompts": 4,
                    "dynamic_sampling": False,
                },
                {
                    "name": "rev",
                    "domain": "spelling",
                    "generator": "spell_backward",
                    "generator_args": {"format": "compact"},
                    "reward": "reasoning_gym",
                    "group_size": 4,
                    "num_eval_prompts": 4,
                    "dynamic_sampling": False,
                },
            ]
        },
        "algorithm": {"loss": "mopd"},
        "scheduler": {"prompts_per_step": 4, "max_inflight_groups": 8},
        "trainer": {"steps": 3, "lr": 1e-4, "checkpoint_every": 2, "micro_batch_tokens": 256},
        "cluster": {"num_cpus": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


def stream_state(out: Path, namespace: str) -> tuple[set[str], set[str], dict[str, int]]:
    """(published ids, trained ids, depth) from the run's persisted embedded Redis."""
    with EmbeddedRedis(out / "redis") as server:
        assert server.url is not None
        r = connect(server.url)
        stream = TrainingStream(r, namespace)
        published = {x.decode() for x in r.smembers(stream.published_key)}
        return published, stream.trained_ids(), stream.depth()


def test_mopd_run_logs_checkpoints_and_resumes(models, tmp_path: Path):
    out = tmp_path / "mopd-run"
    cfg_path = write_config(
        tmp_path / "run.yaml", models, out, tracking={"register_model": "tiny-student"}
    )
    train(load_config(cfg_path))

    assert (out / "resolved_config.yaml").is_file()
    assert sorted(
        p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")
    ) == [
        "step_00000002",
        "step_00000003",
    ]
    ids = trained_sample_ids(out)
    assert len(ids) == 3 * 4 * 4 and len(set(ids)) == len(ids)

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mopd").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    expected = [
        "loss",
        "grad_norm",
        "teacher_log_ratio",
        "teacher_log_ratio/arithmetic",
        "teacher_log_ratio/spelling",
        "masked_fraction",
        "train_rollout_k3",
        "route_agreement",
        "entropy",
        "rollout/reward/arithmetic",
        "rollout/reward/spelling",
        "rollout/response_length/arithmetic",
        "eval/accuracy/arithmetic",
        "eval/accuracy/spelling",
        "staleness/max",
        "queue/pending",
        "throughput/rollout_tokens_per_s",
        "time/rollout_s",
        "time/reward_s",
        "time/teacher_s",
        "time/train_s",
        "time/sync_s",
    ]
    missing = [k for k in expected if k not in metrics]
    assert not missing, missing
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    assert metrics["route_agreement"] == pytest.approx(
        1.0
    )  # R3: the trainer replays the engine's routes
    assert metrics["teacher_log_ratio"] < 0  # random teachers disagree with the student
    assert run.data.params["algorithm.loss"] == "mopd"
    assert "resolved_config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # The trained model is written in HF layout and registered for later configs to name.
    assert (out / "model" / "config.json").is_file()
    uri = (out / "registered_model.txt").read_text().strip()
    assert uri == "models:/tiny-student/1"
    local = resolve_model(uri, f"sqlite:///{out / 'mlflow.db'}", tmp_path / "cache")
    assert (local / "config.json").read_text() == (out / "model" / "config.json").read_text()

    # Starting again without --resume refuses to overwrite; with it, the run continues.
    with pytest.raises(RunError, match="--resume"):
        train(load_config(cfg_path))
    train(load_config(cfg_path, ["trainer.steps=5"]), resume=True)
    log = trained_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    ids = trained_sample_ids(out)
    assert len(ids) == 5 * 16 and len(set(ids)) == len(ids)
    published, trained, depth = stream_state(out, out.name)
    assert trained == set(ids) == published
    assert depth["pending"] == 0 and depth["undelivered"] == 0


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            tail = log.read_text()[-4000:]
            raise AssertionError(
                f"run exited ({proc.returncode}) while waiting for {what}:\n{tail}"
            )
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _steps(out: Path) -> int:
    return max((r["step"] for r in trained_log(out)), default=0)


def _pids(out: Path) -> dict:
    try:
        return json.loads((out / "logs" / "processes.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_killed_trainer_and_rollout_server_lose_no_sample_and_train_none_twice(
    models, tmp_path: Path
):
    out = tmp_path / "fault-run"
    cfg_path = write_config(
        tmp_path / "run.yaml", models, out, trainer={"steps": 14, "checkpoint_every": 3}
    )
    mopd = shutil.which("mopd")
    assert mopd is not None, "pip install -e . first"
    run_log = tmp_path / "run.log"
    with open(run_log, "w") as log_file:
        proc = subprocess.Popen(
            [mopd, "train", str(cfg_path)], stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            _wait(lambda: _steps(out) >= 4, 300, "step 4", proc, run_log)
            first = _pids(out)
            os.kill(first["trainer"], signal.SIGKILL)  # dies after its checkpoint at step 3
            _wait(
                lambda: _pids(out).get("trainer") not in (None, first["trainer"]),
                300,
                "trainer restart",
                proc,
                run_log,
            )
            after_restart = _steps(out)
            _wait(
                lambda: _steps(out) >= after_restart + 2,
                300,
                "progress after restart",
                proc,
                run_log,
            )
            os.kill(_pids(out)["rollout"][0], signal.SIGKILL)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "the trainer died" in text and "rollout servers are down" in text, text[-3000:]

    log = trained_log(out)
    assert [r["step"] for r in log] == list(
        range(1, 15)
    )  # the audit log holds committed steps only
    ids = trained_sample_ids(out)
    assert len(ids) == len(set(ids)), "a sample was trained twice"
    published, trained, depth = stream_state(out, out.name)
    assert trained == set(ids), "the stream's committed set and the audit log disagree"
    assert published == set(ids), f"{len(published - set(ids))} produced samples were never trained"
    assert depth == {"undelivered": 0, "pending": 0, "trained": len(ids)}


def test_async_mode_never_trains_staler_than_max_staleness(models, tmp_path: Path):
    out = tmp_path / "async-run"
    cfg_path = write_config(
        tmp_path / "run.yaml",
        models,
        out,
        scheduler={
            "mode": "async",
            "max_staleness": 1,
            "partial_rollout": True,
            "max_inflight_groups": 12,
        },
        rollout={"weight_sync": "tensor"},  # same-host handoff instead of safetensors on disk
        trainer={"steps": 6, "checkpoint_every": 3},
    )
    train(load_config(cfg_path))
    log = trained_log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    worst = 0
    for record in log:
        for oldest in record["oldest_token_versions"]:
            staleness = record["trained_at_version"] - oldest
            assert 0 <= staleness <= 1, record
            worst = max(worst, staleness)
    ids = trained_sample_ids(out)
    assert len(ids) == len(set(ids))
    # Rollout ran ahead of training: some samples were produced by an older policy.
    assert worst == 1


def test_sigint_checkpoints_and_stops_cleanly(models, tmp_path: Path):
    out = tmp_path / "sigint-run"
    cfg_path = write_config(
        tmp_path / "run.yaml", models, out, trainer={"steps": 200, "checkpoint_every": 100}
    )
    run_log = tmp_path / "run.log"
    with open(run_log, "w") as log_file:
        proc = subprocess.Popen(
            [shutil.which("mopd") or "mopd", "train", str(cfg_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait(lambda: _steps(out) >= 2, 300, "step 2", proc, run_log)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    assert proc.returncode == 0, run_log.read_text()[-3000:]
    stopped_at = _steps(out)
    assert 2 <= stopped_at < 200
    # The step it stopped at is checkpointed although checkpoint_every is 100.
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "COMMITTED").is_file()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mopd").experiment_id])
    assert run.info.status == "KILLED"


def test_a_teacher_that_stays_down_fails_the_run_with_its_name(models, tmp_path: Path):
    out = tmp_path / "teacher-down"
    cfg_path = write_config(tmp_path / "run.yaml", models, out, trainer={"steps": 200})
    data = yaml.safe_load(cfg_path.read_text())
    for t in data["teachers"]:
        t.update({"timeout_s": 5.0, "max_retries": 1})
    cfg_path.write_text(yaml.safe_dump(data))
    run_log = tmp_path / "run.log"
    with open(run_log, "w") as log_file:
        proc = subprocess.Popen(
            [shutil.which("mopd") or "mopd", "train", str(cfg_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait(lambda: _steps(out) >= 1, 300, "step 1", proc, run_log)
            os.kill(_pids(out)["teachers"]["spell"][0], signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    text = run_log.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "teacher 'spell' stayed down" in text, text[-3000:]
