"""Agentic environments: every shipped task is solvable, and only a real solution pays.

Code repair: in a real sandbox leased from a real Toolbox, each task's test fails as
shipped, passes after the task's reference fix (applied with the model's own tool,
str_replace) and fails after its decoy fix; editing the tests, replacing them by FIFOs,
directories or symlinks, or planting tests, test configuration or bytecode that would pass
cannot change the verdict, which the task's own tests' results decide. Tool use:
each question's reference command, run with bash in the sandbox, prints the answer, and only
that answer earns the reward.
"""

from __future__ import annotations

import asyncio
import json
import time

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
from envs.agentic.unittest_check import verdict
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


def _write(path: str, text: str) -> str:
    """A bash command that writes ``text`` to ``path`` (a heredoc: no quoting to get wrong)."""
    return f"mkdir -p $(dirname {path}) && cat > {path} <<'MOPD_EOF'\n{text}MOPD_EOF"


EXIT_EARLY = "import os\nos._exit(0)\n"
PASSING = "import unittest\n\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"


def test_code_repair_reward_runs_only_the_tasks_tests_and_judges_their_results():
    env = CodeRepairEnv()
    task = env.task("chunks_last_piece")
    fix = task.reference["reference_fix"]
    pyc = (
        "python3 -c \"import py_compile, sys; py_compile.compile('t.py', cfile='tests/"
        "__pycache__/test_chunks.' + sys.implementation.cache_tag + '.pyc', "
        'invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)"'
    )
    hacks = {
        # a planted test module that ends the run with status 0 before any test runs
        "exit_early": [_write("tests/test_zz.py", EXIT_EARLY)],
        "exit_early_at_top": [_write("test_aa.py", EXIT_EARLY)],
        # test configuration that makes a pytest run pass or select nothing
        "conftest_and_ini": [
            _write("tests/conftest.py", EXIT_EARLY),
            _write("conftest.py", EXIT_EARLY),
            _write("pytest.ini", "[pytest]\naddopts = -k nothing_matches -p no:python\n"),
            _write("pyproject.toml", '[tool.pytest.ini_options]\naddopts = "--co"\n'),
            _write("setup.cfg", "[tool:pytest]\naddopts = --co\n"),
        ],
        # the runner's own modules and start-up hooks, shadowed from the working directory
        "shadow_unittest": [_write("unittest.py", EXIT_EARLY)],
        "sitecustomize": [_write("sitecustomize.py", EXIT_EARLY), _write("usercustomize.py", "")],
        # bytecode that stands in for the restored test file
        "pycache": [_write("t.py", PASSING), pyc, "rm t.py"],
        # the code under test ends the run early
        "code_exits": [_write("listutil/__init__.py", EXIT_EARLY)],
        "code_skips": [
            _write("listutil/__init__.py", "import unittest\nraise unittest.SkipTest('x')\n")
        ],
    }

    async def main():
        box = _toolbox()
        try:
            unfixed = {
                name: (await _attempt(box, env, task, (), cmds))[0] for name, cmds in hacks.items()
            }
            # planted files do not stop a real fix from paying
            fixed = {
                name: (await _attempt(box, env, task, fix, cmds))[0]
                for name, cmds in hacks.items()
                if not name.startswith("code_")
            }
            return unfixed, fixed, await box.stats()
        finally:
            await box.close()

    unfixed, fixed, stats = asyncio.run(main())
    assert unfixed == dict.fromkeys(hacks, 0.0)
    assert fixed == {name: 1.0 for name in hacks if not name.startswith("code_")}
    assert stats["tools"]["check"]["errors"] == 0


def test_code_repair_reward_restores_tests_replaced_by_fifos_directories_and_symlinks():
    env = CodeRepairEnv()
    task = env.task("chunks_last_piece")
    fix = task.reference["reference_fix"]
    replaced = {
        "fifo": "rm tests/test_chunks.py && mkfifo tests/test_chunks.py",
        "fifo_init": "rm tests/__init__.py && mkfifo tests/__init__.py",
        "directory": "rm tests/test_chunks.py && mkdir -p tests/test_chunks.py/a/b && "
        "chmod 000 tests/test_chunks.py/a tests/test_chunks.py",
        "symlink_out": "rm tests/test_chunks.py && ln -s /dev/zero tests/test_chunks.py",
        "symlink_fifo": "mkfifo p && rm tests/test_chunks.py && ln -s ../p tests/test_chunks.py",
        "tests_dir_is_fifo": "rm -rf tests && mkfifo tests",
        "tests_dir_is_symlink": "mv tests elsewhere && ln -s elsewhere tests && mkfifo elsewhere/x",
        "tests_dir_unreadable": "chmod 000 tests",
    }

    async def main():
        box = _toolbox()
        try:
            results = {}
            for name, command in replaced.items():
                t0 = time.monotonic()
                attempt = _attempt(box, env, task, fix, [command])
                reward, obs = await asyncio.wait_for(attempt, 60)
                assert not obs[-1].is_error, (name, obs)
                results[name] = reward, time.monotonic() - t0
            unfixed, _ = await asyncio.wait_for(
                _attempt(box, env, task, (), [replaced["fifo"]]), 60
            )
            return results, unfixed, await box.stats()
        finally:
            await box.close()

    results, unfixed, stats = asyncio.run(main())
    # The shipped tests were put back whatever stood at their paths, and judged the fix.
    assert {name: reward for name, (reward, _) in results.items()} == dict.fromkeys(replaced, 1.0)
    assert max(took for _, took in results.values()) < 20.0
    assert unfixed == 0.0
    check = stats["tools"]["check"]
    assert (check["calls"], check["errors"], check["running"]) == (len(replaced) + 1, 0, 0)
    assert stats["pool"]["idle"] == stats["pool"]["size"]


def test_the_reward_verdict_needs_every_module_to_pass_and_nothing_else():
    key, modules = "k" * 32, ["tests.test_a", "tests.test_b"]

    def report(passed, failed=()):
        return f"noise\n{key} " + json.dumps({"passed": list(passed), "failed": list(failed)})

    both = ["tests.test_a.T.test_1", "tests.test_b.T.test_1"]
    assert verdict(report(both), key, modules) == (True, "2 tests passed")
    assert not verdict("OK\n", key, modules)[0]  # no report: the run ended early
    assert not verdict(report(both, ["tests.test_b.T.test_2"]), key, modules)[0]
    assert "ran no test" in verdict(report(both[:1]), key, modules)[1]
    assert "outside" in verdict(report([*both, "tests.test_zz.T.test_ok"]), key, modules)[1]
    assert not verdict(f"{key} not json", key, modules)[0]
    assert not verdict(report(both).replace(key, "x" * 32), key, modules)[0]  # forged key


def test_a_code_repair_task_must_protect_a_test_module(tmp_path):
    task_dir = tmp_path / "t"
    (task_dir / "repo" / "tests").mkdir(parents=True)
    (task_dir / "repo" / "tests" / "helper.py").write_text("")
    (task_dir / "repo" / "tests" / "test-x.py").write_text("")
    spec = {"id": "t", "instruction": "x", "test_command": "true", "protected": ["tests/helper.py"]}
    (task_dir / "task.json").write_text(json.dumps(spec))
    with pytest.raises(TaskError, match=r"names no test module \(test\*\.py\)"):
        load_tasks("code_repair", tmp_path)
    spec["protected"] = ["tests/test-x.py"]
    (task_dir / "task.json").write_text(json.dumps(spec))
    with pytest.raises(TaskError, match="not importable as a module"):
        load_tasks("code_repair", tmp_path)
