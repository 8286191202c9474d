"""Run configs: every shipped YAML validates; every kind of bad input is rejected with a
message that names the field; the resolved config round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mopd.catalog import registries
from mopd.config import ConfigError, RunConfig, load_config, save_resolved, schema, to_yaml
from mopd.config.docs import describe, field_docs
from mopd.config.pipeline import is_pipeline_config

REPO = Path(__file__).resolve().parents[2]
# Pipeline configs (a top-level ``stages`` section) are validated by tests/test_pipeline.py.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not is_pipeline_config(p))
RUN_CONFIG = REPO / "configs" / "mopd_tiny.yaml"


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path):
    # With the registries, as `mopd validate` and `mopd train` check it: every reward and
    # generator a shipped config names exists.
    run = load_config(path, registries=registries())
    assert isinstance(run, RunConfig)
    assert run.data.sources, "a shipped config must have data"
    # Interpolations are resolved: nothing like ${...} survives.
    assert "${" not in to_yaml(run)


def _problems(overrides: list[str], path: Path = RUN_CONFIG) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_unknown_key_names_field_and_suggests():
    (problem,) = _problems(["trainer.lrr=1e-4"])
    assert "trainer.lrr" in problem and "unknown key" in problem
    assert "did you mean 'lr'" in problem


def test_unknown_key_in_list_item():
    (problem,) = _problems(["teachers.0.domian=[x]"])
    assert "teachers[0].domian" in problem and "did you mean 'domains'" in problem


def test_wrong_type_names_field_value_and_type():
    (problem,) = _problems(["trainer.steps=many"])
    assert "trainer.steps" in problem and "'many'" in problem and "int" in problem


def test_missing_required_field(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "algorithm": {"loss": "sft"},
                "data": {"sources": [{"name": "a", "domain": "d", "generator": "chain_sum"}]},
            }
        )
    )
    (problem,) = _problems([], cfg)
    assert problem.startswith("model.path") and "required" in problem


def test_mopd_domain_without_teacher():
    (problem,) = _problems(["teachers.1.domains=[other]"])
    assert "data.sources[1].domain" in problem and "'spelling' has no teacher" in problem


def test_mopd_needs_teachers():
    (problem,) = _problems(["teachers=[]"])
    assert problem.startswith("teachers:") and "at least one teacher" in problem


def test_domain_claimed_twice():
    (problem,) = _problems(["teachers.1.domains=[spelling,arithmetic]"])
    assert "teachers[1].domains" in problem and "already assigned" in problem


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ("algorithm.alpha=-0.5", "algorithm.alpha", "must be >= 0"),
        ("algorithm.eps_low=2.0", "algorithm.eps_low", "must be < eps_high"),
        ("algorithm.eps_low=1.2", "algorithm.eps_low", "excludes ratio 1.0"),
        ("algorithm.advantage=ppo", "algorithm.advantage", "grpo, drgrpo, rloo"),
        ("algorithm.aggregation=sum", "algorithm.aggregation", "seq_mean_token_mean, token_mean"),
        ("algorithm.loss=dpo", "algorithm.loss", "sft, rl, mopd"),
        ("rollout.backend=vllm", "rollout.backend", "embedded, sglang"),
        ("trainer.backend=jax", "trainer.backend", "torch, megatron"),
        ("trainer.lr=0", "trainer.lr", "must be > 0"),
        ("trainer.tensor_parallel=2", "trainer.tensor_parallel", "backend=megatron"),
        ("rollout.sampling.top_p=1.5", "rollout.sampling.top_p", "(0, 1]"),
        ("scheduler.max_staleness=2", "scheduler.max_staleness", "mode=async"),
        ("scheduler.redis_url=http://x:6379", "scheduler.redis_url", "redis, rediss, unix"),
        ("data.sources.0.kind=csv", "data.sources[0].kind", "generator, jsonl, parquet"),
        ("data.sources.1.name=chain_sum", "data.sources[1].name", "duplicate"),
        ("algorithm.teacher_kl=topk", "teachers[0].top_logprobs", "k >= 1"),
    ],
)
def test_bad_values_are_rejected_with_the_field(override: str, field: str, fragment: str):
    problems = _problems([override])
    hits = [p for p in problems if p.startswith(field + ":")]
    assert hits, problems
    assert fragment in hits[0], hits[0]


def test_redis_password_in_url_is_refused_without_echoing_it():
    (problem,) = _problems(["scheduler.redis_url=redis://:s3cret@127.0.0.1:6379/0"])
    assert "MOPD_REDIS_PASSWORD" in problem
    assert "s3cret" not in problem


def test_every_problem_is_reported_at_once():
    problems = _problems(["algorithm.alpha=-1", "trainer.steps=0", "rollout.backend=x"])
    fields = {p.split(":", 1)[0] for p in problems}
    assert {"algorithm.alpha", "trainer.steps", "rollout.backend"} <= fields


def test_malformed_override():
    (problem,) = _problems(["trainer.lr"])
    assert "key=value" in problem


def test_missing_file_and_bad_yaml(tmp_path: Path):
    (problem,) = _problems([], tmp_path / "nope.yaml")
    assert "not found" in problem
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [unclosed\n")
    (problem,) = _problems([], bad)
    assert "not valid YAML" in problem
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    (problem,) = _problems([], lst)
    assert "mapping" in problem


def test_overrides_apply_in_order_and_to_list_items():
    run = load_config(
        RUN_CONFIG,
        ["trainer.lr=1e-4", "trainer.lr=2e-4", "teachers.1.timeout_s=7", "run.name=x"],
    )
    assert run.trainer.lr == pytest.approx(2e-4)
    assert run.teachers[1].timeout_s == 7.0
    # Interpolation sees the override: output_dir and model path follow run.name.
    assert run.run.output_dir == "runs/x"
    assert run.model.path == "runs/x/models/sft"


def test_resolved_config_round_trips(tmp_path: Path):
    run = load_config(RUN_CONFIG, ["trainer.steps=7"])
    path = save_resolved(run, tmp_path)
    assert path.name == "resolved_config.yaml"
    again = load_config(path)
    assert again == run
    assert not list(tmp_path.glob("*.tmp"))


def test_components_are_typed_slices():
    run = load_config(RUN_CONFIG)
    assert isinstance(run.trainer, schema.TrainerConfig)
    assert all(isinstance(t, schema.TeacherConfig) for t in run.teachers)
    assert isinstance(run.data.sources[0], schema.DataSourceConfig)


def _schema_classes() -> list[type]:
    return [
        obj
        for obj in vars(schema).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == schema.__name__
    ]


@pytest.mark.parametrize("cls", _schema_classes(), ids=lambda c: c.__name__)
def test_every_field_is_documented(cls: type):
    docs = field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


def test_describe_lists_every_leaf():
    lines = list(describe())
    assert any(line.strip().startswith("trainer.lr (float, 1e-06):") for line in lines)
    assert any(
        line.strip().startswith("teachers[i].domains (list[str], required)") for line in lines
    )


def test_shipped_configs_name_only_registered_rewards():
    """Every reward a shipped config names is in the reward registry (the cluster config's
    code source named a ``code_unit_tests`` reward that never existed)."""
    from envs.registry import REWARDS

    for path in sorted((REPO / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        run = tree.get("base", tree)
        for src in run["data"]["sources"]:
            assert src.get("reward", "exact_match") in REWARDS, (path.name, src["name"])
