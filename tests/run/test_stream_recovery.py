"""Recovery of the training stream at a restart (issue 20, item 11): what the checkpoints and
the audit log say was trained is never trained again, even from a Redis that lost writes it
had acknowledged, and every pending sample comes back, however many there are."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mopd.run.ledger import StreamLedger, read_audit_log
from mopd.run.state import RunState
from mopd.scheduler.codec import encode
from mopd.scheduler.stream import TrainingStream
from tests.scheduler.test_codec import scored
from tests.scheduler.test_scheduler import make, sum_source


def _ids(deliveries) -> list[str]:
    return [d.sample.sample.sample_id for d in deliveries]


def _ledger(rclient, namespace: str, audit: Path, state: RunState) -> StreamLedger:
    scheduler = make([sum_source()], max_inflight_groups=64)
    return StreamLedger(TrainingStream(rclient, namespace), scheduler, state, audit, sync_mode=True)


def test_recovery_never_retrains_a_committed_step_the_redis_forgot(
    rclient, namespace, tmp_path: Path
):
    audit = tmp_path / "audit.jsonl"
    state = RunState(step=0, version=0)
    ledger = _ledger(rclient, namespace, audit, state)
    ledger.stream.publish([scored(f"s{i}") for i in range(8)])
    for step in (1, 2):
        batch, _, _ = asyncio.run(ledger.next_batch(4))
        state.step, state.version = step, step
        ledger.trained(batch, step=step, trained_at_version=step - 1)
        ids = ledger.checkpoint_ids()
        if step == 2:
            ledger.committed(ids)
        else:
            # Checkpoint 1 is on disk, but the Redis (an external one that fsyncs once a
            # second) lost its commit when it was killed: s0..s3 are pending again.
            ledger.uncommitted = []
    assert ledger.stream.trained_ids() == {"s4", "s5", "s6", "s7"}

    restarted = _ledger(rclient, namespace, audit, RunState(step=2, version=2))
    assert restarted.recover(ids) == 0  # nothing to train again: both steps are committed
    assert restarted.stream.trained_ids() == {f"s{i}" for i in range(8)}
    assert restarted.stream.depth() == {"undelivered": 0, "pending": 0, "trained": 8}
    assert [r["samples"] for r in read_audit_log(audit)] == [
        ["s0", "s1", "s2", "s3"],
        ["s4", "s5", "s6", "s7"],
    ]


def test_recover_returns_every_pending_sample_not_only_the_first_ten_thousand(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    n = 10_050
    payload = encode(scored("p", t=1))  # the same bytes under every id: only ids matter here
    pipe = rclient.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream.stream_key, {"id": f"p{i}", "data": payload})
    pipe.execute()
    # All delivered, then the trainer died.
    rclient.xreadgroup(stream.GROUP, "trainer", {stream.stream_key: ">"}, count=n)
    restarted = TrainingStream(rclient, namespace)
    assert len(restarted.recover("trainer", count=25)) == 25
    recovered = restarted.recover("trainer")
    assert len(recovered) == n
    assert {d.entry_id for d in recovered} == {
        e.decode() for e, _ in rclient.xrange(stream.stream_key, count=n + 1)
    }
