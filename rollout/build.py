"""Build the rollout backend a run config asks for: servers, their owners, and a router.

``build_rollout_backend`` starts ``num_servers`` engine servers (the embedded engine or SGLang:
the same launcher, another module) either as ``RolloutWorker`` Ray actors (``use_ray=True``,
placed by Ray on the cluster) or as local child processes, and returns a ``RolloutService``
whose ``router`` is the ``RolloutBackend`` the rest of the run uses. Ray and the actor module
are imported only when asked for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mopd.config.schema import RolloutConfig
from mopd.inference.client import ClientConfig
from rollout.base import RolloutBackend
from rollout.launcher import LaunchSpec, ServerProcess, launch_server, spec_from_server_args
from rollout.router import EngineRouter, RouterConfig

__all__ = ["RolloutService", "build_rollout_backend", "launch_spec_for", "routed_experts_shape_of"]


def routed_experts_shape_of(model_path: str | Path) -> tuple[int, int] | None:
    """(num_hidden_layers, num_experts_per_tok) from a checkpoint's config.json; None if dense."""
    config_file = Path(model_path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{config_file} not found: model_path must be a local HF checkpoint folder"
        ) from exc
    config = config.get("text_config", config)
    top_k = config.get("num_experts_per_tok")
    return (int(config["num_hidden_layers"]), int(top_k)) if top_k else None


def launch_spec_for(cfg: RolloutConfig, model_path: str, **overrides: Any) -> LaunchSpec:
    """The LaunchSpec of one rollout server for this config (``overrides``: e.g. seed, env)."""
    fields: dict[str, Any] = {
        "host": cfg.host,
        "max_running_requests": cfg.max_running_requests,
        "context_length": cfg.context_length,
        "enable_return_routed_experts": cfg.return_routed_experts,
        **overrides,
    }
    return spec_from_server_args(model_path, cfg.backend, dict(cfg.server_args), **fields)


@dataclass
class RolloutService:
    """Running rollout servers and the router over them. ``aclose`` stops everything."""

    router: RolloutBackend  # an EngineRouter over the servers
    workers: list[Any]  # RolloutWorker actor handles (Ray) or ServerProcess (local)

    async def aclose(self) -> None:
        await self.router.aclose()
        local = [w for w in self.workers if isinstance(w, ServerProcess)]
        for server in local:
            server.stop()
        actors = [w for w in self.workers if not isinstance(w, ServerProcess)]
        if actors:
            import ray

            await asyncio.gather(*(a.shutdown.remote() for a in actors))
            for actor in actors:
                ray.kill(actor)


def build_rollout_backend(
    cfg: RolloutConfig,
    model_path: str,
    *,
    use_ray: bool = True,
    ray_options: Mapping[str, Any] | None = None,
    spec_overrides: Sequence[Mapping[str, Any]] | None = None,
    startup_timeout_s: float = 600.0,
    router_config: RouterConfig | None = None,
) -> RolloutService:
    """Start the rollout servers of ``cfg`` and a router over them.

    Args:
        cfg: the run's ``rollout`` section.
        model_path: the student checkpoint (local HF folder).
        use_ray: one ``RolloutWorker`` actor per server (else local child processes).
        ray_options: ``ray.remote`` options of each actor (``num_gpus``, scheduling strategy).
        spec_overrides: per-server LaunchSpec fields (e.g. ``random_seed``, ``env``), one
            mapping per server.
        startup_timeout_s: how long each server may take to become healthy.
        router_config: balancing policy (default: least outstanding tokens).
    """
    if spec_overrides is not None and len(spec_overrides) != cfg.num_servers:
        raise ValueError(
            f"spec_overrides has {len(spec_overrides)} entries for {cfg.num_servers} servers"
        )
    overrides = spec_overrides or [{}] * cfg.num_servers
    specs = [launch_spec_for(cfg, model_path, **o) for o in overrides]
    shape = routed_experts_shape_of(model_path) if cfg.return_routed_experts else None
    client_config = ClientConfig(request_timeout_s=cfg.request_timeout_s)
    workers: list[Any]
    if use_ray:
        import ray

        from rollout.actor import remote_rollout_worker

        actor_cls = remote_rollout_worker(**dict(ray_options or {}))
        workers = [
            actor_cls.remote(spec, client_config, shape, startup_timeout_s) for spec in specs
        ]
        urls = ray.get([w.url.remote() for w in workers])
    else:
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            futures = [pool.submit(launch_server, s, startup_timeout_s) for s in specs]
        workers, errors = [], []
        for future in futures:
            try:
                workers.append(future.result())
            except Exception as exc:  # stop the ones that did start before failing
                errors.append(exc)
        if errors:
            for server in workers:
                server.stop()
            raise errors[0]
        urls = [w.url for w in workers]
    return RolloutService(EngineRouter(urls, router_config, client_config, shape), workers)
