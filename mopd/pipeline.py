"""The three-stage post-training pipeline of the MiMo-V2-Flash report, as one command.

``mopd pipeline CONFIG [key=value ...] [--resume]`` runs, one after another:

    init      the initial checkpoint: an existing model, or a tiny random MiMo-V2-Flash-style
              model built by the pipeline, with a character tokenizer learned from the
              sources' training texts (``init.tokenizer: data``) or a byte-level one
    sft       stage 1: the student learns the reference answers of every domain (a mixture)
    teachers  stage 2: one teacher per domain, trained from the SFT student on that domain
              only, by RL with the domain's outcome reward (GRPO-style, R3 on) or by SFT;
              each is registered in the MLflow model registry
    mopd      stage 3: the SFT student learns from all teachers at once (MOPD: per-domain
              teacher routing, reverse-KL teacher term plus alpha x ORM advantage, R3 on)

Each stage is one ``mopd.driver.train`` run (it starts and stops its own Ray, servers and
Redis) in ``<pipeline.output_dir>/<stage>``, with its own MLflow run nested under one parent
run of the pipeline, all in one tracking store. A stage's run config is the pipeline's
``base`` run config, then the stage's ``overrides``, then what the pipeline decides for that
stage (name, output folder, seed, input model, loss, the domain's sources, the teacher table).

A stage is done when its ``run.output_dir/model`` exists: ``--resume`` skips done stages and
resumes the interrupted one from its last checkpoint. Any stage can be skipped by naming an
existing model (``stages.sft.model``, ``stages.teachers[i].model``, ``stages.mopd.model``,
a folder or a ``models:/name/version`` URI).

At the end the pipeline reads the held-out accuracies back from the stages' MLflow runs and
writes, to its output folder and to the parent MLflow run: the results table (per domain:
SFT student, each teacher on its own domain, MOPD student, MOPD minus the best teacher) as
metrics, ``results.md`` and ``results.json``, and ``mopd_progress.png`` (per-domain accuracy
and teacher log-ratio over the MOPD steps). Every stage evaluates on the same held-out
prompts (they derive from the pipeline seed and the source names), so the columns compare
like with like.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mopd.config import ConfigError, RunConfig
from mopd.config.schema import TeacherConfig
from mopd.config.validate import validate
from mopd.tracking import MODEL_URI_PREFIX, MLflowTracker, default_tracking_uri, flatten

log = logging.getLogger("mopd.pipeline")

TEACHER_METHODS = ("rl", "sft")
INIT_TOKENIZERS = ("data", "bytes")
EXECUTORS = ("local", "ray_job")
STATE_FILE = "pipeline_state.json"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PLOT_PNG = "mopd_progress.png"
PIPELINE_CONFIG = "pipeline_config.yaml"
EXIT_CONFIG_ERROR = 2
EXIT_RUN_ERROR = 1


# ------------------------------------------------------------------------------ schema
@dataclass
class PipelineSection:
    """Identity and output folder of the pipeline."""

    name: str = "pipeline"
    """Pipeline name: prefix of every stage's run name and of the registered teacher names."""
    seed: int = 0
    """Seed of every stage (data order, sampling, held-out prompts) and of a tiny initial model."""
    output_dir: str = "runs/${pipeline.name}"
    """Folder of the pipeline: one sub-folder per stage, the MLflow store, the results."""
    executor: str = "local"
    """local: each stage runs in this process (starting and stopping its own local Ray);
    ray_job: each stage is a Ray job (``mopd submit``) on the cluster at ``ray_address``;
    output_dir must then be an absolute path on storage shared with this machine, and across
    several nodes base.tracking.tracking_uri should name an MLflow server."""
    ray_address: str | None = None
    """Job server of the cluster (http://HEAD:8265) for executor=ray_job; unset: $RAY_ADDRESS."""
    working_dir: str = "."
    """Folder uploaded with every stage job (executor=ray_job); the stage configs are written
    into it under ``.mopd-pipeline/<name>/``."""


@dataclass
class TinyModelConfig:
    """A tiny random model built by the pipeline as the initial checkpoint."""

    arch: str = "mimo_v2_flash"
    """Architecture (``mopd tiny-checkpoints --arch``): mimo_v2_flash, qwen3_moe, mixtral, llama."""
    config: dict[str, Any] = field(default_factory=dict)
    """transformers config fields replacing the tiny defaults (hidden_size, num_hidden_layers, ...)."""


