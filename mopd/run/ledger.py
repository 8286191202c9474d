"""The stream ledger: which training-stream entries are trained, dropped or waiting, and when
the stream may forget them (exactly-once into training).

A sample is acknowledged in the Redis stream only once a committed checkpoint accounts for the
step that trained it (``uncommitted``) or the decision that dropped it as too stale
(``undropped``). The ledger hands those ids to the checkpoint (``checkpoint_ids``), acknowledges
them once it is committed (``committed``), and replays that acknowledgement on recovery (a
crash between the checkpoint and its stream commit). It also keeps the run's audit log
(``trained_samples.jsonl``: one line per committed step) and the samples held back for the
next step (``waiting``).

Consumes: ``TrainingStream`` deliveries, ``DataScheduler.select_batch`` decisions.
Produces: the batch of each step; the ``commit``/``drop`` ids of each checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mopd.scheduler.scheduler import BatchSelection, DataScheduler
from mopd.scheduler.stream import Delivery, TrainingStream

from .state import RunState

__all__ = ["CONSUMER", "StreamLedger", "read_audit_log", "staleness_metrics"]

CONSUMER = "trainer"


def _sample_id(d: Delivery) -> str:
    return d.sample.sample.sample_id


def _ids(deliveries: Iterable[Delivery]) -> dict[str, list[str]]:
    deliveries = list(deliveries)
    return {
        "entries": [d.entry_id for d in deliveries],
        "samples": [_sample_id(d) for d in deliveries],
    }


class StreamLedger:
    """Stream bookkeeping of one trainer (consumer ``CONSUMER``) between checkpoints."""

    def __init__(
        self,
        stream: TrainingStream,
        scheduler: DataScheduler,
        state: RunState,
        audit_log: Path,
        *,
        sync_mode: bool,
    ) -> None:
        self.stream, self.scheduler, self.state = stream, scheduler, state
        self.audit_log = audit_log
        self.sync_mode = sync_mode
        self.uncommitted: list[Delivery] = []  # trained since the last checkpoint
        self.undropped: list[Delivery] = []  # dropped as too stale since the last checkpoint
        self.waiting: list[Delivery] = []  # admissible, held back for the next step
        self._recovered_ids: set[str] = set()  # pending at the last restart (see clamp_versions)

    # ------------------------------------------------------------------ recovery
    def recover(self, checkpoint_state: dict[str, Any]) -> int:
        """Replay the checkpoint's stream commit (idempotent), take back this consumer's
        pending samples and cut the audit log back to the checkpoint; returns how many
        samples were recovered."""
        commit, drop = checkpoint_state["commit"], checkpoint_state["drop"]
        self.stream.commit_ids(commit["entries"], commit["samples"])
        self.stream.discard_ids(drop["entries"], drop["samples"])
        self.uncommitted, self.undropped = [], []
        _truncate_log(self.audit_log, self.state.step)
        # Every committed step, not only the last: a Redis that lost acknowledged writes
        # (an external one without appendfsync always, killed) forgets older commits too,
        # and their samples, pending again, would otherwise train twice.
        self.stream.mark_trained(
            [sid for record in read_audit_log(self.audit_log) for sid in record["samples"]]
        )
        recovered = self.stream.recover(CONSUMER)
        self._recovered_ids = {_sample_id(d) for d in recovered}
        self.waiting = self.clamp_versions(recovered)
        return len(self.waiting)

    def clamp_versions(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Versions of samples that outlived the policy that made them.

        After a restart from a checkpoint the steps past it are lost, and with them the
        weights that produced the samples still pending in the stream. Those recovered
        samples are the only copies (the re-dispatched groups reuse their ids, so
        ``publish`` drops the regenerated ones): they train once, in order, as if produced by
        the policy that trains them; their recorded rollout log-probs keep the importance
        weights right, and the staleness bound cannot apply to a policy that no longer
        exists. Any other sample made by weights newer than the trainer's counts as the
        trainer's version.
        """
        version = self.state.version
        out = []
        for d in deliveries:
            v_T = d.sample.sample.versions_T
            if _sample_id(d) in self._recovered_ids:
                new_T = np.full_like(v_T, version)
            elif v_T.size and int(v_T.max()) > version:
                new_T = np.minimum(v_T, version)
            else:
                out.append(d)
                continue
            sample = dataclasses.replace(d.sample.sample, versions_T=new_T)
            out.append(Delivery(d.entry_id, dataclasses.replace(d.sample, sample=sample)))
        return out

    # ------------------------------------------------------------------ the next batch
    async def next_batch(self, want: int) -> tuple[list[Delivery], BatchSelection, int]:
        """The next step's batch of at most ``want`` samples, the selection that chose it and
        how many candidates it was chosen from. Async mode waits while every admissible
        sample is held back by the partial cap."""
        while True:
            got = await self._collect(want)
            by_id = {_sample_id(d): d for d in got}
            selection = self.scheduler.select_batch(
                [d.sample for d in got], self.state.version, max_samples=want
            )
            batch = [by_id[s.sample.sample_id] for s in selection.batch]
            self.waiting = [by_id[s.sample.sample_id] for s in selection.waiting]
            self.undropped.extend(by_id[s.sample.sample_id] for s in selection.dropped_stale)
            if batch or self.sync_mode:
                return batch, selection, len(got)
            await asyncio.sleep(0.05)

    async def _collect(self, want: int) -> list[Delivery]:
        """Candidates for the next step: held-back samples first, then the stream.

        Sync mode takes what the rollout phase published. Async mode waits until ``want``
        admissible samples are there, dropping samples that became too stale on the way
        (they free their in-flight slots, so rollout is never blocked by them).
        """
        got, self.waiting = self.clamp_versions(self.waiting), []
        while True:
            fresh = self.stream.read(CONSUMER, count=max(1, want - len(got)), block_ms=20)
            got.extend(self.clamp_versions(fresh))
            version = self.state.version
            fresh_enough = [d for d in got if self.scheduler.admit(d.sample, version)]
            if len(fresh_enough) >= want or (self.sync_mode and not fresh):
                return got
            stale = [d for d in got if d not in fresh_enough]
            if stale:
                dropped = self.scheduler.select_batch(
                    [d.sample for d in stale], version, max_samples=0
                )
                assert len(dropped.dropped_stale) == len(stale)
                self.undropped.extend(stale)
                got = fresh_enough
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ after a step
    def trained(self, batch: list[Delivery], step: int, trained_at_version: int) -> None:
        """Record ``batch`` as trained by ``step`` (uncommitted until the next checkpoint) and
        append its audit line."""
        self.uncommitted.extend(batch)
        record = {
            "step": step,
            "trained_at_version": trained_at_version,
            "samples": [_sample_id(d) for d in batch],
            "oldest_token_versions": [
                int(d.sample.sample.versions_T.min(initial=trained_at_version + 1)) for d in batch
            ],
        }
        with open(self.audit_log, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_ids(self) -> dict[str, dict[str, list[str]]]:
        """What the next checkpoint accounts for: ``commit`` (trained) and ``drop`` ids."""
        return {"commit": _ids(self.uncommitted), "drop": _ids(self.undropped)}

    def committed(self, ids: dict[str, dict[str, list[str]]]) -> None:
        """The checkpoint holding ``ids`` is committed: acknowledge its samples in the stream."""
        self.stream.commit(self.uncommitted)
        self.stream.discard_ids(entry_ids=ids["drop"]["entries"], sample_ids=ids["drop"]["samples"])
        self.uncommitted, self.undropped = [], []


def staleness_metrics(batch: list[Delivery], trained_at_version: int) -> dict[str, float]:
    """staleness/mean and staleness/max of a trained batch (versions behind the policy that
    trained it)."""
    staleness = [
        trained_at_version - int(d.sample.sample.versions_T.min())
        for d in batch
        if d.sample.sample.versions_T.size
    ]
    return {
        "staleness/mean": float(np.mean(staleness)) if staleness else 0.0,
        "staleness/max": float(max(staleness, default=0)),
    }


def _truncate_log(path: Path, step: int) -> None:
    """Drop the audit lines of steps after ``step`` (they were not in a committed checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_audit_log(path: Path) -> list[dict[str, Any]]:
    """The audit log's records (one per committed step), [] when there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
