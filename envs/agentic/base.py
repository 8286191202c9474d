"""What an agentic environment is: tasks that run in a sandbox, and a reward for a trajectory.

An ``AgenticTask`` is one shipped (or user-provided) task: the instruction the model reads,
the files its sandbox starts from, and what decides success. An ``AgenticEnv`` owns a set of
tasks and scores a finished trajectory of one of them, in the sandbox the trajectory used
(``reward``), so the reward is known as soon as the trajectory ends.

Produced by: ``envs.agentic.tasks`` (loading, and ``TaskSet``, the base of the environments
of this package).
Consumed by: ``envs.tool_manager.ToolManager`` (instruction, files, reward), and data sources
that name tasks by ``Prompt.metadata["agentic"] = {"env": ..., "task_id": ...}``.

The ``toolbox`` an environment is given is either a ``Toolbox`` or its Ray actor handle;
``toolbox_call`` awaits a method of either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["AgenticEnv", "AgenticTask", "toolbox_call"]


@dataclass(frozen=True)
class AgenticTask:
    """One task of an agentic environment."""

    env: str
    """Name of the environment it belongs to (``code_repair``, ``tool_use``)."""
    task_id: str
    """Unique within its environment."""
    instruction: str
    """What the model is asked to do (the user turn after the system prompt)."""
    files: Path
    """Directory copied into the sandbox's working directory at the start of a trajectory."""
    answer: str | None = None
    """Reference answer of a question task (compared with the ``finish`` answer)."""
    test_command: str | None = None
    """The command the instruction tells the model to run its tests with (code repair). The
    reward does not run it: it runs the protected test modules itself and judges their
    results (``envs.agentic.code_repair``)."""
    protected: tuple[str, ...] = ()
    """Files (relative to ``files``) restored as shipped before the reward's test run, so
    that edits the model made to them (the tests themselves) cannot change the verdict; its
    ``test*.py`` files are the test modules that run."""
    check_timeout_s: float = 60.0
    """Wall-time limit of the reward's test run."""
    reference: Mapping[str, Any] = field(default_factory=dict)
    """Known solutions and non-solutions, for tests that prove the task is solvable:
    ``reference_fix`` / ``decoy_fix`` (lists of ``{path, old, new}`` str_replace edits) or
    ``reference_command`` (a bash command that prints the answer)."""


async def toolbox_call(toolbox: Any, method: str, *args: Any) -> Any:
    """``await toolbox.<method>(*args)`` on a ``Toolbox`` or on its Ray actor handle."""
    fn = getattr(toolbox, method)
    remote = getattr(fn, "remote", None)
    return await (remote(*args) if remote is not None else fn(*args))


@runtime_checkable
class AgenticEnv(Protocol):
    """An environment: its tasks, and the reward of a finished trajectory."""

    name: str

    def tasks(self) -> tuple[AgenticTask, ...]:
        """Every task, in a stable order."""
        ...

    def task(self, task_id: str) -> AgenticTask:
        """One task by id (``KeyError`` naming the known ids otherwise)."""
        ...

    async def reward(
        self, task: AgenticTask, toolbox: Any, lease: str, answer: str | None
    ) -> float:
        """Score the trajectory that ran in ``lease``'s sandbox and ended with ``answer``
        (the ``finish`` argument; None when it never called finish). In [0, 1]."""
        ...
