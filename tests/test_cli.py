"""The `mopd` console script, run as users run it (a real subprocess)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mopd import __version__

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RUN_CONFIG = REPO / "configs" / "mopd_tiny.yaml"
CLUSTER = REPO / "configs" / "cluster_mopd.yaml"
MOPD = shutil.which("mopd")

pytestmark = pytest.mark.skipif(
    MOPD is None, reason="console script not installed (pip install -e .)"
)


def mopd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert MOPD is not None
    return subprocess.run([MOPD, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_version():
    out = mopd("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"mopd {__version__}"


@pytest.mark.parametrize(
    "sub", ["validate", "train", "submit", "pipeline", "tiny-checkpoints", "config-docs"]
)
def test_help_on_every_subcommand(sub: str):
    out = mopd(sub, "--help")
    assert out.returncode == 0
    assert f"usage: mopd {sub}" in out.stdout


def test_no_command_prints_help_and_fails():
    out = mopd()
    assert out.returncode == 2
    assert "validate" in out.stdout and "train" in out.stdout


def test_validate_accepts_every_shipped_config():
    # mopd validate checks rewards and generators against their registries: the cluster
    # config's code source used to name a reward that does not exist.
    for path in CONFIGS:
        out = mopd("validate", str(path))
        assert out.returncode == 0, (path, out.stderr)
        resolved = yaml.safe_load(out.stdout)
        run = resolved["base"] if "stages" in resolved else resolved  # pipeline: base run config
        assert run["data"]["sources"], path


def test_validate_rejects_a_broken_config(tmp_path: Path):
    broken = yaml.safe_load((RUN_CONFIG).read_text())
    broken["algorithm"]["eps_low"] = 5.0
    broken["trainer"]["learning_rate"] = 1e-4
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    out = mopd("validate", str(path))
    assert out.returncode == 2
    assert "trainer.learning_rate: unknown key" in out.stderr
    assert out.stdout == ""


def test_validate_reports_cross_field_problems_with_overrides():
    out = mopd(
        "validate",
        str(RUN_CONFIG),
        "algorithm.eps_low=3",
        "algorithm.alpha=-1",
    )
    assert out.returncode == 2
    assert "algorithm.eps_low" in out.stderr and "algorithm.alpha" in out.stderr


def test_train_refuses_invalid_config_before_writing(tmp_path: Path):
    out = mopd(
        "train",
        str(RUN_CONFIG),
        f"run.output_dir={tmp_path}/o",
        "trainer.steps=0",
    )
    assert out.returncode == 2
    assert "trainer.steps" in out.stderr
    assert not (tmp_path / "o").exists()


def test_config_docs():
    out = mopd("config-docs", "algorithm")
    assert out.returncode == 0
    assert "algorithm.eps_low (float, 0.5)" in out.stdout
    assert "trainer." not in out.stdout
    bad = mopd("config-docs", "nope")
    assert bad.returncode == 2 and "sections:" in bad.stderr


def test_train_refuses_before_any_service_starts(tmp_path: Path):
    """A run whose student folder does not exist stops before MLflow, Redis or Ray start:
    the run folder holds no tracking store, no Redis data and no processes file."""
    out = tmp_path / "o"
    result = mopd("train", str(RUN_CONFIG), f"run.output_dir={out}", "tracking.enabled=true")
    assert result.returncode == 1, result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "mlflow.db").exists()
    assert not (out / "redis").exists()
    assert not (out / "logs" / "processes.json").exists()
    assert not (out / "resolved_config.yaml").exists()


def test_train_refuses_a_dashboard_url_before_any_service_starts(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "o"
    result = mopd(
        "train", str(RUN_CONFIG), f"run.output_dir={out}", "cluster.address=http://head:8265"
    )
    assert result.returncode == 1, result.stderr
    assert "is a dashboard URL, which `mopd submit` uses" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "mlflow.db").exists() and not (out / "redis").exists()


def test_train_refuses_an_unknown_reward_before_writing(tmp_path: Path):
    out = tmp_path / "o"
    result = mopd("train", str(CLUSTER), f"run.output_dir={out}", "data.sources.0.reward=nope")
    assert result.returncode == 2
    assert "data.sources[0].reward: unknown reward 'nope'" in result.stderr
    assert not out.exists()


def test_the_run_itself_refuses_an_invalid_config_before_anything(tmp_path: Path):
    """``mopd.run.train`` (what the pipeline and ``mopd submit`` call) validates with the
    registries too: a config loaded without them is refused before any folder or service."""
    import ray

    from mopd.config import ConfigError, load_config
    from mopd.run import train

    out = tmp_path / "o"
    cfg = load_config(RUN_CONFIG, [f"run.output_dir={out}", "data.sources.1.reward=nope"])
    try:
        train(cfg)
    except ConfigError as e:
        assert any(p.startswith("data.sources[1].reward: unknown reward") for p in e.problems)
    else:
        raise AssertionError("train accepted an unknown reward")
    assert not out.exists() and not ray.is_initialized()
