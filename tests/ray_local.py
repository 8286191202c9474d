"""A private local Ray cluster for tests that need actors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray

from mopd.run.services import _ray_node_ip


@contextmanager
def private_ray(num_cpus: int) -> Iterator[None]:
    """``address="local"``: a private cluster, never one another process on this machine
    started; loopback only, no dashboard."""
    with _ray_node_ip("127.0.0.1"):  # the run's own way of keeping Ray on loopback
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    try:
        yield
    finally:
        ray.shutdown()
