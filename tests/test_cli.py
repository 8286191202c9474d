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
