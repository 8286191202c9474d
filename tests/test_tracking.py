"""MLflow tracking on a local sqlite store: what a run logs can be read back; registered
models resolve from models:/ URIs; an unreachable server costs warnings, not the run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mopd.tracking import (
    MLflowTracker,
    NullTracker,
    default_tracking_uri,
    flatten,
    resolve_model,
    sanitize_key,
)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return default_tracking_uri(tmp_path)


def test_run_logs_params_metrics_artifacts(tmp_path: Path, uri: str):
    t = MLflowTracker(uri, "exp", "run-a", artifact_location=tmp_path / "art")
    assert t.active and t.run_id
    t.log_params(flatten({"trainer": {"lr": 1e-6}, "teachers": [{"name": "m", "domains": ["x"]}]}))
    t.log_metrics({"loss": 0.5, "reward/arith metic": 1.0, "nan": float("nan")}, step=3)
    t.log_metrics({"loss": 0.25}, step=4)
    f = tmp_path / "plot.png"
    f.write_bytes(b"\x89PNG")
    t.log_artifact(f, "plots")
    t.end()
    c = MlflowClient(uri)
    run = c.get_run(t.run_id)
    assert run.data.params["trainer.lr"] == "1e-06"
    assert run.data.params["teachers.0.name"] == "m"
    assert run.info.status == "FINISHED"
    history = c.get_metric_history(t.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5), (4, 0.25)]
    assert "nan" not in run.data.metrics  # non-finite values are dropped, not sent
    assert run.data.metrics["reward/arith metic"] == 1.0
    assert [a.path for a in c.list_artifacts(t.run_id, "plots")] == ["plots/plot.png"]
    assert not t.failures


def test_child_run_under_parent(uri: str):
    parent = MLflowTracker(uri, "exp", "pipeline")
    child = MLflowTracker(uri, "exp", "stage-1", parent_run_id=parent.run_id)
    tags = MlflowClient(uri).get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id


def test_registered_model_resolves_from_uri(tmp_path: Path, uri: str):
    ckpt = tmp_path / "teacher"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "x"}')
    t = MLflowTracker(uri, "exp", "teacher-rl", artifact_location=tmp_path / "art")
    assert t.register_model(ckpt, "arith-teacher") == "models:/arith-teacher/1"
    assert t.register_model(ckpt, "arith-teacher") == "models:/arith-teacher/2"
    local = resolve_model("models:/arith-teacher/2", uri, tmp_path / "cache")
    assert (local / "config.json").read_text() == '{"model_type": "x"}'
    stamp = (local / "config.json").stat().st_mtime_ns
    assert resolve_model("models:/arith-teacher/2", uri, tmp_path / "cache") == local
    assert (local / "config.json").stat().st_mtime_ns == stamp  # served from the cache
    assert resolve_model(str(ckpt), None, tmp_path / "cache") == ckpt


def test_resolve_errors_are_clear(tmp_path: Path, uri: str):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"), None, tmp_path)
    with pytest.raises(ValueError, match="no tracking URI"):
        resolve_model("models:/x/1", None, tmp_path)
    MLflowTracker(uri, "exp", "r")  # creates the store
    with pytest.raises(FileNotFoundError, match="cannot fetch models:/nope/1"):
        resolve_model("models:/nope/1", uri, tmp_path / "c")


def test_unreachable_server_is_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING, logger="mopd.tracking"):
        t = MLflowTracker("http://127.0.0.1:9", "exp", "r")  # nothing listens on port 9
        t.log_metrics({"loss": 1.0}, step=0)
        t.end()
    assert not t.active
    assert t.failures == {"start": 1}
    assert "MLflow start failed" in caplog.text


def test_null_tracker_and_helpers():
    n = NullTracker()
    n.log_metrics({"a": 1.0}, 0)
    assert n.register_model(".", "x") is None
    assert sanitize_key("a{b}=c") == "a_b__c"
    assert flatten({"a": {"b": [1, 2]}}) == {"a.b": "[1, 2]"}