@dataclass
class InitStage:
    """The initial checkpoint the SFT stage starts from."""

    model: str | None = None
    """An existing checkpoint (folder or models:/name/version); unset builds ``tiny``."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """The tiny random model to build when ``model`` is unset."""
    tokenizer: str = "data"
    """Tokenizer of the tiny model: data (a character vocabulary learned, with the tokenizers
    library, from the training texts of ``base.data.sources``) or bytes (byte-level, 259 ids)."""
    tokenizer_samples: int = 5000
    """Training items (prompt and reference answer) per source that the data tokenizer learns from."""


@dataclass
class SftStage:
    """Stage 1: supervised fine-tuning of the student on the mixture of every domain."""

    model: str | None = None
    """Skip the stage and use this model as the SFT student (folder or models:/ URI)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Run-config sections for this stage, merged onto ``base`` (e.g. {trainer: {steps: 400}})."""


@dataclass
class TeacherStage:
    """Stage 2, one domain: a teacher trained from the SFT student on that domain only."""

    domain: str = MISSING
    """The domain this teacher learns and later scores in MOPD (its sources come from ``base``)."""
    method: str = "rl"
    """rl (on-policy RL with the domain's outcome reward, GRPO-style, R3 on) or sft."""
    model: str | None = None
    """Skip the training and use this model as the teacher (folder or models:/ URI)."""
    register_as: str | None = None
    """Registered model name in MLflow; defaults to ``<pipeline.name>-teacher-<domain>``."""
    serving: dict[str, Any] = field(default_factory=dict)
    """How MOPD serves this teacher: ``teachers[i]`` fields of a run config other than name,
    model and domains (backend, num_servers, top_logprobs, timeout_s, server_args, ...)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Run-config sections for this teacher's run, merged onto ``base``."""


@dataclass
class MopdStage:
    """Stage 3: the SFT student distils every teacher at once (MOPD)."""

    model: str | None = None
    """Skip the stage and report this model as the MOPD student (folder or models:/ URI)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Run-config sections for the MOPD run, merged onto ``base``."""


@dataclass
class StagesConfig:
    """The three stages."""

    sft: SftStage = field(default_factory=SftStage)
    """Stage 1."""
    teachers: list[TeacherStage] = field(default_factory=list)
    """Stage 2: one entry per domain; every domain of ``base.data.sources`` needs one."""
    mopd: MopdStage = field(default_factory=MopdStage)
    """Stage 3."""


@dataclass
class PipelineConfig:
    """A whole pipeline: what ``mopd pipeline CONFIG`` reads."""

    pipeline: PipelineSection = field(default_factory=PipelineSection)
    """Name, seed and output folder."""
    init: InitStage = field(default_factory=InitStage)
    """The initial checkpoint."""
    base: dict[str, Any] = field(default_factory=dict)
    """The run config (RunConfig sections) every stage starts from (model dtype, rollout, data sources with their
    domains and rewards, scheduler, trainer, tracking, cluster). ``run.name``,
    ``run.output_dir``, ``run.seed``, ``model.path`` and ``teachers`` are set per stage by the
    pipeline; leave them out. Interpolations in it resolve inside the stage's run config
    (``${run.output_dir}`` is the stage's folder)."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """The stages and their overrides."""


# ------------------------------------------------------------------------------ loading
# The fields of ``base`` that the pipeline sets for every stage.
_PER_STAGE = {
    "run.name": "pipeline.name",
    "run.output_dir": "pipeline.output_dir",
    "run.seed": "pipeline.seed",
    "model.path": "init.model / stages.*.model",
    "teachers": "stages.teachers",
}
_PLACEHOLDER = "<set per stage by the pipeline>"


@dataclass(frozen=True)
class Plan:
    """A loaded pipeline: its config and the run config of every stage it would train."""

    config: PipelineConfig
    base: DictConfig
    """``base`` as a structured RunConfig node (interpolations still unresolved)."""
    base_run: RunConfig
    """``base`` resolved (with a placeholder model path): what the stages share."""

    @property
    def output_dir(self) -> Path:
        return Path(self.config.pipeline.output_dir)

    @property
    def tracking_uri(self) -> str:
        uri = self.base_run.tracking.tracking_uri
        return uri or default_tracking_uri(self.output_dir)


def is_pipeline_config(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a pipeline config (it has a top-level ``stages`` section)."""
    try:
        loaded = OmegaConf.load(path)
    except Exception:
        return False
    return isinstance(loaded, DictConfig) and "stages" in loaded


def load_pipeline(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Plan:
    """Load, override, resolve and validate a pipeline config, including the run config of
    every stage (so a bad stage fails before the first stage starts).

    Raises:
        ConfigError: with every problem found, each naming the field and the fix.
    """
    source = str(path) if path is not None else None
    cfg = OmegaConf.structured(PipelineConfig)
    problems: list[str] = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError([f"config file not found: {path}; pass a pipeline YAML"], source)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise ConfigError([_describe(e)], source) from None
        except Exception as e:  # YAML syntax
            raise ConfigError([f"not a valid YAML mapping: {_first_line(e)}"], source) from None
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            problems.append(
                f"override '{item}' is not of the form key=value (e.g. pipeline.seed=1)"
            )
            continue
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key.strip())
            if isinstance(value, DictConfig) or OmegaConf.is_list(value):
                value = OmegaConf.to_container(value)
            OmegaConf.update(cfg, key.strip(), value, merge=True)
        except OmegaConfBaseException as e:
            problems.append(f"override '{item}': {_describe(e)}")
    if problems:
        raise ConfigError(problems, source)
    assert isinstance(cfg, DictConfig)

    base = OmegaConf.structured(RunConfig)
    try:
        base = OmegaConf.merge(base, cfg.base)
    except OmegaConfBaseException as e:
        raise ConfigError([f"base.{_describe(e)}"], source) from None
    defaults = OmegaConf.structured(RunConfig)
    for key, owner in _PER_STAGE.items():
        if key == "model.path":
            given = not OmegaConf.is_missing(base.model, "path")
        else:
            given = _raw(base, key) != _raw(defaults, key)
        if given:
            problems.append(
                f"base.{key}: set per stage by the pipeline (from {owner}); remove it from base"
            )
    base.model.path = _PLACEHOLDER
    try:
        pcfg = OmegaConf.to_object(cfg)
        base_run = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        raise ConfigError([*problems, _describe(e)], source) from None
    assert isinstance(pcfg, PipelineConfig) and isinstance(base_run, RunConfig)
    plan = Plan(pcfg, base, base_run)
    problems += _check(plan)
    if problems:
        raise ConfigError(problems, source)
    return plan


def _raw(node: DictConfig, key: str) -> Any:
    """The value at a dotted key as written (interpolations unresolved)."""
    tree: Any = OmegaConf.to_container(node, resolve=False)
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _check(plan: Plan) -> list[str]:
    """Pipeline-level checks, then every stage's run config through ``mopd.config.validate``."""
    from mopd.models.tiny import ARCHS

    cfg = plan.config
    problems: list[str] = []
    if not cfg.pipeline.name.strip():
        problems.append("pipeline.name: empty; name the pipeline")
    if cfg.init.model is None and cfg.init.tokenizer not in INIT_TOKENIZERS:
        problems.append(
            f"init.tokenizer: bad value {cfg.init.tokenizer!r}; accepted: "
            f"{', '.join(INIT_TOKENIZERS)}"
        )
    if cfg.init.model is None and cfg.init.tokenizer_samples < 1:
        problems.append(
            f"init.tokenizer_samples: {cfg.init.tokenizer_samples} must be >= 1 (training "
            "items per source the data tokenizer learns from)"
        )
    if cfg.init.model is None and cfg.init.tiny.arch not in ARCHS:
        problems.append(
            f"init.tiny.arch: bad value {cfg.init.tiny.arch!r}; accepted: {', '.join(ARCHS)}"
        )
    if cfg.pipeline.executor not in EXECUTORS:
        problems.append(
            f"pipeline.executor: bad value {cfg.pipeline.executor!r}; accepted: "
            f"{', '.join(EXECUTORS)}"
        )
    if cfg.pipeline.executor == "ray_job" and not Path(cfg.pipeline.output_dir).is_absolute():
        problems.append(
            f"pipeline.output_dir: {cfg.pipeline.output_dir} is relative, but with "
            "executor=ray_job every stage writes it on the cluster: use an absolute path "
            "on storage shared with this machine"
        )
    if not plan.base_run.tracking.enabled:
        problems.append(
            "base.tracking.enabled: the pipeline reads its results table from MLflow; set it true"
        )
    domains = list(dict.fromkeys(s.domain for s in plan.base_run.data.sources))
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.stages.teachers):
        key = f"stages.teachers[{i}]"
        if t.method not in TEACHER_METHODS:
            problems.append(
                f"{key}.method: bad value {t.method!r}; accepted: {', '.join(TEACHER_METHODS)}"
            )
        if t.domain not in domains:
            problems.append(
                f"{key}.domain: {t.domain!r} is not a domain of base.data.sources "
                f"(domains: {', '.join(domains) or 'none'})"
            )
        elif t.domain in seen:
            problems.append(
                f"{key}.domain: {t.domain!r} already has a teacher (stages.teachers"
                f"[{seen[t.domain]}]); one teacher per domain"
            )
        seen.setdefault(t.domain, i)
    missing = [d for d in domains if d not in seen]
    if missing and cfg.stages.mopd.model is None:
        problems.append(
            f"stages.teachers: no teacher for domain(s) {', '.join(missing)}; MOPD needs one "
            "per domain: add {domain: ..., method: rl|sft}"
        )
    for ref_key, ref in _model_refs(cfg):
        if ref is not None and not ref.strip():
            problems.append(f"{ref_key}: empty; name a folder or a models:/name/version URI")
    if problems:
        return problems
    for stage in stage_names(cfg):
        try:
            run = stage_run_config(plan, stage, {})
        except ConfigError as e:
            problems += e.problems
            continue
        problems += [f"{_stage_key(cfg, stage)} (run {run.run.name}): {p}" for p in validate(run)]
    return problems


