"""The durable training stream: scored samples in a Redis stream, read by trainers through a
consumer group, acknowledged only once the step that used them is committed.

Exactly-once into training, across crashes of producers and consumers:

- ``publish`` adds a sample only if its id was never published in this run (a Lua script
  does SADD + XADD atomically), so a rollout worker that re-sends after a restart adds
  nothing twice.
- ``read`` hands out entries never delivered before; ``recover`` (at a restart) hands a
  consumer back its own pending entries: read before the crash, never committed. Entries
  whose sample was already committed are acknowledged and skipped.
- ``commit`` runs after the checkpoint of the step that used the samples is on disk: it
  marks their ids trained and acknowledges their entries in one MULTI/EXEC. The checkpoint
  holds the same ids, so a crash between checkpoint and ``commit`` is repaired by calling
  ``commit`` again on resume (it is idempotent).
- ``reclaim`` takes over the pending entries of a consumer that died for good (XAUTOCLAIM).

Every operation may be re-sent by a client that reconnects after a Redis restart, and each one
is safe to repeat: publish and commit are idempotent, and a read whose reply was lost (the
entries became pending at this consumer but never reached it) is noticed by the next ``read``
(this consumer's pending count exceeds what it was handed) and handed out then.

Keys are namespaced per run (``mopd:{namespace}:...``) so runs sharing a Redis never mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from mopd.scheduler.codec import CodecError, decode, encode
from mopd.types import ScoredSample

_PUBLISH_ONCE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'data', ARGV[2])
end
return false
"""


@dataclass(frozen=True)
class Delivery:
    """One sample handed to a trainer, with the stream entry to acknowledge later."""

    entry_id: str
    sample: ScoredSample


