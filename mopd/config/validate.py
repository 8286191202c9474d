"""Cross-field checks of a run config (types and unknown keys are OmegaConf's job).

``validate(run, registries)`` returns every problem it finds, each as one line that names
the field, the bad value, what is accepted, and how to fix it. It covers every field the
run reads: ranges, names used as paths and MLflow names, URLs (Redis, MLflow tracking,
``models:/`` registry URIs), references between sections, and, with ``registries``, the
names that other packages resolve (rewards in envs/, generator task families). It touches
no file system and no network: paths of models produced by earlier stages may not exist yet.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from mopd.algo import registry
from mopd.algo.stages import STAGES
from mopd.algo.staleness import max_staleness_problem
from mopd.config.schema import (
    DTYPES,
    LR_SCHEDULES,
    ROLLOUT_BACKENDS,
    SCHEDULING_MODES,
    SOURCE_KINDS,
    TEACHER_BACKENDS,
    TRAINER_BACKENDS,
    WEIGHT_SYNC_MODES,
    RunConfig,
)

REDIS_SCHEMES = ("redis", "rediss", "unix")
TRACKING_SCHEMES = (
    "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
    "databricks", "databricks-uc", "uc",
)  # fmt: skip
"""MLflow's tracking stores (``mlflow.tracking._tracking_service.utils``); a plain path is a
file store. Database schemes may name a driver (``postgresql+psycopg2://``)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""Run, pipeline and registered-model names: they become folder names (``runs/<name>``),
MLflow run and model names (``models:/<name>/<version>``) and Redis key prefixes."""
NAME_RULE = "1-100 characters: letters, digits, '.', '_', '-', starting with a letter or digit"

MODEL_URI_PREFIX = "models:/"
MODEL_URI = re.compile(r"models:/([A-Za-z0-9][A-Za-z0-9._-]{0,99})/([0-9]+)")
"""The registry URIs ``mopd.tracking.resolve_model`` resolves: a name and a version number."""

SANDBOX_MIN_MEMORY_BYTES = 64 << 20
"""The least memory ``envs.sandbox.SandboxLimits`` accepts (bash and python must start);
tests/config checks that the two agree."""

MAX_VALUE_CHARS = 200
"""Values echoed in a message are cut to this many characters."""


@dataclass(frozen=True)
class Registries:
    """Names that config strings resolve to in other packages: the reward registry of envs/
    and the generator task families (with the argument names each accepts). The config
    package imports no role package, so the caller that wires the run fills these
    (``mopd.catalog.registries``); None leaves that check out."""

    rewards: Collection[str] | None = None
    """``data.sources[*].reward`` names."""
    generators: Mapping[str, Collection[str]] | None = None
    """``data.sources[*].generator`` names -> the ``generator_args`` keys each accepts."""


def name_ok(value: str) -> bool:
    """Whether ``value`` is a usable run, pipeline or model name (``NAME_PATTERN``)."""
    return NAME_PATTERN.fullmatch(value) is not None


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def short(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters."""
    return clip(repr(value), limit)


def validate(run: RunConfig, registries: Registries | None = None) -> list[str]:
    """All problems of ``run``; an empty list means it is valid."""
    p = _Problems()
    _check_run(run, p)
    _check_model(run, p)
    _check_rollout(run, p)
    _check_data(run, p, registries or Registries())
    _check_teachers(run, p)
    _check_algorithm(run, p)
    _check_scheduler(run, p)
    _check_trainer(run, p)
    _check_tracking_cluster(run, p)
    _check_agent(run, p)
    return p.items


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")

    def choice(self, key: str, value: object, accepted: Iterable[str]) -> None:
        accepted = list(accepted)
        if value not in accepted:
            self.add(key, f"bad value {short(value)}; accepted values: {', '.join(accepted)}")

    def positive(self, key: str, value: float | int | None, *, allow_zero: bool = False) -> None:
        if value is None:
            return
        bad = value < 0 if allow_zero else value <= 0
        if bad or (isinstance(value, float) and not math.isfinite(value)):
            bound = ">= 0" if allow_zero else "> 0"
            self.add(key, f"bad value {value!r}; must be {bound}")

    def fraction(self, key: str, value: float, *, open_low: bool = False) -> None:
        low_ok = value > 0 if open_low else value >= 0
        if not (low_ok and value <= 1):
            interval = "(0, 1]" if open_low else "[0, 1]"
            self.add(key, f"bad value {value!r}; must be in {interval}")

    def name(self, key: str, value: str) -> None:
        if not NAME_PATTERN.fullmatch(value):
            self.add(key, f"bad name {short(value)}; use {NAME_RULE} (e.g. mopd-run-1)")

    def model_ref(self, key: str, value: str) -> None:
        if (problem := model_ref_problem(value)) is not None:
            self.add(key, problem)


def model_ref_problem(value: str) -> str | None:
    """What is wrong with a model reference: a checkpoint folder, or a registry URI that
    names a version number (what ``mopd.tracking.resolve_model`` resolves)."""
    if not value.strip():
        return "empty; set a checkpoint folder or a models:/name/version URI"
    if value.startswith(MODEL_URI_PREFIX) and not MODEL_URI.fullmatch(value):
        return (
            f"{short(value)} is not of the form models:/<name>/<version number>; aliases "
            "and stages (latest, @champion) are not resolved: name the version, e.g. "
            "models:/math-teacher/3"
        )
    return None


def _check_run(run: RunConfig, p: _Problems) -> None:
    p.name("run.name", run.run.name)
    if not run.run.output_dir.strip():
        p.add("run.output_dir", "empty; name the folder of the run's outputs (e.g. runs/my-run)")
    p.positive("run.eval_every", run.run.eval_every, allow_zero=True)


def _check_model(run: RunConfig, p: _Problems) -> None:
    p.model_ref("model.path", run.model.path)
    if run.model.tokenizer_path is not None and not run.model.tokenizer_path.strip():
        p.add("model.tokenizer_path", "empty; name the tokenizer folder or leave it unset")
    p.choice("model.dtype", run.model.dtype, DTYPES)


def _check_rollout(run: RunConfig, p: _Problems) -> None:
    r = run.rollout
    p.choice("rollout.backend", r.backend, ROLLOUT_BACKENDS)
    p.choice("rollout.weight_sync", r.weight_sync, WEIGHT_SYNC_MODES)
    p.positive("rollout.num_servers", r.num_servers)
    p.positive("rollout.max_running_requests", r.max_running_requests)
    p.positive("rollout.context_length", r.context_length)
    p.positive("rollout.request_timeout_s", r.request_timeout_s)
    s = r.sampling
    p.positive("rollout.sampling.max_new_tokens", s.max_new_tokens)
    p.positive("rollout.sampling.temperature", s.temperature, allow_zero=True)
    p.fraction("rollout.sampling.top_p", s.top_p, open_low=True)
    if s.top_k == 0 or s.top_k < -1:
        p.add("rollout.sampling.top_k", f"bad value {s.top_k}; use -1 (disabled) or a positive k")
    if r.weight_sync == "distributed":
        p.add(
            "rollout.weight_sync",
            "distributed (an NCCL group between trainer and engines) is not available in this "
            "release; use disk (any machine) or tensor (same host)",
        )


def _check_data(run: RunConfig, p: _Problems, registries: Registries) -> None:
    sources = run.data.sources
    if not sources:
        p.add("data.sources", "no data source; add at least one (name, domain, kind, ...)")
    stage = STAGES.get(run.algorithm.loss)  # an unknown one is reported by _check_algorithm
    seen: set[str] = set()
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        if src.name in seen:
            p.add(f"{key}.name", f"duplicate source name {src.name!r}; names must be unique")
        seen.add(src.name)
        if not src.name.strip():
            p.add(f"{key}.name", "empty; name the source (metrics are reported per source)")
        if not src.domain.strip():
            p.add(f"{key}.domain", "empty; every source needs a domain")
        p.choice(f"{key}.kind", src.kind, SOURCE_KINDS)
        if src.kind in ("jsonl", "parquet") and not src.path:
            p.add(f"{key}.path", f"required for kind={src.kind}; set the file path")
        if src.kind == "generator" and not src.generator:
            p.add(
                f"{key}.generator",
                "required for kind=generator; name a task family (e.g. chain_sum)",
            )
        elif src.kind == "generator":
            _check_generator(key, src.generator, src.generator_args, registries, p)
        if registries.rewards is not None and src.reward not in registries.rewards:
            p.add(
                f"{key}.reward",
                f"unknown reward {short(src.reward)}{_did_you_mean(src.reward, registries.rewards)}"
                f"; accepted rewards: {', '.join(sorted(registries.rewards))}",
            )
        p.positive(f"{key}.weight", src.weight)
        p.positive(f"{key}.group_size", src.group_size)
        p.positive(f"{key}.temperature", src.temperature, allow_zero=True)
        p.positive(f"{key}.max_prompt_tokens", src.max_prompt_tokens)
        p.positive(f"{key}.max_response_tokens", src.max_response_tokens)
        p.positive(f"{key}.num_eval_prompts", src.num_eval_prompts, allow_zero=True)
        if stage is not None and not stage.generates and src.dynamic_sampling:
            p.add(
                f"{key}.dynamic_sampling",
                "must be false for algorithm.loss=sft: SFT samples carry no reward to filter on",
            )
        if src.reward == "agentic" and stage is not None and not stage.generates:
            p.add(
                f"{key}.reward", "agentic sources sample trajectories: not for algorithm.loss=sft"
            )
        if stage is not None and stage.needs_group_signal and src.group_size == 1:
            p.add(
                f"{key}.group_size",
                "1 gives zero group advantages, so RL learns nothing; use 2 or more",
            )


def _did_you_mean(value: str, accepted: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(accepted), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_generator(
    key: str, name: str, args: Mapping[str, object], registries: Registries, p: _Problems
) -> None:
    if registries.generators is None:
        return
    accepted = registries.generators.get(name)
    if accepted is None:
        p.add(
            f"{key}.generator",
            f"unknown task family {short(name)}{_did_you_mean(name, registries.generators)}; "
            f"accepted: {', '.join(sorted(registries.generators))}",
        )
        return
    for arg in args:
        if arg not in accepted:
            p.add(
                f"{key}.generator_args.{clip(str(arg), 60)}",
                f"not an argument of {name}{_did_you_mean(str(arg), accepted)}; accepted: "
                f"{', '.join(sorted(accepted))}",
            )


def _check_teachers(run: RunConfig, p: _Problems) -> None:
    names: set[str] = set()
    owner: dict[str, str] = {}
    for i, t in enumerate(run.teachers):
        key = f"teachers[{i}]"
        if t.name in names:
            p.add(f"{key}.name", f"duplicate teacher name {t.name!r}; names must be unique")
        names.add(t.name)
        if not t.name.strip():
            p.add(f"{key}.name", "empty; name the teacher (metrics are reported per teacher)")
        p.model_ref(f"{key}.model", t.model)
        p.choice(f"{key}.backend", t.backend, TEACHER_BACKENDS)
        p.positive(f"{key}.num_servers", t.num_servers)
        p.positive(f"{key}.timeout_s", t.timeout_s)
        p.positive(f"{key}.max_retries", t.max_retries, allow_zero=True)
        p.positive(f"{key}.top_logprobs", t.top_logprobs, allow_zero=True)
        if not t.domains:
            p.add(f"{key}.domains", "empty; list the domains this teacher scores")
        for d in t.domains:
            if d in owner:
                p.add(
                    f"{key}.domains",
                    f"domain {d!r} is already assigned to teacher {owner[d]!r}; "
                    "each domain maps to exactly one teacher",
                )
            else:
                owner[d] = t.name

    stage = STAGES.get(run.algorithm.loss)  # an unknown one is reported by _check_algorithm
    if stage is None or not stage.uses_teacher:
        return
    if not run.teachers:
        p.add("teachers", "a MOPD run (algorithm.loss=mopd) needs at least one teacher")
        return
    for i, src in enumerate(run.data.sources):
        if src.domain not in owner:
            known = ", ".join(sorted(owner)) or "none"
            p.add(
                f"data.sources[{i}].domain",
                f"domain {src.domain!r} has no teacher (teachers cover: {known}); "
                "add it to a teacher's domains",
            )
    if run.algorithm.teacher_kl == "topk":
        for i, t in enumerate(run.teachers):
            if t.top_logprobs < 1:
                p.add(
                    f"teachers[{i}].top_logprobs",
                    f"is {t.top_logprobs} but algorithm.teacher_kl=topk needs top-k log-probs; "
                    "set it to k >= 1",
                )


def _check_algorithm(run: RunConfig, p: _Problems) -> None:
    a = run.algorithm
    p.choice("algorithm.loss", a.loss, registry.LOSSES)
    p.choice("algorithm.aggregation", a.aggregation, registry.AGGREGATIONS)
    p.choice(
        "algorithm.student_logprob_source",
        a.student_logprob_source,
        registry.STUDENT_LOGPROB_SOURCES,
    )
    p.choice("algorithm.teacher_kl", a.teacher_kl, registry.TEACHER_KL_MODES)
    p.choice("algorithm.advantage", a.advantage, registry.ADVANTAGE_ESTIMATORS)
    p.choice("algorithm.is_correction", a.is_correction, registry.IS_CORRECTIONS)
    p.choice("algorithm.kl_estimator", a.kl_estimator, registry.KL_ESTIMATORS)
    if not (math.isfinite(a.alpha) and a.alpha >= 0):
        p.add("algorithm.alpha", f"bad value {a.alpha!r}; must be >= 0 (0 turns the ORM term off)")
    p.positive("algorithm.eps_low", a.eps_low)
    p.positive("algorithm.eps_high", a.eps_high)
    if a.eps_low >= a.eps_high:
        p.add(
            "algorithm.eps_low",
            f"eps_low={a.eps_low} must be < eps_high={a.eps_high} (tokens with ratio outside "
            "[eps_low, eps_high] are masked); e.g. eps_low=0.5 eps_high=2.0",
        )
    elif not a.eps_low <= 1.0 <= a.eps_high:
        p.add(
            "algorithm.eps_low",
            f"[{a.eps_low}, {a.eps_high}] excludes ratio 1.0, so even exactly on-policy tokens "
            "are masked; pick eps_low <= 1 <= eps_high",
        )
    p.positive("algorithm.advantage_eps", a.advantage_eps)
    p.fraction("algorithm.clip_low", a.clip_low)
    p.positive("algorithm.clip_high", a.clip_high)
    p.positive("algorithm.kl_coef", a.kl_coef, allow_zero=True)


def _check_scheduler(run: RunConfig, p: _Problems) -> None:
    s = run.scheduler
    p.choice("scheduler.mode", s.mode, SCHEDULING_MODES)
    p.positive("scheduler.prompts_per_step", s.prompts_per_step)
    if (problem := max_staleness_problem(s.max_staleness)) is not None:
        p.add("scheduler.max_staleness", problem)
    p.fraction("scheduler.max_partial_fraction", s.max_partial_fraction)
    p.positive("scheduler.max_inflight_groups", s.max_inflight_groups)
    if s.mode == "sync" and s.max_staleness != 0:
        p.add(
            "scheduler.max_staleness",
            f"is {s.max_staleness} but mode=sync trains strictly on-policy (staleness 0); "
            "set scheduler.mode=async or max_staleness=0",
        )
    if s.max_inflight_groups < s.prompts_per_step:
        p.add(
            "scheduler.max_inflight_groups",
            f"{s.max_inflight_groups} < prompts_per_step={s.prompts_per_step}: a step could never "
            "fill; raise it to at least prompts_per_step",
        )
    if s.redis_url is not None:
        for problem in redis_url_problems(s.redis_url, s.redis_password_env):
            p.add("scheduler.redis_url", problem)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s.redis_password_env):
        p.add(
            "scheduler.redis_password_env",
            f"bad name {short(s.redis_password_env)}; name an environment variable "
            "(letters, digits, '_'), e.g. MOPD_REDIS_PASSWORD",
        )


def redis_url_problems(value: str, password_env: str) -> list[str]:
    """What is wrong with a Redis URL (the forms redis-py's ``Redis.from_url`` reads:
    redis://[user@]host[:port][/db], rediss://..., unix:///path[?db=N])."""
    example = "e.g. redis://127.0.0.1:6379/0, rediss:// for TLS; unset for an embedded Redis"
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError as e:  # a port that is not a number or out of range
        return [f"{short(value)} cannot be parsed ({e}); port must be 1-65535 ({example})"]
    if url.scheme not in REDIS_SCHEMES:
        return [f"bad scheme {short(url.scheme)}; accepted: {', '.join(REDIS_SCHEMES)} ({example})"]
    problems = []
    if url.password:
        # The resolved config is logged and saved: a password in it would leak.
        problems.append(
            "contains a password; remove it from the URL and export it in "
            f"${password_env} instead (secrets never go in config files)"
        )
    query = dict(item.partition("=")[::2] for item in url.query.split("&") if item)
    if url.scheme == "unix":
        if not url.path:
            problems.append(
                f"unix URL without a socket path ({short(value)}): unix:///path/redis.sock"
            )
        db = query.get("db", "0")
    else:
        if not url.hostname:
            problems.append(f"no host in {short(value)} ({example})")
        if port is not None and not 1 <= port <= 65535:
            problems.append(f"port {port} out of range; use 1-65535 ({example})")
        db = url.path.lstrip("/") or query.get("db", "0")
    if not (db.isascii() and db.isdigit()):
        problems.append(
            f"database {short(db)} is not a number; the database is an integer >= 0 "
            "(redis://host:6379/0)"
        )
    return problems


def _check_trainer(run: RunConfig, p: _Problems) -> None:
    t = run.trainer
    p.choice("trainer.backend", t.backend, TRAINER_BACKENDS)
    p.choice("trainer.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    p.choice("trainer.dtype", t.dtype, ("auto", "float32", "bfloat16"))
    p.positive("trainer.steps", t.steps)
    p.positive("trainer.lr", t.lr)
    p.positive("trainer.min_lr", t.min_lr, allow_zero=True)
    if t.min_lr > t.lr:
        p.add("trainer.min_lr", f"{t.min_lr} exceeds trainer.lr={t.lr}; it must be <= lr")
    p.positive("trainer.warmup_steps", t.warmup_steps, allow_zero=True)
    p.positive("trainer.weight_decay", t.weight_decay, allow_zero=True)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(t, name)
        if not 0 <= value < 1:
            p.add(f"trainer.{name}", f"bad value {value}; must be in [0, 1)")
    p.positive("trainer.adam_eps", t.adam_eps)
    p.positive("trainer.grad_clip", t.grad_clip, allow_zero=True)
    p.positive("trainer.micro_batch_tokens", t.micro_batch_tokens)
    p.positive("trainer.checkpoint_every", t.checkpoint_every)
    for name in ("tensor_parallel", "expert_parallel", "pipeline_parallel", "data_parallel"):
        p.positive(f"trainer.{name}", getattr(t, name))
    if t.backend == "torch":
        for name in ("tensor_parallel", "expert_parallel", "pipeline_parallel"):
            if getattr(t, name) != 1:
                p.add(
                    f"trainer.{name}",
                    f"is {getattr(t, name)} but the torch backend has data parallelism only; "
                    "use trainer.backend=megatron or set it to 1",
                )


def _check_tracking_cluster(run: RunConfig, p: _Problems) -> None:
    t = run.tracking
    p.positive("tracking.log_every", t.log_every)
    if not t.experiment.strip():
        p.add("tracking.experiment", "empty; name the MLflow experiment")
    if t.tracking_uri is not None:
        _check_tracking_uri(t.tracking_uri, p)
    if t.register_model is not None:
        p.name("tracking.register_model", t.register_model)
    c = run.cluster
    # An http(s) address is the dashboard `mopd submit` sends the job to; the driver
    # refuses it itself when it is started outside a Ray job (RunServices.check_cluster).
    if c.address is not None and not c.address.strip():
        p.add("cluster.address", "empty; unset it for a local Ray, or name the cluster (auto)")
    for key, host in (("cluster.bind_host", c.bind_host), ("rollout.host", run.rollout.host)):
        if not host.strip() or "/" in host or any(ch.isspace() for ch in host):
            p.add(key, f"bad host {short(host)}; name an interface address, e.g. 127.0.0.1")
    p.positive("cluster.num_cpus", c.num_cpus)
    p.positive("cluster.num_gpus", c.num_gpus, allow_zero=True)
    if c.colocate and run.rollout.backend != "sglang":
        p.add(
            "cluster.colocate",
            "colocated rollout and training needs GPUs and rollout.backend=sglang; set it to false",
        )


def _check_tracking_uri(uri: str, p: _Problems) -> None:
    if not uri.strip():
        p.add("tracking.tracking_uri", "empty; unset it (a local store) or name an MLflow store")
        return
    try:
        scheme = urlsplit(uri).scheme.lower().split("+", 1)[0]
    except ValueError as e:
        p.add("tracking.tracking_uri", f"{short(uri)} cannot be parsed: {e}")
        return
    if scheme and scheme not in TRACKING_SCHEMES and not re.fullmatch(r"[a-z]", scheme):
        p.add(
            "tracking.tracking_uri",
            f"unknown scheme {short(scheme)}: MLflow would refuse it and the run would go "
            f"untracked; accepted: {', '.join(TRACKING_SCHEMES)} or a folder path "
            "(e.g. http://mlflow.internal:5000, sqlite:///runs/mlflow.db)",
        )


def _check_agent(run: RunConfig, p: _Problems) -> None:
    a = run.agent
    for name in ("pool_size", "max_turns", "max_response_tokens", "max_tokens_per_turn"):
        p.positive(f"agent.{name}", getattr(a, name))
    for name in ("turn_timeout_s", "tool_timeout_s", "reward_timeout_s"):
        p.positive(f"agent.{name}", getattr(a, name))
    for name in ("sandbox_wall_seconds", "sandbox_cpu_seconds"):
        p.positive(f"agent.{name}", getattr(a, name))
    if a.sandbox_memory_bytes < SANDBOX_MIN_MEMORY_BYTES:
        p.add(
            "agent.sandbox_memory_bytes",
            f"{a.sandbox_memory_bytes} is below what a sandbox accepts: bash and python need "
            f"at least {SANDBOX_MIN_MEMORY_BYTES} (64 MiB); e.g. {1 << 30} (1 GiB)",
        )
    if a.tasks_dir is not None and not a.tasks_dir.strip():
        p.add("agent.tasks_dir", "empty; name the tasks folder or leave it unset (shipped tasks)")
    for tool, n in a.tool_max_concurrency.items():
        p.positive(f"agent.tool_max_concurrency.{tool}", n)
    for tool, qps in a.tool_max_qps.items():
        p.positive(f"agent.tool_max_qps.{tool}", qps)
