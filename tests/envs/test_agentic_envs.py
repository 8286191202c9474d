"""Agentic environments: every shipped task is solvable, and only a real solution pays.

Code repair: in a real sandbox leased from a real Toolbox, each task's test fails as
shipped, passes after the task's reference fix (applied with the model's own tool,
str_replace) and fails after its decoy fix; editing the tests cannot make them pass. Tool use:
each question's reference command, run with bash in the sandbox, prints the answer, and only
that answer earns the reward.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from envs.agentic import (
    ENVIRONMENTS,
    TASKS_DIR,
    CodeRepairEnv,
    TaskError,
    ToolUseEnv,
    build_env,
    load_tasks,
    task_records,
)
from envs.registry import get_reward
from envs.sandbox import SandboxLimits
from envs.toolbox import Toolbox, ToolboxConfig
from envs.tools import ToolCall

LIMITS = SandboxLimits(wall_seconds=30.0, cpu_seconds=20.0)


def _toolbox() -> Toolbox:
    return Toolbox(ToolboxConfig(pool_size=2, limits=LIMITS, health_interval_s=None))


async def _attempt(box, env, task, edits=(), commands=(), answer=None):
    """Lease the task's sandbox, apply edits and commands as tool calls, then score."""
    lease = await box.acquire(task.files)
    try:
        observations = [await box.call(lease, ToolCall("str_replace", dict(e))) for e in edits] + [
            await box.call(lease, ToolCall("bash", {"command": c})) for c in commands
        ]
        return await env.reward(task, box, lease, answer), observations
    finally:
        await box.release(lease)


def test_shipped_tasks_load_and_match_their_jsonl_records():
    for name in ENVIRONMENTS:
        env = build_env(name)
        tasks = env.tasks()
        assert len(tasks) >= 4, name
        assert len({t.task_id for t in tasks}) == len(tasks)
        lines = (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == task_records(env), (
            f"envs/tasks/{name}.jsonl is stale: regenerate it with "
            f"envs.agentic.write_task_records(build_env({name!r}), path)"
        )
    assert {t.task_id for t in CodeRepairEnv().tasks()} >= {"chunks_last_piece", "slugify_case"}


def test_every_code_repair_task_fails_as_shipped_passes_fixed_and_fails_with_the_decoy():
    env = CodeRepairEnv()

    async def main():
        box = _toolbox()
        try:
            results = {}
            for task in env.tasks():
                ref, decoy = task.reference["reference_fix"], task.reference["decoy_fix"]
                shipped, _ = await _attempt(box, env, task)
                fixed, obs = await _attempt(box, env, task, ref)
                assert all(not o.is_error for o in obs), (task.task_id, obs)
                wrong, obs = await _attempt(box, env, task, decoy)
                assert all(not o.is_error for o in obs), (task.task_id, obs)
                results[task.task_id] = (shipped, fixed, wrong)
            return results, await box.stats()
        finally:
            await box.close()

    results, stats = asyncio.run(main())
    assert results == {t.task_id: (0.0, 1.0, 0.0) for t in env.tasks()}
    assert stats["tools"]["check"]["calls"] == 3 * len(results)


def test_code_repair_reward_ignores_edits_to_the_tests_and_the_finish_answer():
    env = CodeRepairEnv()
    task = env.task("chunks_last_piece")
    gut_tests = "printf 'import unittest\\n' > tests/test_chunks.py"
    delete_tests = "rm -rf tests"

    async def main():
        box = _toolbox()
        try:
            gutted, _ = await _attempt(box, env, task, commands=[gut_tests], answer="fixed")
            deleted, _ = await _attempt(box, env, task, commands=[delete_tests], answer="fixed")
            # a real fix still passes when the tests were also tampered with
            both, _ = await _attempt(box, env, task, task.reference["reference_fix"], [gut_tests])
            return gutted, deleted, both
        finally:
            await box.close()

    assert asyncio.run(main()) == (0.0, 0.0, 1.0)


def test_every_tool_use_task_is_answerable_with_bash_and_only_its_answer_pays():
    env = ToolUseEnv()

    async def main():
        box = _toolbox()
        try:
            results = {}
            for task in env.tasks():
                lease = await box.acquire(task.files)
                try:
                    obs = await box.call(
                        lease, ToolCall("bash", {"command": task.reference["reference_command"]})
                    )
                    printed = obs.text.rsplit("[exit code", 1)[0].strip()
                    results[task.task_id] = (
                        printed == task.answer,
                        await env.reward(task, box, lease, f"  {printed}\n"),
                        await env.reward(task, box, lease, printed + "0"),
                        await env.reward(task, box, lease, None),
                    )
                finally:
                    await box.release(lease)
            return results
        finally:
            await box.close()

    assert asyncio.run(main()) == {t.task_id: (True, 1.0, 0.0, 0.0) for t in env.tasks()}


def test_malformed_tasks_fail_at_load_naming_the_file(tmp_path):
    task_dir = tmp_path / "broken"
    task_dir.mkdir()
    (task_dir / "task.json").write_text(json.dumps({"id": "broken", "instruction": "fix it"}))
    with pytest.raises(TaskError, match=r"broken/task.json: missing .*test_command"):
        load_tasks("code_repair", tmp_path)
    (task_dir / "task.json").write_text(
        json.dumps({"id": "other", "instruction": "x", "test_command": "true"})
    )
    with pytest.raises(TaskError, match="differs from its directory"):
        load_tasks("code_repair", tmp_path)
    (task_dir / "task.json").write_text(
        json.dumps({"id": "broken", "instruction": "x", "test_command": "true"})
    )
    with pytest.raises(TaskError, match="no repo/ directory"):
        load_tasks("code_repair", tmp_path)
    (task_dir / "repo").mkdir()
    (task_dir / "task.json").write_text(
        json.dumps(
            {"id": "broken", "instruction": "x", "test_command": "true", "protected": ["t.py"]}
        )
    )
    with pytest.raises(TaskError, match=r"protected file 't\.py'"):
        load_tasks("code_repair", tmp_path)
    with pytest.raises(TaskError, match="unknown agentic environment"):
        load_tasks("chess", tmp_path)
    with pytest.raises(KeyError, match="known: binary_search_bounds"):
        CodeRepairEnv().task("nope")


def test_the_agentic_reward_name_exists_but_never_scores():
    # A config's agentic source passes reward-name validation; scoring one of its samples in
    # the reward worker is a wiring error (the ToolManager already set the reward).
    with pytest.raises(ValueError, match=r"ToolManager sets RolloutSample\.reward"):
        get_reward("agentic")("response", None, {})
