"""Tool use: questions about files that need bash to answer; the ``finish`` answer is scored.

The sandbox starts with the task's files; the model inspects them (``bash``) and calls
``finish(answer)``. The reward is 1.0 when the answer equals the reference after whitespace
normalisation (``envs.rewards.exact_match``: runs of whitespace become one space, ends
stripped; an ``<answer>...</answer>`` wrapper is accepted), else 0.0, and 0.0 without a
``finish``.
"""

from __future__ import annotations

from typing import Any

from envs.agentic.base import AgenticTask
from envs.agentic.tasks import TaskSet
from envs.rewards import exact_match

__all__ = ["ToolUseEnv"]


class ToolUseEnv(TaskSet):
    """The tool-use environment over the tasks of ``tasks_dir`` (default: shipped)."""

    name = "tool_use"

    async def reward(
        self, task: AgenticTask, toolbox: Any, lease: str, answer: str | None
    ) -> float:
        """Exact match of the ``finish`` answer with the task's answer."""
        del toolbox, lease
        if answer is None:
            return 0.0
        return exact_match(answer, task.answer)