def _model_refs(cfg: PipelineConfig) -> Iterator[tuple[str, str | None]]:
    yield "init.model", cfg.init.model
    yield "stages.sft.model", cfg.stages.sft.model
    for i, t in enumerate(cfg.stages.teachers):
        yield f"stages.teachers[{i}].model", t.model
    yield "stages.mopd.model", cfg.stages.mopd.model


def stage_names(cfg: PipelineConfig) -> list[str]:
    """Stage ids in run order: sft, teacher-<domain>..., mopd."""
    return ["sft", *(f"teacher-{t.domain}" for t in cfg.stages.teachers), "mopd"]


def _teacher(cfg: PipelineConfig, stage: str) -> TeacherStage:
    return next(t for t in cfg.stages.teachers if f"teacher-{t.domain}" == stage)


def _stage_key(cfg: PipelineConfig, stage: str) -> str:
    if stage.startswith("teacher-"):
        i = next(i for i, t in enumerate(cfg.stages.teachers) if f"teacher-{t.domain}" == stage)
        return f"stages.teachers[{i}]"
    return f"stages.{stage}"


def register_name(cfg: PipelineConfig, teacher: TeacherStage) -> str:
    return teacher.register_as or f"{cfg.pipeline.name}-teacher-{teacher.domain}"


