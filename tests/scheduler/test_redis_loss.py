"""A Redis that dies under the training stream (issue 20, items 7 and 11).

The embedded Redis acknowledges only writes its append-only file holds (fsync before the
reply), is restarted by its owner on that file and address when it is killed, and the stream's
clients ride out the restart: publish, read and commit go on with no sample lost and none
delivered twice, through many kill -9 at random points. A read whose reply a restart swallowed
is handed out by the next read.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from mopd.scheduler.redis_server import EmbeddedRedis, connect, redacted
from mopd.scheduler.stream import TrainingStream
from tests.scheduler.test_codec import scored

pytestmark = pytest.mark.timeout(120)


def _ids(deliveries) -> list[str]:
    return [d.sample.sample.sample_id for d in deliveries]


def _kill(server: EmbeddedRedis) -> int:
    """kill -9 the server and wait for its watchdog to bring it back; returns the new pid."""
    pid, restarts = server.pid, server.restarts
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while server.restarts == restarts:
        assert server.failure is None, server.failure
        assert time.monotonic() < deadline, "the embedded Redis was not restarted"
        time.sleep(0.005)
    assert server.pid not in (None, pid)
    return server.pid


def test_embedded_redis_fsyncs_every_write_before_it_acknowledges(tmp_path: Path):
    # appendfsync everysec lets Redis reply to writes it has not written to its file yet (up to
    # two seconds while an fsync is slow): a kill -9 then loses acknowledged publishes/commits.
    with EmbeddedRedis(tmp_path / "r") as server:
        assert server.url is not None
        config = connect(server.url).config_get("append*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"


def test_killed_embedded_redis_is_restarted_and_the_stream_goes_on(tmp_path: Path):
    restarted: list[int] = []
    with EmbeddedRedis(tmp_path / "r", on_restart=restarted.append) as server:
        url = server.url
        stream = TrainingStream(server.client(), "kill-once")
        assert stream.publish([scored(f"a{i}") for i in range(4)]) == 4
        first = stream.read("trainer", count=2)
        assert _ids(first) == ["a0", "a1"]

        new_pid = _kill(server)
        assert restarted == [new_pid] and server.restarts == 1
        assert server.url == url  # same socket: the clients reconnect to it

        # Publish (its script cache is empty now), read and commit go on, nothing lost.
        assert stream.publish([scored("a0"), scored("b0")]) == 1  # a0 persisted: not re-added
        rest = stream.read("trainer", count=10)
        assert _ids(rest) == ["a2", "a3", "b0"]
        stream.commit(first + rest)
        assert stream.trained_ids() == {"a0", "a1", "a2", "a3", "b0"}
        assert stream.depth() == {"undelivered": 0, "pending": 0, "trained": 5}


def test_a_read_whose_reply_was_lost_is_handed_out_by_the_next_read(rclient, namespace):
    stream = TrainingStream(rclient, namespace)
    stream.publish([scored(f"o{i}") for i in range(5)])
    assert _ids(stream.read("trainer", count=1)) == ["o0"]
    # Redis ran this read and persisted it, then died before its reply reached the client,
    # which read again after reconnecting: o1 and o2 are pending at "trainer", never seen.
    rclient.xreadgroup(stream.GROUP, "trainer", {stream.stream_key: ">"}, count=2)
    assert _ids(stream.read("trainer", count=10)) == ["o1", "o2"]
    assert _ids(stream.read("trainer", count=10)) == ["o3", "o4"]
    assert stream.read("trainer", count=10) == []
    assert stream.depth() == {"undelivered": 0, "pending": 5, "trained": 0}


def test_repeated_kill_9_at_random_points_loses_nothing_and_delivers_nothing_twice(
    tmp_path: Path,
):
    """A producer and a trainer (read -> train -> commit) keep going while the Redis is
    killed 30 times at random points: what was trained is what was published, each once."""
    rng = random.Random(11)
    kills = 30
    with EmbeddedRedis(tmp_path / "r") as server:
        producer = TrainingStream(server.client(), "kills")
        trainer = TrainingStream(server.client(), "kills")
        published: list[str] = []
        trained: list[str] = []  # the trainer's own record (the audit log of a run)
        killed, produced = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                batch_rng = random.Random(1)
                while not killed.is_set():
                    ids = [f"s{len(published) + j}" for j in range(batch_rng.randint(1, 12))]
                    producer.publish([scored(i) for i in ids])
                    published.extend(ids)
                    time.sleep(0.001)
            except BaseException as e:  # surfaced by the assertions below
                errors.append(e)
            finally:
                produced.set()

        def train() -> None:
            try:
                while True:
                    done = produced.is_set()
                    got = trainer.read("trainer", count=16, block_ms=5)
                    trained.extend(_ids(got))
                    trainer.commit(got)
                    if done and not got:
                        return
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=produce), threading.Thread(target=train)]
        for t in threads:
            t.start()
        pids = set()
        for _ in range(kills):
            time.sleep(rng.uniform(0.0, 0.06))
            pids.add(_kill(server))
        killed.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        assert server.restarts == kills and len(pids) == kills

        total = len(published)
        assert total > 30 * kills  # published and trained all along, not after the kills
        assert len(trained) == len(set(trained))  # none delivered twice
        assert set(trained) == set(published)  # none lost
        assert trainer.trained_ids() == set(published)
        assert trainer.depth() == {"undelivered": 0, "pending": 0, "trained": total}


def test_the_restart_stops_when_the_owner_stops(tmp_path: Path):
    server = EmbeddedRedis(tmp_path / "r", persistent=False)
    server.start()
    pid = server.pid
    server.stop()
    assert server.pid is None and server.restarts == 0
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("rediss://mopd:s3cret@10.0.0.5:6380/1", "rediss://mopd:***@10.0.0.5:6380/1"),
        ("redis://redis.internal:6379/0", "redis://redis.internal:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redis_urls_are_shown_without_their_password(url: str, shown: str):
    assert redacted(url) == shown
