"""Agentic environments: multi-turn tasks solved with tools in a sandbox.

``ENVIRONMENTS`` maps the name a data source uses to the environment class. A prompt of an
agentic source carries ``Prompt.metadata["agentic"] = {"env": <name>, "task_id": <id>}``
(``task_records`` writes such records, one per task, for a ``jsonl`` data source; the shipped
tasks' records are ``envs/tasks/<env>.jsonl``); ``envs.tool_manager.ToolManager`` looks the
task up, runs the trajectory and sets the reward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.agentic.base import AgenticEnv, AgenticTask, toolbox_call
from envs.agentic.code_repair import CodeRepairEnv
from envs.agentic.tasks import TASKS_DIR, TaskError, load_tasks
from envs.agentic.tool_use import ToolUseEnv

__all__ = [
    "ENVIRONMENTS",
    "METADATA_KEY",
    "TASKS_DIR",
    "AgenticEnv",
    "AgenticTask",
    "CodeRepairEnv",
    "TaskError",
    "ToolUseEnv",
    "build_env",
    "load_tasks",
    "task_records",
    "toolbox_call",
    "write_task_records",
]

ENVIRONMENTS: dict[str, type] = {"code_repair": CodeRepairEnv, "tool_use": ToolUseEnv}
"""Environment name (``Prompt.metadata["agentic"]["env"]``) -> environment class."""

METADATA_KEY = "agentic"
"""The key of ``Prompt.metadata`` that names an agentic task."""


def build_env(name: str, tasks_dir: str | Path | None = None) -> AgenticEnv:
    """The environment called ``name`` over ``tasks_dir`` (default: its shipped tasks)."""
    try:
        cls = ENVIRONMENTS[name]
    except KeyError:
        raise KeyError(
            f"unknown agentic environment {name!r}; known: {', '.join(sorted(ENVIRONMENTS))}"
        ) from None
    return cls(tasks_dir)


def task_records(env: AgenticEnv) -> list[dict[str, Any]]:
    """One ``jsonl`` data-source record per task: ``prompt`` (the instruction), ``answer``
    (tool use) and ``metadata.agentic`` naming the task."""
    records = []
    for task in env.tasks():
        record: dict[str, Any] = {"prompt": task.instruction}
        if task.answer is not None:
            record["answer"] = task.answer
        record["metadata"] = {METADATA_KEY: {"env": env.name, "task_id": task.task_id}}
        records.append(record)
    return records


def write_task_records(env: AgenticEnv, path: str | Path) -> Path:
    """Write ``task_records(env)`` as a jsonl file (one record per line)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in task_records(env)))
    return path
