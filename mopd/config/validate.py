"""Cross-field checks of a run config (types and unknown keys are OmegaConf's job).

``validate(run)`` returns every problem it finds, each as one line that names the
field, the bad value, what is accepted, and how to fix it. It touches no file system
and no network: paths of models produced by earlier stages may not exist yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from urllib.parse import urlparse

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


def validate(run: RunConfig) -> list[str]:
    """All problems of ``run``; an empty list means it is valid."""
    p = _Problems()
    _check_model(run, p)
    _check_rollout(run, p)
    _check_data(run, p)
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
            self.add(key, f"bad value {value!r}; accepted values: {', '.join(accepted)}")

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


def _check_model(run: RunConfig, p: _Problems) -> None:
    if not run.model.path.strip():
        p.add("model.path", "empty; set a checkpoint folder or a models:/name/version URI")
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
    if r.backend == "embedded" and r.weight_sync == "distributed":
        p.add(
            "rollout.weight_sync",
            "distributed (NCCL) sync needs rollout.backend=sglang on GPUs; use disk or tensor",
        )


def _check_data(run: RunConfig, p: _Problems) -> None:
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


def _check_teachers(run: RunConfig, p: _Problems) -> None:
    names: set[str] = set()
    owner: dict[str, str] = {}
    for i, t in enumerate(run.teachers):
        key = f"teachers[{i}]"
        if t.name in names:
            p.add(f"{key}.name", f"duplicate teacher name {t.name!r}; names must be unique")
        names.add(t.name)
        if not t.model.strip():
            p.add(f"{key}.model", "empty; set a checkpoint folder or a models:/name/version URI")
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
        url = urlparse(s.redis_url)
        if url.scheme not in REDIS_SCHEMES:
            p.add(
                "scheduler.redis_url",
                f"bad scheme {url.scheme!r}; accepted: {', '.join(REDIS_SCHEMES)} "
                "(e.g. redis://127.0.0.1:6379/0, rediss:// for TLS); unset for an embedded Redis",
            )
        if url.password:
            # The resolved config is logged and saved: a password in it would leak.
            p.add(
                "scheduler.redis_url",
                "contains a password; remove it from the URL and export it in "
                f"${s.redis_password_env} instead (secrets never go in config files)",
            )


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
    p.positive("tracking.log_every", run.tracking.log_every)
    if not run.tracking.experiment.strip():
        p.add("tracking.experiment", "empty; name the MLflow experiment")
    c = run.cluster
    p.positive("cluster.num_cpus", c.num_cpus)
    p.positive("cluster.num_gpus", c.num_gpus, allow_zero=True)
    if c.colocate and run.rollout.backend != "sglang":
        p.add(
            "cluster.colocate",
            "colocated rollout and training needs GPUs and rollout.backend=sglang; set it to false",
        )


def _check_agent(run: RunConfig, p: _Problems) -> None:
    a = run.agent
    for name in ("pool_size", "max_turns", "max_response_tokens", "max_tokens_per_turn"):
        p.positive(f"agent.{name}", getattr(a, name))
    for name in ("turn_timeout_s", "tool_timeout_s", "reward_timeout_s"):
        p.positive(f"agent.{name}", getattr(a, name))
    for name in ("sandbox_wall_seconds", "sandbox_cpu_seconds", "sandbox_memory_bytes"):
        p.positive(f"agent.{name}", getattr(a, name))
    for tool, n in a.tool_max_concurrency.items():
        p.positive(f"agent.tool_max_concurrency.{tool}", n)
    for tool, qps in a.tool_max_qps.items():
        p.positive(f"agent.tool_max_qps.{tool}", qps)
