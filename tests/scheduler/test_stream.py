"""The durable training stream on a real Redis: idempotent publish, re-delivery of pending
samples after a consumer restart, commit after checkpoint, reclaim from dead consumers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from mopd.scheduler.redis_server import EmbeddedRedis, connect
from mopd.scheduler.stream import TrainingStream
from tests.scheduler.test_codec import scored


def _ids(deliveries) -> list[str]:
    return [d.sample.sample.sample_id for d in deliveries]


def test_publish_is_idempotent_per_sample_id(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    assert stream.publish([scored("a"), scored("b")]) == 2
    assert stream.publish([scored("a"), scored("c")]) == 1  # 'a' re-sent after a producer restart
    assert rclient.xlen(stream.stream_key) == 3
    assert stream.depth() == {"undelivered": 3, "pending": 0, "trained": 0}


def test_restarted_consumer_gets_its_pending_samples_back(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored(f"s{i}") for i in range(5)])
    first = stream.read("trainer-0", count=3)
    assert _ids(first) == ["s0", "s1", "s2"]
    stream.commit(first[:2])  # step committed for two of them, then the trainer dies
    restarted = TrainingStream(rclient, namespace)
    recovered = restarted.recover("trainer-0")
    assert _ids(recovered) == ["s2"]  # read before the crash, never committed
    fresh = restarted.read("trainer-0", count=10)
    assert _ids(fresh) == ["s3", "s4"]
    stream.commit(recovered + fresh)
    assert stream.read("trainer-0", count=10) == []
    assert stream.trained_ids() == {f"s{i}" for i in range(5)}
    assert stream.depth()["pending"] == 0


def test_commit_from_checkpoint_ids_makes_redelivery_harmless(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored("x"), scored("y")])
    got = stream.read("t", count=2)
    # Crash after the checkpoint was written but before commit: resume replays the commit
    # from the ids stored in the checkpoint; a second replay changes nothing.
    ids = ([d.entry_id for d in got], _ids(got))
    stream.commit_ids(*ids)
    stream.commit_ids(*ids)
    assert stream.recover("t") == [] and stream.read("t", count=10) == []
    assert stream.depth() == {"undelivered": 0, "pending": 0, "trained": 2}


def test_read_does_not_redeliver_uncommitted_entries(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored("u1"), scored("u2")])
    assert _ids(stream.read("t", count=1)) == ["u1"]
    # u1 trained but its checkpoint is not written yet: the next read must not hand it out.
    assert _ids(stream.read("t", count=5)) == ["u2"]
    assert stream.depth()["pending"] == 2


def test_discard_acks_without_marking_trained(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored("old")])
    got = stream.read("t", count=1)
    stream.discard_ids([got[0].entry_id], ["old"])
    assert stream.recover("t") == []
    assert stream.trained_ids() == set()
    assert rclient.smembers(stream.dropped_key) == {b"old"}


def test_already_trained_sample_is_skipped_and_acked(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored("z")])
    rclient.sadd(stream.trained_key, "z")
    assert stream.read("t", count=5) == []
    assert stream.depth()["pending"] == 0


def test_reclaim_from_a_dead_consumer(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored(f"r{i}") for i in range(4)])
    dead = stream.read("trainer-dead", count=4)
    assert len(dead) == 4
    assert stream.reclaim("trainer-new", min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.05)
    taken = stream.reclaim("trainer-new", min_idle_ms=10)
    assert sorted(_ids(taken)) == [f"r{i}" for i in range(4)]
    stream.commit(taken)
    assert stream.recover("trainer-dead") == []  # nothing left for the dead name


def test_namespaces_do_not_mix(rclient, namespace):
    a = TrainingStream(rclient, namespace + "-a")
    b = TrainingStream(rclient, namespace + "-b")
    a.publish([scored("same-id")])
    assert b.publish([scored("same-id")]) == 1
    assert _ids(b.read("t", count=5)) == ["same-id"]
    assert len(a.read("t", count=5)) == 1


def test_undecodable_entry_is_kept_aside_not_lost(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    rclient.xadd(stream.stream_key, {"id": "bad", "data": b"\x00garbage"})
    stream.publish([scored("good")])
    assert _ids(stream.read("t", count=5)) == ["good"]
    assert rclient.hlen(stream.dead_key) == 1
    assert stream.depth()["pending"] == 1  # 'good' awaits commit; 'bad' is not re-delivered


def test_bad_namespace():
    with pytest.raises(ValueError, match="namespace"):
        TrainingStream(redis.Redis(), "has space")


def test_embedded_redis_persists_across_restart(tmp_path: Path):
    data = tmp_path / "r"
    with EmbeddedRedis(data) as server:
        assert server.url is not None and server.url.startswith("unix://")
        stream = TrainingStream(connect(server.url), "persist")
        stream.publish([scored("p1"), scored("p2")])
        stream.read("t", count=1)
        pid = server.pid
    assert pid is not None
    with EmbeddedRedis(data) as server:
        stream = TrainingStream(connect(server.url), "persist")
        assert _ids(stream.recover("t")) == ["p1"]
        assert _ids(stream.read("t", count=5)) == ["p2"]


def test_embedded_redis_long_path_uses_loopback_tcp(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep, persistent=False) as server:
        assert server.url is not None and server.url.startswith("redis://127.0.0.1:")
        assert connect(server.url).ping()


def test_password_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with EmbeddedRedis(
        tmp_path / "auth", persistent=False, extra_config=["requirepass s3cret"]
    ) as server:
        assert server.url is not None
        with pytest.raises(redis.AuthenticationError):
            connect(server.url).ping()
        monkeypatch.setenv("MOPD_REDIS_PASSWORD", "s3cret")
        assert connect(server.url, "MOPD_REDIS_PASSWORD").ping()