def stage_run_config(plan: Plan, stage: str, models: dict[str, str]) -> RunConfig:
    """The run config of one stage: base <- the stage's overrides <- the pipeline's settings.

    ``models`` maps stage ids to the model references produced so far ("init", "sft",
    "teacher-<domain>"); missing ones get their planned output folder (validation only).
    """
    cfg = plan.config
    out = plan.output_dir
    key = _stage_key(cfg, stage)

    def model_of(name: str) -> str:
        return models.get(name) or str(out / name / "model")

    if stage == "sft":
        overrides, loss, input_model = cfg.stages.sft.overrides, "sft", model_of("init")
    elif stage == "mopd":
        overrides, loss, input_model = cfg.stages.mopd.overrides, "mopd", model_of("sft")
    else:
        teacher = _teacher(cfg, stage)
        overrides, loss, input_model = teacher.overrides, teacher.method, model_of("sft")

    node = OmegaConf.merge(plan.base, {})  # a copy that keeps the RunConfig schema
    try:
        node = OmegaConf.merge(node, overrides)
    except OmegaConfBaseException as e:
        raise ConfigError([f"{key}.overrides.{_describe(e)}"]) from None
    node.run.name = f"{cfg.pipeline.name}-{stage}"
    node.run.output_dir = str(out / stage)
    node.run.seed = cfg.pipeline.seed
    node.model.path = input_model
    node.algorithm.loss = loss
    node.tracking.tracking_uri = plan.tracking_uri
    node.tracking.register_model = None
    if stage.startswith("teacher-"):
        teacher = _teacher(cfg, stage)
        node.data.sources = [s for s in node.data.sources if s.domain == teacher.domain]
        node.tracking.register_model = register_name(cfg, teacher)
    if loss == "sft":
        # SFT trains on the reference answers: one copy per prompt, no reward to filter on.
        for s in node.data.sources:
            s.group_size = 1
            s.dynamic_sampling = False
    if stage == "mopd":
        teachers = []
        for i, t in enumerate(cfg.stages.teachers):
            fixed = {
                "name": f"teacher-{t.domain}",
                "model": model_of(f"teacher-{t.domain}"),
                "domains": [t.domain],
            }
            clash = sorted(set(t.serving) & set(fixed))
            if clash:
                raise ConfigError(
                    [f"stages.teachers[{i}].serving.{clash[0]}: set by the pipeline; remove it"]
                )
            try:
                teachers.append(
                    OmegaConf.merge(OmegaConf.structured(TeacherConfig), fixed, t.serving)
                )
            except OmegaConfBaseException as e:
                raise ConfigError([f"stages.teachers[{i}].serving.{_describe(e)}"]) from None
        node.teachers = teachers
    else:
        node.teachers = []
    try:
        run = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError([f"{key}.overrides: {_describe(e)}"]) from None
    assert isinstance(run, RunConfig)
    return run


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "<root>"
    return f"{key}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = getattr(e, "msg", None) or str(e)
    return str(text).splitlines()[0] if text else type(e).__name__


