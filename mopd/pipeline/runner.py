"""The pipeline runner: the stages one after another, under one parent MLflow run.

``run_pipeline`` opens the pipeline's parent MLflow run (or reopens it under ``--resume``),
builds the initial checkpoint (``init``), then runs each stage as one ``mopd.run.train`` run
in ``<pipeline.output_dir>/<stage>`` (in this process, or as a Ray job with
``executor: ray_job``), nested under the parent run by ``parent_run_id``. Each stage's model
feeds the next (SFT -> teachers -> MOPD). ``pipeline_state.json`` records the parent run and
what every stage produced, so ``--resume`` reopens the same parent run, skips done stages (a
stage is done when its ``model`` folder exists) and resumes the interrupted one from its last
checkpoint. At the end ``mopd.pipeline.report`` writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mopd.config import RunConfig
from mopd.config.pipeline import (
    PipelineConfig,
    Plan,
    stage_names,
    stage_run_config,
    teacher_of,
    to_yaml,
)
from mopd.io import write_json_atomic
from mopd.pipeline.report import write_results
from mopd.tracking import MODEL_URI_PREFIX, MLflowTracker, flatten

__all__ = ["PIPELINE_CONFIG", "STATE_FILE", "PipelineError", "StageResult", "run_pipeline"]

STATE_FILE = "pipeline_state.json"
PIPELINE_CONFIG = "pipeline_config.yaml"

log = logging.getLogger("mopd.pipeline")


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message says why and what to do."""


@dataclass
class StageResult:
    """What one stage produced."""

    stage: str
    model: str
    """The model reference later stages use: a registered models:/ URI, else a folder."""
    status: str
    """trained, resumed, done (completed earlier, skipped by --resume) or given (skipped by
    naming an existing model)."""


class _ReopenedRun(MLflowTracker):
    """An existing MLflow run reopened (the pipeline's parent run under ``--resume``), with
    the tracker's never-raise logging. It sets the state MLflowTracker's methods use instead
    of creating a run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._failures = {}
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # tracking must never take the pipeline down
            self._warn("reopen", e)
            self.client = None


def _parent_run(plan: Plan, run_id: str | None) -> MLflowTracker:
    """The pipeline's parent MLflow run: created on the first start, reopened by --resume."""
    if run_id is not None:
        return _ReopenedRun(plan.tracking_uri, run_id)
    return MLflowTracker(
        plan.tracking_uri,
        plan.base_run.tracking.experiment,
        plan.config.pipeline.name,
        artifact_location=plan.output_dir.resolve() / "mlartifacts",
        tags={"mopd.kind": "pipeline"},
    )


def run_pipeline(plan: Plan, *, resume: bool = False) -> dict[str, Any]:
    """Run every stage of ``plan`` (in this process, one after another), then write the
    results table and the plot. Returns the results (also written to results.json).

    Raises:
        PipelineError: the output folder holds an earlier pipeline and ``resume`` is off,
            or a stage failed (its message says which and how to resume).
    """
    from mopd.run import RunError

    cfg = plan.config
    out = plan.output_dir
    state_path = out / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and not resume:
        raise PipelineError(
            f"{out} already holds a pipeline; pass --resume to continue it, or choose another "
            "pipeline.output_dir / pipeline.name"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / PIPELINE_CONFIG).write_text(to_yaml(plan))
    parent = _parent_run(plan, state.get("parent_run_id"))
    state["parent_run_id"] = parent.run_id
    write_json_atomic(state_path, state, indent=1)
    if not state.get("params_logged"):
        parent.log_params(flatten(OmegaConf.to_container(OmegaConf.structured(cfg))))
        state["params_logged"] = True
    parent.log_artifact(out / PIPELINE_CONFIG)

    status = "FAILED"
    try:
        models: dict[str, str] = {"init": _init_model(plan)}
        results = []
        for stage in stage_names(cfg):
            res = _run_stage(plan, stage, models, resume=resume, parent_run_id=parent.run_id)
            models[stage] = res.model
            results.append(res)
            state.setdefault("stages", {})[stage] = dataclasses.asdict(res)
            write_json_atomic(state_path, state, indent=1)
        report = write_results(plan, results, parent)
        status = "FINISHED"
        return report
    except (RunError, FileNotFoundError) as e:
        raise PipelineError(f"{e}\n(resume with --resume once the cause is fixed)") from e
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.end(status)


