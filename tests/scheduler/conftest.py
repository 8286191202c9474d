"""Redis for scheduler tests: an embedded server started by the tests themselves, or the
Redis at $MOPD_TEST_REDIS_URL when that variable is set (never the machine's Redis unasked)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from mopd.scheduler.redis_server import EmbeddedRedis, connect


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("MOPD_TEST_REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        assert server.url is not None
        yield server.url


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace per test, so tests sharing a Redis never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"
