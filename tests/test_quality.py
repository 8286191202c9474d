"""Quality gates that run with the test suite: ruff lint + format, import contracts.

The import contracts (setup.cfg [importlinter]) keep the architecture of style.md:
role packages never import each other, and the pure core imports no role, Ray,
SGLang or Megatron.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(cmd[0])
    if exe is None:
        pytest.fail(f"{cmd[0]} is not installed; install the dev extra: pip install -e '.[dev]'")
    return subprocess.run([exe, *cmd[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_lint():
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    out = _run("ruff", "format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_contracts():
    out = _run("lint-imports", "--no-cache")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout, out.stdout
