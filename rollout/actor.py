"""``RolloutWorker``: a thin Ray actor that owns one engine server process and forwards to it.

The actor starts the server (``rollout.launcher``) where Ray placed it (its GPUs, its host),
reports the server's URL, forwards calls to it, and stops it by pid on shutdown. Bulk traffic
may bypass the actor: ``EngineRouter(ray.get([w.url.remote() for w in workers]))`` talks to the
servers over HTTP directly.
"""

from __future__ import annotations

import os
from typing import Any

from mopd.inference.client import ClientConfig, EngineClient
from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    WeightUpdateRequest,
    WeightUpdateResult,
)
from rollout.launcher import LaunchSpec, launch_server

__all__ = ["RolloutWorker", "remote_rollout_worker"]


class RolloutWorker:
    """Owns one server process; every method forwards to it.

    Args:
        spec: how to start the server.
        client_config: transport settings of the forwarding client.
        routed_experts_shape: (num_hidden_layers, num_experts_per_tok) of the served model.
        startup_timeout_s: how long the server may take to become healthy.
        log_path: the server's log file (default: a fresh temporary file).
    """

    def __init__(
        self,
        spec: LaunchSpec,
        client_config: ClientConfig | None = None,
        routed_experts_shape: tuple[int, int] | None = None,
        startup_timeout_s: float = 600.0,
        log_path: str | None = None,
    ):
        self._server = launch_server(spec, startup_timeout_s, log_path)
        self._client = EngineClient(self._server.url, client_config, routed_experts_shape)

    def url(self) -> str:
        return self._server.url

    def server_pid(self) -> int:
        return self._server.pid

    def node(self) -> dict[str, Any]:
        """Where the server runs: host pid of this actor, server pid, URL, log file."""
        return {
            "actor_pid": os.getpid(),
            "server_pid": self._server.pid,
            "url": self._server.url,
            "log_path": str(self._server.log_path),
        }

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        return await self._client.generate(request)

    async def update_weights(self, request: WeightUpdateRequest) -> WeightUpdateResult:
        return await self._client.update_weights(request)

    async def weight_version(self) -> str | None:
        return await self._client.weight_version()

    async def health(self) -> bool:
        return self._server.alive() and await self._client.health()

    async def shutdown(self) -> int | None:
        """Close the client and stop the server; returns the server's exit code."""
        await self._client.aclose()
        return self._server.stop()


def remote_rollout_worker(**ray_options: Any) -> Any:
    """The Ray actor class for ``RolloutWorker`` (``num_gpus=...`` etc. as ray.remote options)."""
    import ray

    return ray.remote(**ray_options)(RolloutWorker) if ray_options else ray.remote(RolloutWorker)
