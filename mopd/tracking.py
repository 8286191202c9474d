"""Experiment tracking in MLflow, which never takes a run down.

One MLflow run per job (a stage of a pipeline is a child run under the pipeline's parent
run). The tracker logs the resolved config (as flattened params and as an artifact), metrics
per step, artifacts (plots, checkpoints), and registers trained models (teachers) in the MLflow
model registry so later configs can name them as ``models:/name/version``.

Every call goes through ``MlflowClient`` with an explicit run id (no global "active run"
state), and every failure becomes a logged warning: a tracking server that goes away costs
metrics, never the training run (nanochat's null tracker, prime-rl's monitors).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("mopd.tracking")

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./: ]")
_MAX_PARAM_VALUE = 6000
MODEL_URI_PREFIX = "models:/"


class Tracker(Protocol):
    """What the driver logs to; implementations never raise."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def register_model(self, path: str | os.PathLike, name: str) -> str | None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking off: every call does nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def register_model(self, path: str | os.PathLike, name: str) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass


_PENDING_KEPT = 8  # asynchronous metric batches left uncollected at most


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """A local sqlite store inside the run's folder."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def sanitize_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / : `` and space; replace anything else."""
    return _BAD_KEY_CHARS.sub("_", key)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"trainer.lr": "1e-06", "teachers.0.name": ...}`` as strings."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flatten(v, key + ".")
        elif isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) for x in v):
            for i, item in enumerate(v):
                out |= flatten(item, f"{key}.{i}.")
        else:
            out[key] = str(v)[:_MAX_PARAM_VALUE]
    return out


class MLflowTracker:
    """An MLflow run; failures are warnings (the first of each kind, then every 100th)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        *,
        artifact_location: str | os.PathLike | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.run_id: str | None = None
        self._failures: dict[str, int] = {}
        self._pending: list[Any] = []  # asynchronous metric batches not yet collected
        self.tracking_uri = tracking_uri
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = Path(artifact_location).resolve().as_uri() if artifact_location else None
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
        except Exception as e:  # tracking must never take the run down
            self._warn("start", e)
            self.client = None

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _warn(self, what: str, err: BaseException) -> None:
        n = self._failures.get(what, 0) + 1
        self._failures[what] = n
        if n == 1 or n % 100 == 0:
            logger.warning("MLflow %s failed (%d time(s)); the run goes on: %s", what, n, err)

    @property
    def failures(self) -> dict[str, int]:
        return dict(self._failures)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import Param

            items = [Param(sanitize_key(k), str(v)[:_MAX_PARAM_VALUE]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        except Exception as e:
            self._warn("log_params", e)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [
                Metric(sanitize_key(k), float(v), now, step)
                for k, v in metrics.items()
                if v is not None and math.isfinite(float(v))
            ]
            self._collect_pending()
            for i in range(0, len(items), 1000):
                # Asynchronous: MLflow's logging thread writes the batch while the run goes
                # on (a step's ~100 metrics cost ~15 ms in a sqlite store); ``end`` waits.
                op = self.client.log_batch(
                    self.run_id, metrics=items[i : i + 1000], synchronous=False
                )
                if op is not None:
                    self._pending.append(op)
        except Exception as e:
            self._warn("log_metrics", e)

    def _collect_pending(self, wait: bool = False) -> None:
        """Collect earlier asynchronous batches, surfacing their failures as warnings: all of
        them when ``wait``, else all but the newest few (long done by now)."""
        keep = 0 if wait else _PENDING_KEPT
        while len(self._pending) > keep:
            try:
                self._pending.pop(0).wait()
            except Exception as e:
                self._warn("log_metrics", e)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)
        except Exception as e:
            self._warn("log_artifact", e)

    def register_model(self, path: str | os.PathLike, name: str) -> str | None:
        """Log a checkpoint folder as this run's artifact and register it; returns the
        ``models:/name/version`` URI, or None if tracking failed."""
        if not self.active:
            return None
        try:
            from mlflow.exceptions import MlflowException

            artifact_path = f"models/{sanitize_key(name)}"
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
            run = self.client.get_run(self.run_id)
            try:
                self.client.create_registered_model(name)
            except MlflowException as e:
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                    raise
            version = self.client.create_model_version(
                name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=self.run_id
            )
            return f"{MODEL_URI_PREFIX}{name}/{version.version}"
        except Exception as e:
            self._warn("register_model", e)
            return None

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        try:
            self._collect_pending(wait=True)  # every metric is in the store before the end
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            self._warn("end", e)


def resolve_model(uri_or_path: str, tracking_uri: str | None, cache_dir: str | os.PathLike) -> Path:
    """A local folder for a model reference: a path as is, a ``models:/name/version`` URI
    downloaded from the MLflow model registry into ``cache_dir``.

    Unlike logging, this raises: a teacher or student that cannot be found must stop the run
    before it starts, with the reason.
    """
    if not uri_or_path.startswith(MODEL_URI_PREFIX):
        path = Path(uri_or_path)
        if not path.exists():
            raise FileNotFoundError(f"model folder {path} does not exist")
        return path
    if tracking_uri is None:
        raise ValueError(f"{uri_or_path} is an MLflow model URI but no tracking URI is configured")
    import mlflow.artifacts
    from mlflow import MlflowClient

    name, _, version = uri_or_path.removeprefix(MODEL_URI_PREFIX).partition("/")
    if not name or not version.isdigit():
        raise ValueError(f"{uri_or_path} is not of the form models:/<name>/<version number>")
    dst = Path(cache_dir) / f"{sanitize_key(name)}-v{version}"
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        source = client.get_model_version_download_uri(name, version)
        cached = dst / source.rstrip("/").rsplit("/", 1)[-1]
        if (cached / "config.json").exists():  # registered versions are immutable
            return cached
        dst.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri
        )
    except Exception as e:
        raise FileNotFoundError(
            f"cannot fetch {uri_or_path} from MLflow at {tracking_uri}: {e}"
        ) from e
    return Path(local)
