"""Code repair: a small repository with a failing unit test; solved when the test passes.

The model edits the repository in its sandbox (``bash``, ``str_replace``) and calls
``finish``. The reward is computed in the same sandbox when the trajectory ends, whether or
not the model called ``finish``, under the Toolbox's ``check`` quota:

1. the task's protected files (its tests) are restored as shipped: whatever the model left
   at their paths (an edited file, a FIFO, a directory, a symlink) is removed unopened and
   the shipped text written back (``Toolbox.run_check``);
2. exactly the task's own test modules (the protected ``test*.py`` files) run, loaded by
   name with unittest by a runner of ours (``envs.agentic.unittest_check``), not the
   workdir's test command: tests the model planted (``tests/test_zz.py`` calling
   ``os._exit(0)``), ``conftest.py``/ini files, a ``unittest.py`` or ``sitecustomize.py``
   in the working directory, bytecode in ``__pycache__`` take no part;
3. the reward is 1 iff the runner's report shows every one of those modules ran tests and
   every test passed (skips and expected failures do not pass); anything else (a failure,
   a run that ended early, a time limit, a check that could not run) is 0.

``test_command`` is the command the instruction tells the model to run; the reward judges
the same tests by their results, not by that command's exit status. So a task's tests must
be unittest test cases.

Restoring the tests and running only them keeps the simple reward hacks (editing, deleting
or replacing the tests, planting tests or test configuration that pass) from paying. What
it does not stop, and the threat model accepts: code under test that detects the test run
and special-cases it, or a planted module that shadows one the tests import.
"""

from __future__ import annotations

import logging
import secrets
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

from envs.agentic import unittest_check
from envs.agentic.base import AgenticTask, toolbox_call
from envs.agentic.tasks import TaskSet

__all__ = ["CodeRepairEnv", "task_test_modules"]

log = logging.getLogger(__name__)

_RUNNER_SOURCE = Path(unittest_check.__file__).read_text()


def task_test_modules(task: AgenticTask) -> list[str]:
    """The unittest modules of a task: its protected ``test*.py`` files, as module names."""
    return [
        ".".join(PurePosixPath(rel).with_suffix("").parts)
        for rel in task.protected
        if PurePosixPath(rel).name.startswith("test") and rel.endswith(".py")
    ]


class CodeRepairEnv(TaskSet):
    """The code-repair environment over the tasks of ``tasks_dir`` (default: shipped)."""

    name = "code_repair"

    async def reward(
        self, task: AgenticTask, toolbox: Any, lease: str, answer: str | None
    ) -> float:
        """1.0 if every test of the task's own test modules passes in the lease's sandbox,
        else 0.0 (see the module docstring)."""
        del answer  # the repository's state decides, not what the model says about it
        modules = task_test_modules(task)
        key = secrets.token_hex(16)
        check_dir = f".mopd-check-{secrets.token_hex(8)}"
        files = {rel: (task.files / rel).read_text() for rel in task.protected}
        files[f"{check_dir}/runner.py"] = _RUNNER_SOURCE
        files[f"{check_dir}/key"] = key
        command = (
            f"python3 -I -B -X pycache_prefix=/tmp/mopd-pyc {check_dir}/runner.py {check_dir} "
            + " ".join(shlex.quote(m) for m in modules)
        )
        try:
            result = await toolbox_call(
                toolbox, "run_check", lease, command, task.check_timeout_s, files
            )
        except RuntimeError as e:  # refused or broken sandbox: no evidence of a fix
            log.warning("code_repair %s: the tests did not run: %s", task.task_id, e)
            return 0.0
        if result.timed_out or result.exit_code != 0:
            return 0.0
        passed, why = unittest_check.verdict(result.output, key, modules)
        log.debug("code_repair %s: %s", task.task_id, why)
        return 1.0 if passed else 0.0
