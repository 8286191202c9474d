"""The pipeline config: what ``mopd pipeline CONFIG`` reads, and the run config of each stage.

A pipeline config (a YAML file with a top-level ``stages`` section) names the pipeline and its
seed, the initial checkpoint (``init``), the run config every stage starts from (``base``)
and the three stages (``stages.sft``, ``stages.teachers``, ``stages.mopd``) with their
overrides. ``load_pipeline`` loads, overrides, resolves and validates it into a ``Plan``; it
also builds and validates every stage's run config (``stage_run_config``: ``base``, then the
stage's ``overrides``, then what the pipeline decides for that stage), so a bad stage fails
before the first stage starts. ``to_yaml`` writes the resolved pipeline config back.

Running the stages and reporting their results live in ``mopd.pipeline``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mopd.algo.stages import stage_for
from mopd.config.load import (
    MAX_CONFIG_BYTES,
    BadOverride,
    ConfigError,
    _error,
    _first_line,
    apply_override,
    read_tree,
    shape_problems,
    to_object,
)
from mopd.config.schema import RunConfig, TeacherConfig
from mopd.config.validate import (
    MAX_VALUE_CHARS,
    NAME_RULE,
    Registries,
    clip,
    model_ref_problem,
    name_ok,
    short,
    validate,
)

__all__ = [
    "EXECUTORS",
    "INIT_TOKENIZERS",
    "TEACHER_METHODS",
    "InitStage",
    "MopdStage",
    "PipelineConfig",
    "PipelineSection",
    "Plan",
    "SftStage",
    "StagesConfig",
    "StudentStage",
    "TeacherStage",
    "TinyModelConfig",
    "is_pipeline_config",
    "load_pipeline",
    "register_name",
    "stage_names",
    "stage_run_config",
    "teacher_of",
    "to_yaml",
]

TEACHER_METHODS = ("rl", "sft")
INIT_TOKENIZERS = ("data", "bytes")
EXECUTORS = ("local", "ray_job")


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
class StudentStage:
    """A stage that trains the student (SFT, MOPD); naming an existing model skips it."""

    model: str | None = None
    """Skip the stage and use this model as its student: the SFT student for stages.sft, the
    reported MOPD student for stages.mopd (folder or models:/ URI)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Run-config sections for this stage, merged onto ``base`` (e.g. {trainer: {steps: 400}})."""


@dataclass
class SftStage(StudentStage):
    """Stage 1: supervised fine-tuning of the student on the mixture of every domain."""


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
class MopdStage(StudentStage):
    """Stage 3: the SFT student distils every teacher at once (MOPD)."""


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
        """The MLflow store of the parent run and every stage: base.tracking.tracking_uri, else
        a sqlite file in the pipeline's folder. (The format of ``mopd.tracking``'s default
        store, spelled here because the config package imports nothing that imports MLflow.)"""
        uri = self.base_run.tracking.tracking_uri
        return uri or f"sqlite:///{self.output_dir.resolve() / 'mlflow.db'}"


def is_pipeline_config(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a pipeline config (it has a top-level ``stages`` section)."""
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            return False  # load_config refuses it, with the reason
        loaded = OmegaConf.load(path)
    except Exception:
        return False
    return isinstance(loaded, DictConfig) and "stages" in loaded


_NESTED = {
    (PipelineConfig, "base"): RunConfig,
    (StudentStage, "overrides"): RunConfig,
    (TeacherStage, "overrides"): RunConfig,
    (TeacherStage, "serving"): TeacherConfig,
}
"""The free-form sections of a pipeline config and the schema each follows."""


