"""The run wing's tests use the scheduler tests' Redis (embedded, or $MOPD_TEST_REDIS_URL)."""

from tests.scheduler.conftest import namespace, rclient, redis_url  # noqa: F401
