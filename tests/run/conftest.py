"""The run wing's tests use the scheduler tests' Redis (embedded, or $MOPD_TEST_REDIS_URL)."""

from tests.scheduler.conftest import namespace, rclient, redis_url  # noqa: F401


def sum_sft_config(out, student, **sections) -> dict:
    """A one-source SFT run on two-term sums (tiny, embedded everything, no tracking); each
    keyword replaces or adds one section."""
    cfg = {
        "run": {"name": out.name, "output_dir": str(out)},
        "model": {"path": str(student), "dtype": "float32"},
        "rollout": {"max_running_requests": 4, "sampling": {"max_new_tokens": 4}},
        "data": {
            "sources": [
                {
                    "name": "sum",
                    "domain": "arithmetic",
                    "generator": "chain_sum",
                    "generator_args": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
                    "reward": "reasoning_gym",
                    "group_size": 2,
                    "dynamic_sampling": False,
                }
            ]
        },
        "algorithm": {"loss": "sft"},
        "trainer": {"steps": 1},
        "tracking": {"enabled": False},
        "cluster": {"num_cpus": 2},
    }
    return {**cfg, **sections}