class TrainingStream:
    """Producer and consumer side of one run's training stream."""

    GROUP = "trainers"

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        if not namespace or any(c in namespace for c in " {}"):
            raise ValueError(
                f"bad stream namespace {namespace!r}; use the run name (no spaces/braces)"
            )
        self.r = client
        self.prefix = f"mopd:{namespace}"
        self.stream_key = f"{self.prefix}:train"
        self.published_key = f"{self.prefix}:published"
        self.trained_key = f"{self.prefix}:trained"
        self.dead_key = f"{self.prefix}:undecodable"
        self.dropped_key = f"{self.prefix}:dropped"
        # Entry ids handed to each consumer and not yet committed or discarded: its share of
        # the group's pending list, as far as this object knows.
        self._handed: dict[str, set[str]] = {}
        try:
            self.r.xgroup_create(self.stream_key, self.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- producer -----------------------------------------------------------------
    def publish(self, samples: Iterable[ScoredSample]) -> int:
        """Add samples not published before; returns how many were added."""
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for s in samples:
            # EVAL, not EVALSHA: a restarted Redis has an empty script cache, and a pipeline
            # re-sent after a reconnect would fail with NOSCRIPT.
            pipe.eval(
                _PUBLISH_ONCE, 2, self.stream_key, self.published_key, s.sample.sample_id, encode(s)
            )
            n += 1
        if n == 0:
            return 0
        return sum(1 for res in pipe.execute() if res)

    # -- consumer -----------------------------------------------------------------
    def read(self, consumer: str, count: int, block_ms: int | None = None) -> list[Delivery]:
        """Up to ``count`` samples never delivered before (blocks up to ``block_ms``), after
        any this consumer was delivered but never handed (a reply lost to a reconnect)."""
        orphans = self._orphans(consumer)
        if orphans:
            return orphans
        return self._read(consumer, ">", count, block_ms)

    def _orphans(self, consumer: str) -> list[Delivery]:
        """Entries pending at ``consumer`` that it was never handed: the reply of a read that
        Redis executed (and persisted) lost in a restart, its client then reading again."""
        summary = self.r.xpending(self.stream_key, self.GROUP)
        pending = {_str(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}
        handed = self._handed.setdefault(consumer, set())
        if pending.get(consumer, 0) <= len(handed):
            return []
        resp = self.r.xreadgroup(self.GROUP, consumer, {self.stream_key: "0"}, count=None)
        entries = [(e, f) for e, f in (resp[0][1] if resp else []) if _str(e) not in handed]
        return self._deliveries(entries, consumer)

    def recover(self, consumer: str, count: int | None = None) -> list[Delivery]:
        """This consumer's pending samples (all of them, or the first ``count``): delivered
        before a restart, never committed.

        Call once at (re)start, after ``commit_ids`` has replayed the last checkpoint's
        commit: what remains was not part of any committed step and must train again.
        """
        out: list[Delivery] = []
        start = "0"
        while count is None or len(out) < count:
            page = 1000 if count is None else min(1000, count - len(out))
            resp = self.r.xreadgroup(self.GROUP, consumer, {self.stream_key: start}, count=page)
            entries = resp[0][1] if resp else []
            if not entries:
                break
            out += self._deliveries(entries, consumer)
            start = _str(entries[-1][0])  # the history goes on after the last entry seen
        return out

    def mark_trained(self, sample_ids: Sequence[str], chunk: int = 10_000) -> None:
        """Record samples as trained (idempotent): the committed steps of the run's audit log,
        replayed on recovery so that a Redis which lost writes it acknowledged (one without
        ``appendfsync always``) cannot have them trained again."""
        for i in range(0, len(sample_ids), chunk):
            self.r.sadd(self.trained_key, *sample_ids[i : i + chunk])

    def _read(self, consumer: str, start: str, count: int, block_ms: int | None) -> list[Delivery]:
        resp = self.r.xreadgroup(
            self.GROUP, consumer, {self.stream_key: start}, count=count, block=block_ms
        )
        entries = resp[0][1] if resp else []
        return self._deliveries(entries, consumer)

    def _deliveries(self, entries: Sequence, consumer: str) -> list[Delivery]:
        out: list[Delivery] = []
        stale: list[str] = []
        live = [(e, f) for e, f in entries if f]
        stale += [_str(e) for e, f in entries if not f]  # deleted (trimmed) while pending
        sids = [f[b"id"].decode() for _, f in live]
        trained = self.r.smismember(self.trained_key, sids) if sids else []
        for (entry_id, fields), done in zip(live, trained, strict=True):
            eid = _str(entry_id)
            if done:
                stale.append(eid)  # a re-delivery of a committed sample: harmless, drop it
                continue
            try:
                sample = decode(fields[b"data"])
            except CodecError:
                # Keep the payload for inspection instead of losing it, and stop re-delivering it.
                self.r.hset(self.dead_key, eid, fields[b"data"])
                stale.append(eid)
                continue
            out.append(Delivery(eid, sample))
        if stale:
            self.r.xack(self.stream_key, self.GROUP, *stale)
        got = {d.entry_id for d in out}
        for name, handed in self._handed.items():  # entries claimed from another consumer
            if name != consumer:
                handed.difference_update(got)
        self._handed.setdefault(consumer, set()).update(got)
        return out

    def _settled(self, entry_ids: Sequence[str]) -> None:
        for handed in self._handed.values():
            handed.difference_update(entry_ids)

    def commit(self, deliveries: Sequence[Delivery]) -> None:
        """Mark samples trained and acknowledge them (after their step's checkpoint)."""
        self.commit_ids(
            [d.entry_id for d in deliveries], [d.sample.sample.sample_id for d in deliveries]
        )

    def commit_ids(self, entry_ids: Sequence[str], sample_ids: Sequence[str]) -> None:
        """``commit`` from ids saved in a checkpoint (repairs a crash before the first commit)."""
        if not entry_ids:
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.trained_key, *sample_ids)
        pipe.xack(self.stream_key, self.GROUP, *entry_ids)
        pipe.execute()
        self._settled(entry_ids)

    def discard_ids(self, entry_ids: Sequence[str], sample_ids: Sequence[str]) -> None:
        """Acknowledge samples that will never train (too stale), keeping their ids for audit.

        Like ``commit_ids``, call it only once the checkpoint that accounts for them is written.
        """
        if not entry_ids:
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.dropped_key, *sample_ids)
        pipe.xack(self.stream_key, self.GROUP, *entry_ids)
        pipe.execute()
        self._settled(entry_ids)

    def reclaim(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[Delivery]:
        """Take over entries pending longer than ``min_idle_ms`` at other consumers."""
        out: list[Delivery] = []
        start = "0-0"
        while len(out) < count:
            next_start, entries, *_ = self.r.xautoclaim(
                self.stream_key,
                self.GROUP,
                consumer,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=count - len(out),
            )
            out += self._deliveries(entries, consumer)
            start = _str(next_start)
            if start == "0-0":
                break
        return out

    # -- metrics ------------------------------------------------------------------
    def depth(self) -> dict[str, int]:
        """Queue depth: entries never delivered, entries delivered but not committed."""
        groups = {_str(g["name"]): g for g in self.r.xinfo_groups(self.stream_key)}
        g = groups.get(self.GROUP, {})
        pending = int(g.get("pending", 0))
        lag = g.get("lag")
        if lag is None:  # Redis < 7 has no lag field: count entries after last-delivered-id
            last = _str(g.get("last-delivered-id", b"0-0"))
            lag = len(self.r.xrange(self.stream_key, min=f"({last}", max="+"))
        return {
            "undelivered": int(lag),
            "pending": pending,
            "trained": int(self.r.scard(self.trained_key)),
        }

    def trained_ids(self) -> set[str]:
        return {x.decode() for x in self.r.smembers(self.trained_key)}


def _str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x
