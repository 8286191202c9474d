"""Code repair: a small repository with a failing unit test; solved when the test passes.

The model edits the repository in its sandbox (``bash``, ``str_replace``) and calls
``finish``. The reward is computed in the same sandbox when the trajectory ends, whether or
not the model called ``finish``: the task's protected files (its tests) are first restored
from the task, then ``test_command`` runs under the Toolbox's ``check`` quota; exit code 0 is
reward 1, anything else (failure, time limit, a command that could not run) 0.

Restoring the tests keeps the simplest reward hack (editing or deleting the test) from
paying. What it does not stop, and the threat model accepts: code that detects the test
run and special-cases it, or a planted module that shadows one the tests import.
"""

from __future__ import annotations

import logging
from typing import Any

from envs.agentic.base import AgenticTask, toolbox_call
from envs.agentic.tasks import TaskSet

__all__ = ["CodeRepairEnv"]

log = logging.getLogger(__name__)


class CodeRepairEnv(TaskSet):
    """The code-repair environment over the tasks of ``tasks_dir`` (default: shipped)."""

    name = "code_repair"

    async def reward(
        self, task: AgenticTask, toolbox: Any, lease: str, answer: str | None
    ) -> float:
        """1.0 if the task's test command passes in the lease's sandbox, else 0.0."""
        del answer  # the repository's state decides, not what the model says about it
        assert task.test_command is not None
        restore = {rel: (task.files / rel).read_text() for rel in task.protected}
        try:
            result = await toolbox_call(
                toolbox, "run_check", lease, task.test_command, task.check_timeout_s, restore
            )
        except RuntimeError as e:  # refused or broken sandbox: no evidence of a fix
            log.warning("code_repair %s: test command did not run: %s", task.task_id, e)
            return 0.0
        return 1.0 if result.exit_code == 0 and not result.timed_out else 0.0