def to_yaml(plan: Plan) -> str:
    """The resolved pipeline config as YAML; it loads again as the same pipeline."""
    tree = OmegaConf.to_container(OmegaConf.structured(plan.config), resolve=True)
    assert isinstance(tree, dict)
    base = OmegaConf.to_container(plan.base, resolve=True)
    assert isinstance(base, dict)
    # The per-stage fields are the pipeline's: leave them out so the file loads again.
    for key in _PER_STAGE:
        section, _, leaf = key.rpartition(".")
        (base[section] if section else base).pop(leaf, None)
    tree["base"] = base
    return OmegaConf.to_yaml(OmegaConf.create(tree))


# ------------------------------------------------------------------------------ running
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
    from mopd.driver import RunError

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
    _write_state(state_path, state)
    if not state.get("params_logged"):
        parent.log_params(flatten(OmegaConf.to_container(OmegaConf.structured(cfg))))
        state["params_logged"] = True
    parent.log_artifact(out / PIPELINE_CONFIG)

    status = "FAILED"
    try:
        with _env("MOPD_PARENT_RUN_ID", parent.run_id):
            models: dict[str, str] = {"init": _init_model(plan)}
            results = []
            for stage in stage_names(cfg):
                res = _run_stage(plan, stage, models, resume=resume)
                models[stage] = res.model
                results.append(res)
                state.setdefault("stages", {})[stage] = dataclasses.asdict(res)
                _write_state(state_path, state)
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


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _env(key: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


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
    return _teacher(cfg, stage).model


def _run_stage(plan: Plan, stage: str, models: dict[str, str], *, resume: bool) -> StageResult:
    from mopd.driver import _latest, train

    given = _given_model(plan.config, stage)
    if given is not None:
        log.info("stage %s: skipped, using the given model %s", stage, given)
        return StageResult(stage, given, "given")
    run = stage_run_config(plan, stage, models)
    root = Path(run.run.output_dir)
    if (root / "model" / "config.json").exists():
        log.info("stage %s: done earlier (%s)", stage, root / "model")
        return StageResult(stage, _produced_model(root), "done")
    again = resume and _latest(root / "checkpoints") is not None
    log.info("stage %s: %s run %s", stage, "resuming" if again else "starting", run.run.name)
    print(f"\n=== stage {stage}: {run.algorithm.loss} run {run.run.name} ===", flush=True)
    if plan.config.pipeline.executor == "ray_job":
        _submit_stage(plan, stage, run, resume=again)
    else:
        train(run, resume=again)
    if not (root / "model" / "config.json").exists():
        raise PipelineError(
            f"stage {stage} stopped before its last step (interrupted?); run the pipeline "
            "again with --resume to continue it from its last checkpoint"
        )
    return StageResult(stage, _produced_model(root), "resumed" if again else "trained")


def _submit_stage(plan: Plan, stage: str, run: RunConfig, *, resume: bool) -> None:
    """Run one stage as a Ray job (what ``mopd submit`` does) and wait for its end."""
    from mopd import submit as job
    from mopd.config import to_yaml as run_yaml

    p = plan.config.pipeline
    workdir = Path(p.working_dir).resolve()
    config = workdir / ".mopd-pipeline" / p.name / f"{stage}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(run_yaml(run))
    parent = os.environ.get("MOPD_PARENT_RUN_ID")
    try:
        submission = job.build_submission(
            run,
            config,
            working_dir=workdir,
            resume=resume,
            env=[f"MOPD_PARENT_RUN_ID={parent}"] if parent else [],
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


# ------------------------------------------------------------------------------ results
def _stage_histories(
    client: Any, experiment_id: str, parent_id: str, run_name: str
) -> dict[str, list[tuple[int, float]]]:
    """Metric histories of a stage, over every MLflow run it had (a resumed stage has one
    run per attempt), sorted by step; a later attempt wins at the same step."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
        f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time ASC"],
    )
    merged: dict[str, dict[int, float]] = {}
    for run in runs:
        for key in run.data.metrics:
            if not key.startswith(("eval/accuracy/", "teacher_log_ratio/")):
                continue
            for m in client.get_metric_history(run.info.run_id, key):
                merged.setdefault(key, {})[int(m.step)] = float(m.value)
    return {k: sorted(v.items()) for k, v in merged.items()}


def _final(hist: dict[str, list[tuple[int, float]]], domain: str) -> float | None:
    series = hist.get(f"eval/accuracy/{domain}")
    return series[-1][1] if series else None


def _first(hist: dict[str, list[tuple[int, float]]], domain: str) -> float | None:
    series = hist.get(f"eval/accuracy/{domain}")
    return series[0][1] if series and series[0][0] == 0 else None


def write_results(plan: Plan, results: Sequence[StageResult], parent: MLflowTracker) -> dict:
    """Build the results table from the stages' MLflow runs; print it, write results.md,
    results.json and the MOPD plot, and log them (and the table as metrics) to the parent."""
    from mlflow import MlflowClient

    cfg = plan.config
    out = plan.output_dir
    client = MlflowClient(tracking_uri=plan.tracking_uri, registry_uri=plan.tracking_uri)
    exp = client.get_experiment_by_name(plan.base_run.tracking.experiment)
    domains = list(dict.fromkeys(s.domain for s in plan.base_run.data.sources))
    hist = {
        r.stage: _stage_histories(
            client, exp.experiment_id, parent.run_id, f"{cfg.pipeline.name}-{r.stage}"
        )
        if exp is not None and parent.run_id
        else {}
        for r in results
    }
    rows: dict[str, dict[str, float | None]] = {}
    # The SFT student: its own stage's final eval, or (stage skipped) the MOPD stage's
    # step-0 eval, which evaluates the same model on the same prompts.
    rows["sft"] = {
        d: _final(hist["sft"], d) if _final(hist["sft"], d) is not None else _first(hist["mopd"], d)
        for d in domains
    }
    for t in cfg.stages.teachers:
        stage = f"teacher-{t.domain}"
        rows[stage] = {d: (_final(hist[stage], d) if d == t.domain else None) for d in domains}
    rows["mopd"] = {d: _final(hist["mopd"], d) for d in domains}
    best = {
        d: max(
            (
                rows[f"teacher-{t.domain}"][d]
                for t in cfg.stages.teachers
                if t.domain == d and rows[f"teacher-{t.domain}"][d] is not None
            ),
            default=None,
        )
        for d in domains
    }
    delta = {
        d: rows["mopd"][d] - best[d]
        if rows["mopd"][d] is not None and best[d] is not None
        else None
        for d in domains
    }
    report = {
        "domains": domains,
        "accuracy": rows,
        "best_teacher": best,
        "mopd_minus_best_teacher": delta,
        "models": {r.stage: r.model for r in results},
        "stage_status": {r.stage: r.status for r in results},
    }
    table = format_table(report)
    print("\n" + table, flush=True)
    (out / RESULTS_MD).write_text(table + "\n")
    (out / RESULTS_JSON).write_text(json.dumps(report, indent=1) + "\n")
    metrics = {
        f"result/{model}/{d}": v
        for model, row in rows.items()
        for d, v in row.items()
        if v is not None
    }
    metrics |= {f"result/mopd_minus_best_teacher/{d}": v for d, v in delta.items() if v is not None}
    parent.log_metrics(metrics, step=0)
    parent.log_artifact(out / RESULTS_MD)
    parent.log_artifact(out / RESULTS_JSON)
    plot = plot_mopd(hist.get("mopd", {}), domains, rows, out / PLOT_PNG)
    if plot is not None:
        parent.log_artifact(plot)
        report["plot"] = str(plot)
    return report


def format_table(report: dict) -> str:
    """The results as a Markdown table: one row per model, one column per domain (held-out
    greedy accuracy), then MOPD minus the best teacher of each domain."""
    domains = report["domains"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def signed(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.1f} pt"

    header = "| model | " + " | ".join(domains) + " |"
    lines = [header, "|" + "---|" * (len(domains) + 1)]
    names = {"sft": "SFT student", "mopd": "MOPD student"}
    for model, row in report["accuracy"].items():
        label = names.get(model, model.replace("teacher-", "teacher: "))
        lines.append(f"| {label} | " + " | ".join(cell(row[d]) for d in domains) + " |")
    lines.append(
        "| MOPD - best teacher | "
        + " | ".join(signed(report["mopd_minus_best_teacher"][d]) for d in domains)
        + " |"
    )
    return "\n".join(lines)


def plot_mopd(
    hist: dict[str, list[tuple[int, float]]],
    domains: Sequence[str],
    rows: dict[str, dict[str, float | None]],
    path: Path,
) -> Path | None:
    """Per-domain held-out accuracy (with the teachers' and the SFT student's as dashed
    lines) and teacher log-ratio over the MOPD steps; None if the MOPD stage logged nothing."""
    if not hist:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, d in enumerate(domains):
        color = f"C{i}"
        series = hist.get(f"eval/accuracy/{d}", [])
        if series:
            acc_ax.plot(*zip(*series), marker="o", color=color, label=f"{d}: MOPD student")
        teacher = rows.get(f"teacher-{d}", {}).get(d)
        if teacher is not None:
            acc_ax.axhline(teacher, color=color, linestyle="--", label=f"{d}: teacher")
        ratio = hist.get(f"teacher_log_ratio/{d}", [])
        if ratio:
            kl_ax.plot(*zip(*ratio), color=color, label=d)
    acc_ax.set(xlabel="MOPD step", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02))
    acc_ax.set_title("accuracy per domain")
    acc_ax.legend(fontsize=8)
    kl_ax.set(xlabel="MOPD step", ylabel="mean log p_teacher - log p_student")
    kl_ax.set_title("teacher log-ratio per domain (-> 0: student matches)")
    kl_ax.axhline(0.0, color="grey", linewidth=0.5)
    kl_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ CLI
_OVERRIDES_HELP = (
    "overrides in OmegaConf dot-list syntax, e.g. pipeline.seed=1 "
    "stages.sft.overrides.trainer.steps=50 stages.teachers.0.method=sft"
)


def add_pipeline_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mopd pipeline`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "pipeline",
        help="run SFT -> domain teachers -> MOPD as one pipeline and report the results",
        description="Validate the pipeline CONFIG (every stage's run config included), then run "
        "its stages in this process: SFT of the student, one teacher per domain (RL or SFT, "
        "registered in MLflow), and MOPD of the SFT student from all teachers. Prints and logs "
        "a table of held-out accuracy per domain and a plot of the MOPD run.",
    )
    p.add_argument("config", help="YAML pipeline config (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip completed stages and resume the interrupted one from its last checkpoint",
    )
    p.set_defaults(func=cmd_pipeline)
    return p


def cmd_pipeline(args: argparse.Namespace) -> int:
    try:
        plan = load_pipeline(args.config, args.overrides)
    except ConfigError as e:
        print(f"mopd pipeline: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_pipeline(plan, resume=args.resume)
    except PipelineError as e:
        print(f"mopd pipeline: {e}", file=sys.stderr)
        return EXIT_RUN_ERROR
    return 0


def cmd_validate_pipeline(config: str, overrides: Sequence[str]) -> int:
    """``mopd validate`` of a pipeline config: print it resolved, or every problem."""
    try:
        plan = load_pipeline(config, overrides)
    except ConfigError as e:
        print(f"mopd validate: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(to_yaml(plan), end="")
    return 0


__all__ = [
    "PipelineConfig",
    "PipelineError",
    "Plan",
    "add_pipeline_parser",
    "is_pipeline_config",
    "load_pipeline",
    "run_pipeline",
    "stage_run_config",
]