def _init_model(plan: Plan) -> str:
    """The initial checkpoint: the configured one, or a tiny random model built once."""
    from mopd.models.tiny import build_tiny_checkpoint

    init = plan.config.init
    if init.model is not None:
        return init.model
    path = plan.output_dir / "init"
    if not (path / "config.json").exists():
        tiny = init.tiny
        texts = _tokenizer_texts(plan) if init.tokenizer == "data" else None
        log.info("building a tiny random %s model in %s", tiny.arch, path)
        build_tiny_checkpoint(
            path, tiny.arch, seed=plan.config.pipeline.seed, tokenizer_texts=texts, **tiny.config
        )
    return str(path)


def _tokenizer_texts(plan: Plan) -> list[str]:
    """Prompts and reference answers of the first ``init.tokenizer_samples`` training items of
    every source, drawn as the stages draw them (same seed)."""
    from mopd.scheduler.sources import build_source

    texts = []
    for src in plan.base_run.data.sources:
        source = build_source(src, seed=plan.config.pipeline.seed)
        for _ in range(plan.config.init.tokenizer_samples):
            item = source.next_item()
            texts.append(item.text)
            texts.append(item.answer or "")
    return texts


def _given_model(cfg: PipelineConfig, stage: str) -> str | None:
    if stage == "sft":
        return cfg.stages.sft.model
    if stage == "mopd":
        return cfg.stages.mopd.model
    return teacher_of(cfg, stage).model


def _run_stage(
    plan: Plan, stage: str, models: dict[str, str], *, resume: bool, parent_run_id: str | None
) -> StageResult:
    from mopd.run import RunPaths, train

    given = _given_model(plan.config, stage)
    if given is not None:
        log.info("stage %s: skipped, using the given model %s", stage, given)
        return StageResult(stage, given, "given")
    run = stage_run_config(plan, stage, models)
    paths = RunPaths(Path(run.run.output_dir))
    if (paths.model / "config.json").exists():
        log.info("stage %s: done earlier (%s)", stage, paths.model)
        return StageResult(stage, _produced_model(paths.root), "done")
    again = resume and paths.latest_checkpoint() is not None
    log.info("stage %s: %s run %s", stage, "resuming" if again else "starting", run.run.name)
    print(f"\n=== stage {stage}: {run.algorithm.loss} run {run.run.name} ===", flush=True)
    if plan.config.pipeline.executor == "ray_job":
        _submit_stage(plan, stage, run, resume=again, parent_run_id=parent_run_id)
    else:
        train(run, resume=again, parent_run_id=parent_run_id)
    if not (paths.model / "config.json").exists():
        raise PipelineError(
            f"stage {stage} stopped before its last step (interrupted?); run the pipeline "
            "again with --resume to continue it from its last checkpoint"
        )
    return StageResult(stage, _produced_model(paths.root), "resumed" if again else "trained")


def _submit_stage(
    plan: Plan, stage: str, run: RunConfig, *, resume: bool, parent_run_id: str | None
) -> None:
    """Run one stage as a Ray job (what ``mopd submit`` does) and wait for its end."""
    from mopd import submit as job
    from mopd.config import to_yaml as run_yaml

    p = plan.config.pipeline
    workdir = Path(p.working_dir).resolve()
    config = workdir / ".mopd-pipeline" / p.name / f"{stage}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(run_yaml(run))
    try:
        submission = job.build_submission(
            run,
            config,
            working_dir=workdir,
            resume=resume,
            parent_run_id=parent_run_id,
        )
        address = job.resolve_address(p.ray_address, run)
        client = job.connect(address)
        job_id = job.submit(client, submission)
    except job.SubmitError as e:
        raise PipelineError(f"stage {stage}: {e}") from None
    log.info("stage %s: Ray job %s on %s", stage, job_id, address)
    if job.follow(client, job_id) != job.EXIT_OK:
        raise PipelineError(
            f"stage {stage}: Ray job {job_id} did not succeed; fix the cause and run the "
            "pipeline again with --resume"
        )


def _produced_model(root: Path) -> str:
    registered = root / "registered_model.txt"
    if registered.exists():
        uri = registered.read_text().strip()
        if uri.startswith(MODEL_URI_PREFIX):
            return uri
    return str(root / "model")
