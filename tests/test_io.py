"""mopd.io: atomic JSON/text writes and scoped environment variables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mopd.io import scoped_env, write_json_atomic, write_text_atomic


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path: Path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{"a": 1}'
    write_json_atomic(path, {"b": [1, 2]}, indent=1)
    assert path.read_text() == json.dumps({"b": [1, 2]}, indent=1) + "\n"
    write_text_atomic(tmp_path / "t.txt", "x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "t.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}


def test_scoped_env_restores_what_was_there(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MOPD_T_KEEP", "old")
    monkeypatch.delenv("MOPD_T_NEW", raising=False)
    with scoped_env(MOPD_T_KEEP="new", MOPD_T_NEW="1", MOPD_T_NONE=None):
        assert os.environ["MOPD_T_KEEP"] == "new" and os.environ["MOPD_T_NEW"] == "1"
        assert "MOPD_T_NONE" not in os.environ
    assert os.environ["MOPD_T_KEEP"] == "old" and "MOPD_T_NEW" not in os.environ
    with pytest.raises(RuntimeError), scoped_env(MOPD_T_KEEP="x"):
        raise RuntimeError
    assert os.environ["MOPD_T_KEEP"] == "old"
