"""A run whose agents make FIFOs, deep trees and inode floods keeps going.

Real Toolbox, real sandboxes, driven the way rollouts drive them (lease, tool calls, the
environment's reward, release), several trajectories at once and one after another. Each
hostile trajectory is followed by ordinary calls in the same lease and by later leases;
the pool must stay full (every sandbox idle again, none missing, no ``ToolboxBusy``), no
call or reward may take longer than its bound, and once the Toolbox is closed nothing of
any sandbox is left on disk.
"""

from __future__ import annotations

import asyncio
import os
import time

from envs.agentic import CodeRepairEnv
from envs.sandbox import SandboxLimits
from envs.toolbox import Toolbox, ToolboxConfig
from envs.tools import ToolCall
from tests.envs.marks import needs_root

pytestmark = needs_root

LIMITS = SandboxLimits(wall_seconds=10.0, cpu_seconds=8.0, max_inodes=4000)

DEEP = (  # 1500 levels of 5-character names: a path far longer than PATH_MAX (4096)
    "python3 -c \"import os\nfor _ in range(1500): os.mkdir('ddddd'); os.chdir('ddddd')\n"
    "open('leaf', 'w').write('x')\" && echo deep"
)
FLOOD = "python3 -c \"import os\nfor i in range(12000): open(f'f{i}', 'w').close()\"; echo flood"


def bash(command: str) -> ToolCall:
    return ToolCall("bash", {"command": command})


def edit(path: str) -> ToolCall:
    return ToolCall("str_replace", {"path": path, "old": "a", "new": "b"})


HOSTILE = {
    "fifos": [
        bash("mkfifo p && mkdir -p d && mkfifo d/q && ln -s p link && echo made"),
        edit("p"),
        edit("d/q"),
        edit("link"),
        bash("cat p & sleep 0.2; echo hello > p; wait; echo read"),  # inside: its own business
    ],
    "deep_tree": [bash(DEEP), edit("ddddd/ddddd/ddddd"), bash("ls ddddd | head -1")],
    "inode_flood": [bash(FLOOD), bash("ls | wc -l")],
    "all_at_once": [bash(f"mkfifo p; {DEEP}"), bash(FLOOD), edit("p")],
}


def test_fifos_deep_trees_and_inode_floods_leave_the_pool_full_and_nothing_on_disk(tmp_path):
    base = tmp_path / "sandboxes"
    config = ToolboxConfig(
        pool_size=2,
        limits=LIMITS,
        acquire_timeout_s=30.0,
        upkeep_timeout_s=20.0,
        health_interval_s=0.5,  # the idle checks meet the hostile sandboxes too
        base_dir=str(base),
    )
    env = CodeRepairEnv()
    task = env.task("chunks_last_piece")

    async def trajectory(box: Toolbox, calls: list[ToolCall]) -> dict:
        lease = await box.acquire(task.files)
        try:
            observations, slowest = [], 0.0
            for call in [*calls, bash("echo alive")]:
                t0 = time.monotonic()
                observations.append(await box.call(lease, call))
                slowest = max(slowest, time.monotonic() - t0)
            # the protected test replaced by a FIFO at the end, then the reward
            await box.call(lease, bash("rm -f tests/test_chunks.py; mkfifo tests/test_chunks.py"))
            t0 = time.monotonic()
            reward = await env.reward(task, box, lease, None)
            return {
                "obs": observations,
                "slowest": slowest,
                "reward": reward,
                "reward_s": time.monotonic() - t0,
            }
        finally:
            await box.release(lease)

    async def main():
        box = Toolbox(config)
        try:
            names = list(HOSTILE)
            runs = {}
            for pair in (names[:2], names[2:]):  # two at a time: the whole pool leased
                done = await asyncio.gather(*(trajectory(box, HOSTILE[n]) for n in pair))
                runs.update(zip(pair, done, strict=True))
            await asyncio.sleep(1.2)  # a couple of idle health checks
            after = await box.stats()
            # later leases: the task's files, ordinary work, the reward of a real fix (its
            # tests replaced by a FIFO, a directory, nothing: restored as shipped)
            later = []
            for sabotage in ("mkfifo p", "mkdir -p p/q", "true"):
                lease = await box.acquire(task.files)
                try:
                    for e in task.reference["reference_fix"]:
                        await box.call(lease, ToolCall("str_replace", dict(e)))
                    await box.call(lease, bash(f"rm -f tests/test_chunks.py; {sabotage}"))
                    await box.call(lease, bash("mv p tests/test_chunks.py || true"))
                    later.append(await env.reward(task, box, lease, None))
                finally:
                    await box.release(lease)
            return runs, after, later, await box.stats()
        finally:
            await asyncio.wait_for(box.close(), 60)

    runs, after, later, final = asyncio.run(asyncio.wait_for(main(), 150))  # never hangs

    for name, run in runs.items():
        texts = [o.text for o in run["obs"]]
        assert texts[-1] == "alive\n[exit code 0]", (name, texts)  # the same lease goes on
        assert run["slowest"] < 15.0, (name, run["slowest"])
        assert run["reward"] == 0.0 and run["reward_s"] < 15.0, name  # unfixed, judged in time
    fifo_edits = runs["fifos"]["obs"][1:4]
    assert all(o.is_error and "str_replace" in o.text for o in fifo_edits), fifo_edits
    assert runs["fifos"]["obs"][4].text == "hello\nread\n[exit code 0]"
    assert runs["deep_tree"]["obs"][0].text == "deep\n[exit code 0]"
    assert "disk limit" in runs["inode_flood"]["obs"][0].text
    pool = after["pool"]
    assert (pool["idle"], pool["leased"], pool["missing"], pool["unclosed"]) == (2, 0, 0, 0)
    assert final["pool"]["idle"] == 2 and final["pool"]["acquires"] == 4 + 3
    assert final["tools"]["check"]["running"] == 0
    assert all(t["running"] == 0 for t in final["tools"].values())
    assert later == [1.0, 1.0, 1.0]
    assert os.listdir(base) == []  # every sandbox's files are gone, hostile ones included