def load_pipeline(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    registries: Registries | None = None,
) -> Plan:
    """Load, override, resolve and validate a pipeline config, including the run config of
    every stage and the tiny initial model (so a bad stage fails before anything starts).

    ``registries``: the reward and generator names to check (``mopd.catalog.registries()``).

    Raises:
        ConfigError: with every problem found, each naming the field and the fix. Nothing
            else: any input, however broken, becomes a ConfigError.
    """
    source = str(path) if path is not None else None
    cfg = OmegaConf.structured(PipelineConfig)
    problems: list[str] = []
    if path is not None:
        tree = read_tree(Path(path))
        problems = shape_problems(tree, PipelineConfig, nested=_NESTED)
        if problems:
            raise ConfigError(problems, source)
        try:
            cfg = OmegaConf.merge(cfg, tree)
        except OmegaConfBaseException as e:
            raise ConfigError([_describe(e)], source) from None
        except Exception as e:
            raise ConfigError(
                [f"cannot merge the file onto the schema: {_error(e)}"], source
            ) from None
    for item in overrides:
        try:
            apply_override(cfg, item, PipelineConfig, _NESTED)
        except BadOverride as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems, source)
    assert isinstance(cfg, DictConfig)

    base = OmegaConf.structured(RunConfig)
    try:
        base = OmegaConf.merge(base, cfg.base)
    except OmegaConfBaseException as e:
        raise ConfigError([f"base.{_describe(e)}"], source) from None
    except Exception as e:
        raise ConfigError(
            [f"base: cannot merge it onto the run config: {_error(e)}"], source
        ) from None
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
        pcfg = to_object(cfg, source)
        base_run = to_object(base, source, prefix="base.")
    except ConfigError as e:
        raise ConfigError([*problems, *e.problems], source) from None
    assert isinstance(pcfg, PipelineConfig) and isinstance(base_run, RunConfig)
    plan = Plan(pcfg, base, base_run)
    problems += _check(plan, registries)
    if problems:
        raise ConfigError(problems, source)
    return plan


def _raw(node: DictConfig, key: str) -> Any:
    """The value at a dotted key as written (interpolations unresolved)."""
    tree: Any = OmegaConf.to_container(node, resolve=False)
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _check(plan: Plan, registries: Registries | None) -> list[str]:
    """Pipeline-level checks, then every stage's run config through ``mopd.config.validate``
    and the tiny initial model (``tiny_model_problems``)."""
    from mopd.models.tiny import ARCHS

    cfg = plan.config
    problems: list[str] = []
    if not name_ok(cfg.pipeline.name):
        problems.append(
            f"pipeline.name: bad name {short(cfg.pipeline.name)}; it prefixes every stage's "
            f"run name and folder: use {NAME_RULE}"
        )
    if not cfg.pipeline.output_dir.strip():
        problems.append("pipeline.output_dir: empty; name the pipeline's folder")
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
    for i, t in enumerate(cfg.stages.teachers):
        if t.register_as is not None and not name_ok(t.register_as):
            problems.append(
                f"stages.teachers[{i}].register_as: bad name {short(t.register_as)}; it "
                f"becomes models:/<name>/<version>: use {NAME_RULE}"
            )
    for ref_key, ref in _model_refs(cfg):
        if ref is not None and (problem := model_ref_problem(ref)) is not None:
            problems.append(f"{ref_key}: {problem}")
    if cfg.init.model is None and cfg.init.tiny.arch in ARCHS:
        problems += tiny_model_problems(
            cfg.init.tiny.arch, cfg.init.tiny.config, cfg.init.tokenizer
        )
    if problems:
        return problems
    for stage in stage_names(cfg):
        try:
            run = stage_run_config(plan, stage, {})
        except ConfigError as e:
            problems += e.problems
            continue
        problems += [
            f"{_stage_key(cfg, stage)} (run {run.run.name}): {p}" for p in validate(run, registries)
        ]
    return problems


