"""A local run listens on loopback only (issue 20, item 8): with the services started the way
``mopd train`` starts them (embedded Redis, local Ray, reward worker, trainer actor, rollout
servers; teacher servers are the same server), every listening TCP socket of the run's process
tree is on 127.0.0.1 (or ::1), and Ray advertises loopback as the node's address. (The local
MLflow store is a sqlite file: no socket; tracking is off here to keep the test short.)"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import psutil
import pytest
import yaml

from mopd.config import load_config
from mopd.models.tiny import build_tiny_checkpoint
from mopd.run.services import Services
from mopd.run.state import RunPaths
from tests.run.conftest import sum_sft_config

pytestmark = pytest.mark.timeout(300)


def _listening(root: psutil.Process) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``root``'s tree."""
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1
    return ip.is_loopback


def test_every_socket_of_a_local_run_listens_on_loopback(tmp_path: Path):
    models = tmp_path / "models"
    student = build_tiny_checkpoint(models / "student", "qwen3_moe", seed=0)
    # A run folder too deep for a unix socket: the embedded Redis takes loopback TCP.
    out = tmp_path / ("d" * 60) / ("e" * 60) / "run"
    cfg = sum_sft_config(out, student, run={"name": "loopback", "output_dir": str(out)})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_cfg = load_config(path)
    assert run_cfg.cluster.bind_host == "127.0.0.1"  # the default

    services = Services(run_cfg, RunPaths(out.resolve()))
    services.paths.make_dirs()
    try:
        services.start_tracking(None)
        services.start_queue()
        services.start_ray()
        services.resolve_models()
        services.start_roles()
        import ray

        assert ray.util.get_node_ip_address() == "127.0.0.1"
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert services.embedded_redis is not None
        assert services.embedded_redis.url.startswith("redis://127.0.0.1:")
        time.sleep(1.0)  # agents and workers started lazily are listening by now

        sockets = _listening(psutil.Process())
        names = {name for _, _, name in sockets}
        # The run's parts are all there: Ray's core, the Redis and the engine servers.
        assert {"gcs_server", "raylet", "redis-server"} <= names, names
        assert len(sockets) >= 8, sockets
        exposed = [s for s in sockets if not _is_loopback(s[0])]
        assert exposed == [], f"listening beyond loopback: {exposed}"
    finally:
        import asyncio

        asyncio.run(services.aclose())
        services.close("FINISHED")
