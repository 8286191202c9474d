"""Loading agentic tasks from disk: one directory per task with a ``task.json``.

Layout (``envs/tasks/`` ships examples)::

    <env tasks dir>/<task_id>/task.json    # the task's fields, below
    <env tasks dir>/<task_id>/repo/        # code repair: the repository (copied into the sandbox)
    <env tasks dir>/<task_id>/files/       # tool use: the files the question is about

``task.json`` fields: ``id`` (must equal the directory name), ``instruction``; for code repair
``test_command`` (the command the instruction names) and ``protected`` (paths under
``repo/``: the tests, restored before the reward; its ``test*.py`` files are the unittest
modules the reward runs, at least one), optional ``check_timeout_s``, and ``reference_fix``
/ ``decoy_fix``; for tool use ``answer`` and
``reference_command``. A malformed task fails at load time naming the file and the field.

``TaskSet`` holds the loaded tasks of one environment; the environments of ``envs.agentic``
subclass it and add their ``reward``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from envs.agentic.base import AgenticTask

__all__ = ["TASKS_DIR", "TaskError", "TaskSet", "load_tasks"]

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
"""The tasks shipped with the repository (``envs/tasks``)."""

_FILES_DIR = {"code_repair": "repo", "tool_use": "files"}
_REQUIRED = {
    "code_repair": ("id", "instruction", "test_command"),
    "tool_use": ("id", "instruction", "answer"),
}
_REFERENCE_KEYS = ("reference_fix", "decoy_fix", "reference_command")


class TaskError(ValueError):
    """A task directory or ``task.json`` that cannot be used (names the file and the fix)."""


def _edits(raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not all(
        isinstance(e, dict) and {"path", "old", "new"} <= set(e) for e in raw
    ):
        raise TaskError(f"{where} must be a list of {{path, old, new}} str_replace edits")
    return [{k: str(e[k]) for k in ("path", "old", "new")} for e in raw]


def _check_test_modules(spec_path: Path, protected: tuple[str, ...]) -> None:
    """The reward runs the protected ``test*.py`` files as unittest modules: there must be
    one, and each must be importable by a module name."""
    tests = [PurePosixPath(r) for r in protected if PurePosixPath(r).name.startswith("test")]
    tests = [t for t in tests if t.suffix == ".py"]
    if not tests:
        raise TaskError(
            f"{spec_path}: 'protected' names no test module (test*.py); the reward runs exactly "
            "the protected test modules, so list the task's unittest files there"
        )
    for path in tests:
        parts = path.with_suffix("").parts
        if path.is_absolute() or not all(p.isidentifier() for p in parts):
            raise TaskError(
                f"{spec_path}: protected test {str(path)!r} is not importable as a module "
                "(a relative path of Python identifiers)"
            )


def _load_one(env: str, task_dir: Path) -> AgenticTask:
    spec_path = task_dir / "task.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaskError(f"{spec_path}: cannot read the task ({e})") from e
    if not isinstance(spec, dict):
        raise TaskError(f"{spec_path}: must hold a JSON object")
    missing = [k for k in _REQUIRED[env] if not isinstance(spec.get(k), str) or not spec[k]]
    if missing:
        raise TaskError(f"{spec_path}: missing or empty field(s) {missing} (strings)")
    if spec["id"] != task_dir.name:
        raise TaskError(f"{spec_path}: id {spec['id']!r} differs from its directory's name")
    files = task_dir / _FILES_DIR[env]
    if not files.is_dir():
        raise TaskError(f"{task_dir}: has no {_FILES_DIR[env]}/ directory with the task's files")
    protected = tuple(str(p) for p in spec.get("protected", ()))
    for rel in protected:
        if not (files / rel).is_file():
            raise TaskError(f"{spec_path}: protected file {rel!r} is not under {files}")
    if env == "code_repair":
        _check_test_modules(spec_path, protected)
    reference: dict[str, Any] = {}
    for key in _REFERENCE_KEYS:
        if key in spec:
            value = spec[key]
            reference[key] = str(value) if key == "reference_command" else _edits(value, key)
    return AgenticTask(
        env=env,
        task_id=spec["id"],
        instruction=spec["instruction"],
        files=files,
        answer=spec.get("answer"),
        test_command=spec.get("test_command"),
        protected=protected,
        check_timeout_s=float(spec.get("check_timeout_s", 60.0)),
        reference=reference,
    )


def load_tasks(env: str, tasks_dir: str | Path | None = None) -> tuple[AgenticTask, ...]:
    """Every task of environment ``env`` under ``tasks_dir`` (default: the shipped
    ``envs/tasks/<env>``), sorted by id."""
    if env not in _FILES_DIR:
        raise TaskError(f"unknown agentic environment {env!r}; known: {', '.join(_FILES_DIR)}")
    root = Path(tasks_dir) if tasks_dir is not None else TASKS_DIR / env
    if not root.is_dir():
        raise TaskError(f"tasks directory {root} does not exist")
    tasks = tuple(_load_one(env, d) for d in sorted(root.iterdir()) if (d / "task.json").is_file())
    if not tasks:
        raise TaskError(f"{root} holds no task (no <task_id>/task.json)")
    return tasks


class TaskSet:
    """The tasks of one environment, loaded from ``tasks_dir`` (default: the shipped ones);
    an environment subclasses it and adds its ``reward``."""

    name: str

    def __init__(self, tasks_dir: str | Path | None = None) -> None:
        self._tasks = {t.task_id: t for t in load_tasks(self.name, tasks_dir)}

    def tasks(self) -> tuple[AgenticTask, ...]:
        return tuple(self._tasks.values())

    def task(self, task_id: str) -> AgenticTask:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise KeyError(
                f"no {self.name} task {task_id!r}; known: {', '.join(sorted(self._tasks))}"
            ) from None
