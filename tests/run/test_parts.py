"""The run wing's parts on their own: the stream ledger on a real Redis (batch, audit log,
checkpoint ids, commit, recovery with clamped versions), the slot pool, the scheduler's
too-stale report the producer acts on, and the step metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mopd.run.ledger import StreamLedger, staleness_metrics
from mopd.run.metrics import StepStats, summary_line
from mopd.run.producer import SlotPool
from mopd.run.state import RunPaths, RunState
from mopd.scheduler.stream import TrainingStream
from tests.scheduler.test_codec import scored
from tests.scheduler.test_scheduler import make, sum_source


def _versioned(sample_id: str, versions: list[int]):
    s = scored(sample_id, t=len(versions))
    sample = dataclasses.replace(s.sample, versions_T=np.asarray(versions, dtype=np.int32))
    return dataclasses.replace(s, sample=sample)


def _ledger(rclient, namespace, tmp_path: Path, state: RunState, **sched) -> StreamLedger:
    scheduler = make([sum_source()], max_inflight_groups=64, **sched)
    stream = TrainingStream(rclient, namespace)
    return StreamLedger(stream, scheduler, state, tmp_path / "audit.jsonl", sync_mode=True)


def _ids(deliveries) -> list[str]:
    return [d.sample.sample.sample_id for d in deliveries]


def test_ledger_batch_audit_commit_and_recovery(rclient, namespace, tmp_path: Path):
    state = RunState(step=0, version=0)
    ledger = _ledger(rclient, namespace, tmp_path, state)
    ledger.stream.publish([_versioned(f"s{i}", [0, 0, 0]) for i in range(4)])

    batch, selection, candidates = asyncio.run(ledger.next_batch(4))
    assert _ids(batch) == ["s0", "s1", "s2", "s3"] and candidates == 4
    assert selection.num_partial == 0 and not selection.dropped_stale
    state.step, state.version = 1, 1
    ledger.trained(batch, step=1, trained_at_version=0)
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record == {
        "step": 1,
        "trained_at_version": 0,
        "samples": ["s0", "s1", "s2", "s3"],
        "oldest_token_versions": [0, 0, 0, 0],
    }
    ids = ledger.checkpoint_ids()
    assert ids["commit"]["samples"] == ["s0", "s1", "s2", "s3"] and ids["drop"]["samples"] == []
    ledger.committed(ids)
    assert ledger.stream.depth()["trained"] == 4 and not ledger.uncommitted

    # Step 2 trains two samples of version 1, then the trainer dies before its checkpoint.
    ledger.stream.publish([_versioned(f"s{i}", [1, 1, 1]) for i in (4, 5)])
    batch2, _, _ = asyncio.run(ledger.next_batch(4))
    assert _ids(batch2) == ["s4", "s5"]
    ledger.trained(batch2, step=2, trained_at_version=1)
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 2

    restarted = _ledger(rclient, namespace, tmp_path, RunState(step=1, version=2))
    assert restarted.recover({"commit": ids["commit"], "drop": ids["drop"]}) == 2
    assert _ids(restarted.waiting) == ["s4", "s5"]
    # Recovered samples outlived the policy that made them: they count as the trainer's.
    assert all(d.sample.sample.versions_T.tolist() == [2, 2, 2] for d in restarted.waiting)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]  # step 2 was never committed


def test_clamp_versions_caps_samples_newer_than_the_trainer(rclient, namespace, tmp_path: Path):
    ledger = _ledger(rclient, namespace, tmp_path, RunState(step=3, version=3))
    ledger.stream.publish([_versioned("new", [2, 4, 5]), _versioned("old", [1, 2, 3])])
    got = ledger.stream.read("trainer", count=10)
    clamped = {d.sample.sample.sample_id: d for d in ledger.clamp_versions(got)}
    assert clamped["new"].sample.sample.versions_T.tolist() == [2, 3, 3]
    assert clamped["old"] is got[1]  # untouched, the same delivery


def test_staleness_metrics_of_a_batch(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([_versioned("a", [3, 4]), _versioned("b", [1, 4])])
    batch = stream.read("trainer", count=2)
    assert staleness_metrics(batch, trained_at_version=4) == {
        "staleness/mean": 2.0,
        "staleness/max": 3.0,
    }


def test_too_stale_groups_are_those_handed_out_past_the_bound():
    sched = make([sum_source()], mode="async", max_staleness=1, max_inflight_groups=8)
    early = sched.next_groups(2)
    sched.on_weight_update(1)
    late = sched.next_groups(1)
    assert sched.too_stale_groups(1) == []
    assert sorted(sched.too_stale_groups(2)) == sorted(g.group_id for g in early)
    assert set(sched.too_stale_groups(3)) == {g.group_id for g in early + late}
    sched.requeue(early[0].group_id)  # no longer in flight: not reported
    assert early[0].group_id not in sched.too_stale_groups(3)


def test_slot_pool_counts_and_signals():
    async def run() -> None:
        pool = SlotPool()
        pool.take(3)
        assert pool.fits(1, capacity=4) and not pool.fits(2, capacity=4)
        waiter = asyncio.create_task(pool.freed.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        pool.give(2)
        await asyncio.wait_for(waiter, 1.0)
        assert pool.held == 1 and pool.fits(3, capacity=4)

    asyncio.run(run())


def test_step_stats_and_summary_line():
    stats = StepStats()
    stats.phase_s["rollout"] += 1.5
    stats.rollout["reward/arith"].extend([1.0, 0.0])
    stats.rollout["response_length/arith"].extend([10, 30])
    m = stats.metrics(step_s=2.0)
    assert m["time/rollout_s"] == 1.5 and m["time/step_s"] == 2.0
    assert m["rollout/reward/arith"] == 0.5 and m["rollout/response_length/arith"] == 20.0
    assert m["throughput/rollout_tokens_per_s"] == 20.0
    line = summary_line(7, {**m, "loss": 0.25, "eval/accuracy/arith": 0.75})
    assert line == "step 7  loss=0.25  s=2  reward/arith=0.500  acc/arith=0.750"
    stats.clear()
    assert stats.metrics(step_s=0.0)["throughput/rollout_tokens_per_s"] == 0.0


def test_run_paths_find_committed_checkpoints_only(tmp_path: Path):
    from trainer.checkpoint import atomic_dir

    paths = RunPaths(tmp_path)
    paths.make_dirs()
    assert paths.latest_checkpoint() is None
    with atomic_dir(paths.checkpoint(2)):
        pass
    paths.checkpoint(5).mkdir()  # never committed (a crash mid-save)
    assert paths.latest_checkpoint() == paths.checkpoint(2)
    assert paths.committed_checkpoints() == [paths.checkpoint(2)]
    with pytest.raises(ValueError, match="non-negative"):
        paths.checkpoint(-1)