_SIZE_FIELD = ("_size", "_dim", "_heads", "_layers", "experts", "experts_per_tok", "_embeddings")
"""Fields of a transformers config that count something: each must be >= 1."""
_MAX_CHECKED_PARAMS = 50_000_000
"""Tiny models up to this many parameters are built and run once on CPU when validated."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tiny_model_problems(arch: str, config: dict[str, Any], tokenizer: str) -> list[str]:
    """What is wrong with ``init.tiny.config`` (``_tiny_problems``), remembered per config:
    validating the same pipeline again builds no model."""
    try:
        key = json.dumps(config, sort_keys=True, default=repr)
    except (TypeError, ValueError):  # keys of mixed types: no cache
        return _tiny_problems(arch, config, tokenizer)
    return list(_tiny_problems_cached(arch, key, tokenizer))


@lru_cache(maxsize=64)
def _tiny_problems_cached(arch: str, config_json: str, tokenizer: str) -> tuple[str, ...]:
    return tuple(_tiny_problems(arch, json.loads(config_json), tokenizer))


def _tiny_problems(arch: str, config: dict[str, Any], tokenizer: str) -> list[str]:
    """What is wrong with ``init.tiny.config``: keys the architecture's transformers config
    does not have (a typo would be ignored silently), sizes below 1, and sizes that no model
    can have (transformers' own checks, then one forward pass of the built model on CPU, for
    models small enough; a model too big is built on the meta device only)."""
    import difflib

    import torch
    from transformers import AutoModelForCausalLM

    from mopd.models.tiny import VOCAB_SIZE, tiny_config

    key = "init.tiny.config"
    known = sorted(tiny_config(arch).to_dict())
    problems = []
    for name, value in config.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}.{clip(str(name), 60)}: not a field of the {arch} config{hint}")
        elif _is_int(value) and str(name).endswith(_SIZE_FIELD) and value < 1:
            problems.append(f"{key}.{name}: {value} must be >= 1")
    if "vocab_size" in config:
        if tokenizer == "data":
            problems.append(
                f"{key}.vocab_size: with init.tokenizer=data the vocabulary comes from the "
                "learned tokenizer; remove vocab_size"
            )
        elif isinstance(config["vocab_size"], int) and config["vocab_size"] < VOCAB_SIZE:
            problems.append(
                f"{key}.vocab_size: {config['vocab_size']} is smaller than the byte-level "
                f"tokenizer's {VOCAB_SIZE} ids; remove it or raise it"
            )
    if problems:
        return problems
    try:
        model_cfg = tiny_config(arch, **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_cfg)
        if sum(p.numel() for p in model.parameters()) <= _MAX_CHECKED_PARAMS:
            model = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.float32)
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.long))
    except Exception as e:
        return [
            f"{key}: no {arch} model has these sizes ({_error(e)}); check that the head counts "
            "divide each other, the layer lists match num_hidden_layers, and every size is > 0"
        ]
    return []


def _model_refs(cfg: PipelineConfig) -> Iterator[tuple[str, str | None]]:
    yield "init.model", cfg.init.model
    yield "stages.sft.model", cfg.stages.sft.model
    for i, t in enumerate(cfg.stages.teachers):
        yield f"stages.teachers[{i}].model", t.model
    yield "stages.mopd.model", cfg.stages.mopd.model


def stage_names(cfg: PipelineConfig) -> list[str]:
    """Stage ids in run order: sft, teacher-<domain>..., mopd."""
    return ["sft", *(f"teacher-{t.domain}" for t in cfg.stages.teachers), "mopd"]


def teacher_of(cfg: PipelineConfig, stage: str) -> TeacherStage:
    """The teacher entry of a ``teacher-<domain>`` stage id."""
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
        teacher = teacher_of(cfg, stage)
        overrides, loss, input_model = teacher.overrides, teacher.method, model_of("sft")

    node = OmegaConf.merge(plan.base, {})  # a copy that keeps the RunConfig schema
    try:
        node = OmegaConf.merge(node, overrides)
    except OmegaConfBaseException as e:
        raise ConfigError([f"{key}.overrides.{_describe(e)}"]) from None
    except Exception as e:
        raise ConfigError([f"{key}.overrides: cannot merge them onto base: {_error(e)}"]) from None
    node.run.name = f"{cfg.pipeline.name}-{stage}"
    node.run.output_dir = str(out / stage)
    node.run.seed = cfg.pipeline.seed
    node.model.path = input_model
    node.algorithm.loss = loss
    node.tracking.tracking_uri = plan.tracking_uri
    node.tracking.register_model = None
    if stage.startswith("teacher-"):
        teacher = teacher_of(cfg, stage)
        node.data.sources = [s for s in node.data.sources if s.domain == teacher.domain]
        node.tracking.register_model = register_name(cfg, teacher)
    kind = stage_for(loss)
    if not kind.generates:
        # SFT trains on the reference answers: one copy per prompt, no reward to filter on.
        for s in node.data.sources:
            s.group_size = 1
            s.dynamic_sampling = False
    node.teachers = _teacher_table(cfg, model_of) if kind.uses_teacher else []
    run = to_object(node, None, prefix=f"{key} (run {cfg.pipeline.name}-{stage}): ")
    assert isinstance(run, RunConfig)
    return run


def _teacher_table(cfg: PipelineConfig, model_of: Callable[[str], str]) -> list[DictConfig]:
    """The ``teachers`` of the MOPD run: one per domain, the model its stage produced, served
    as its ``serving`` section says."""
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
            teachers.append(OmegaConf.merge(OmegaConf.structured(TeacherConfig), fixed, t.serving))
        except OmegaConfBaseException as e:
            raise ConfigError([f"stages.teachers[{i}].serving.{_describe(e)}"]) from None
        except Exception as e:
            raise ConfigError([f"stages.teachers[{i}].serving: {_error(e)}"]) from None
    return teachers


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "<root>"
    return f"{key}: {clip(_first_line(e), MAX_VALUE_CHARS)}"


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
