"""What ``mopd validate`` refuses that the run would crash on or refuse late (issue 20, items
4 and 5): names unusable as paths, Redis and tracking URLs, registry URIs the run cannot
resolve, unknown rewards and generators, sandbox memory, and broken files and overrides,
each as exit status 2 with a bounded message that names the field or the file, never a
traceback. ``mopd validate`` runs in-process through the CLI's ``main``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mopd.catalog import registries
from mopd.cli import main
from mopd.config import ConfigError, load_config
from mopd.config.load import MAX_PROBLEM_CHARS, MAX_PROBLEMS
from mopd.config.validate import SANDBOX_MIN_MEMORY_BYTES, TRACKING_SCHEMES

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = REPO / "configs" / "mopd_tiny.yaml"
MAX_MESSAGE = MAX_PROBLEMS * (MAX_PROBLEM_CHARS + 8) + 1000


def validate(capsys, *args: str) -> tuple[int, str]:
    """``mopd validate ARGS`` in this process: (exit status, stderr)."""
    rc = main(["validate", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def problems(*overrides: str, path: Path = RUN_CONFIG) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), registries())
    return info.value.problems


def accepted(*overrides: str, path: Path = RUN_CONFIG) -> None:
    load_config(path, list(overrides), registries())


# ------------------------------------------------------------------ item 4: fields
@pytest.mark.parametrize("name", ["my run", "run{1}", "", "../up", "a/b", "-flag", "x" * 101])
def test_run_names_unusable_as_paths_are_refused(name: str):
    (problem,) = problems(f"run.name='{name}'", "run.output_dir=runs/x")
    assert problem.startswith("run.name: bad name") and "letters, digits" in problem


def test_usable_run_names_pass():
    accepted("run.name=mopd-run_1.2")


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("redis://h:0/0", "port 0 out of range"),
        ("redis://h:70000/0", "port must be 1-65535"),
        ("redis://h:abc/0", "cannot be parsed"),
        ("redis://h:6379/x", "database 'x' is not a number"),
        ("redis://h:6379/-1", "database '-1' is not a number"),
        ("redis://:6379/0", "no host"),
        ("unix://", "without a socket path"),
        ("http://h:6379/0", "bad scheme 'http'"),
    ],
)
def test_bad_redis_urls_are_refused(url: str, fragment: str):
    found = problems(f"scheduler.redis_url='{url}'")
    assert any(p.startswith("scheduler.redis_url:") and fragment in p for p in found), found


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://redis.internal/2", "redis://h", "unix:///tmp/r.sock?db=1"]
)
def test_good_redis_urls_pass(url: str):
    accepted(f"scheduler.redis_url='{url}'")


@pytest.mark.parametrize("uri", ["models:/x/latest", "models:/x@champion", "models:/x", "models:/"])
@pytest.mark.parametrize("field", ["model.path", "teachers.0.model"])
def test_registry_uris_the_run_cannot_resolve_are_refused(field: str, uri: str, tmp_path: Path):
    from mopd.tracking import resolve_model

    (problem,) = problems(f"{field}='{uri}'")
    assert problem.startswith(field.replace(".0.", "[0].")) and "<version number>" in problem
    # The same URI is what the run's resolver refuses (after its services started, before).
    with pytest.raises(ValueError, match="not of the form"):
        resolve_model(uri, f"sqlite:///{tmp_path}/mlflow.db", tmp_path)


def test_registry_uri_with_a_version_passes():
    accepted("model.path=models:/mimo-sft/12", "teachers.0.model=models:/t/3")


def test_unknown_reward_generator_and_generator_argument_are_refused():
    (reward,) = problems("data.sources.0.reward=code_unit_tests")
    assert reward.startswith("data.sources[0].reward: unknown reward 'code_unit_tests'")
    assert "exact_match" in reward
    (generator,) = problems("data.sources.0.generator=chain_summ")
    assert generator.startswith("data.sources[0].generator: unknown task family")
    assert "did you mean 'chain_sum'" in generator
    (arg,) = problems("data.sources.0.generator_args.max_termz=3")
    assert arg.startswith("data.sources[0].generator_args.max_termz: not an argument of")
    assert "did you mean 'max_terms'" in arg


def test_agent_memory_below_what_the_sandbox_accepts_is_refused():
    from envs.sandbox import SandboxLimits

    # The config's minimum is the sandbox's: one byte less is refused by both.
    SandboxLimits(memory_bytes=SANDBOX_MIN_MEMORY_BYTES)
    with pytest.raises(ValueError):
        SandboxLimits(memory_bytes=SANDBOX_MIN_MEMORY_BYTES - 1)
    (problem,) = problems(f"agent.sandbox_memory_bytes={SANDBOX_MIN_MEMORY_BYTES - 1}")
    assert problem.startswith("agent.sandbox_memory_bytes:") and "64 MiB" in problem
    accepted(f"agent.sandbox_memory_bytes={SANDBOX_MIN_MEMORY_BYTES}")


@pytest.mark.parametrize("uri", ["ftp://mlflow/x", "mlfow://h:5000", "s3://bucket/runs"])
def test_tracking_uri_of_unknown_scheme_is_refused(uri: str):
    (problem,) = problems(f"tracking.tracking_uri='{uri}'")
    assert problem.startswith("tracking.tracking_uri: unknown scheme") and "untracked" in problem


def test_accepted_tracking_schemes_are_mlflow_stores():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    assert set(TRACKING_SCHEMES) <= set(_tracking_store_registry._registry)
    for uri in (
        "http://mlflow:5000",
        "sqlite:///runs/m.db",
        "postgresql+psycopg2://h/db",
        "runs/x",
    ):
        accepted(f"tracking.tracking_uri='{uri}'")


def test_distributed_weight_sync_is_refused_at_validation():
    (problem,) = problems("rollout.weight_sync=distributed")
    assert problem.startswith("rollout.weight_sync:") and "not available" in problem


def test_dashboard_url_as_cluster_address_is_for_submit():
    """A dashboard URL is what `mopd submit` sends the job to, so the config validates; the
    driver started outside a Ray job refuses it (tests/test_cli.py)."""
    accepted("cluster.address=http://head:8265")


# ------------------------------------------------------------------ item 5: broken input
def test_non_utf8_file(tmp_path: Path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(RUN_CONFIG.read_bytes().replace(b"name: quickstart", b"name: caf\xe9"))
    rc, err = validate(capsys, path)
    assert rc == 2 and str(path) in err and "not UTF-8" in err and "offset" in err


def test_junk_bytes(tmp_path: Path, capsys):
    path = tmp_path / "junk.yaml"
    path.write_bytes(bytes(range(256)) * 8)
    rc, err = validate(capsys, path)
    assert rc == 2 and str(path) in err


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.lr=[1,", "override 'trainer.lr=[1,': cannot parse it"),
        ("trainer={a: [1,", "override 'trainer={a: [1,': cannot parse it"),
        ("trainer=[1, 2]", "trainer: a section, so a mapping"),
        ("teachers={a: 1}", "teachers: a list, not a mapping"),
        ("teachers.0=[1]", "teachers[0]: a section"),
        ("agent.tool_max_concurrency=[1]", "agent.tool_max_concurrency: a mapping"),
        ("teachers.0.domains={a: 1}", "teachers[0].domains: a list"),
        ("teachers.9.name=x", "teachers[9]: no such item (teachers has 2)"),
        ("run=null", "run: null is not allowed here"),
    ],
)
def test_bad_overrides_name_the_field(override: str, fragment: str, capsys):
    rc, err = validate(capsys, RUN_CONFIG, override)
    assert rc == 2 and fragment in err, err


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.update(run=[1, 2]), "run: a section, so a mapping"),
        (lambda d: d.update(teachers={"name": "t"}), "teachers: a list, not a mapping"),
        (lambda d: d["teachers"][1].update(foo=1), "teachers[1].foo: unknown key"),
        (lambda d: d["data"]["sources"][1].update(foo=1), "data.sources[1].foo: unknown key"),
        (lambda d: d.update(trainer=None), "trainer: null is not allowed here"),
        (lambda d: d["trainer"].update(lr={"x": 1}), "trainer.lr: expected float, not a mapping"),
        (lambda d: d["data"].update(sources=[[1]]), "data.sources[0]: a section"),
    ],
)
def test_wrong_shapes_in_the_file_name_the_path(edit, fragment: str, tmp_path: Path, capsys):
    tree = yaml.safe_load(RUN_CONFIG.read_text())
    edit(tree)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    rc, err = validate(capsys, path)
    assert rc == 2 and fragment in err, err
    assert "<root>" not in err


def test_error_text_is_bounded(tmp_path: Path, capsys):
    huge = "x" * 1_000_000
    for override, field in (
        (f"trainer.lr={huge}", "trainer.lr:"),
        (f"run.name={huge}", "run.name:"),
    ):
        rc, err = validate(capsys, RUN_CONFIG, override)
        assert rc == 2 and field in err and len(err) < 1500, (len(err), err[:300])
    many = [f"trainer.nope{i}=1" for i in range(500)]
    rc, err = validate(capsys, RUN_CONFIG, *many)
    assert rc == 2 and "and 460 more problem(s)" in err and len(err) <= MAX_MESSAGE
    big = tmp_path / "big.yaml"
    big.write_bytes(b"run:\n  name: " + b"y" * (2 << 20) + b"\n")
    rc, err = validate(capsys, big)
    assert rc == 2 and "more than any config" in err and len(err) < 1000


def test_yaml_alias_bomb_is_refused(tmp_path: Path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    rc, err = validate(capsys, path)
    assert rc == 2 and str(path) in err and len(err) < 2000
