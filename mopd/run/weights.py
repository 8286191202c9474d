"""Weights to the rollout servers, and the servers' health: the only edge back in the run.

``sync`` exports the trainer's weights (a safetensors folder in HF layout for ``disk``; the
serialized tensors for ``tensor``, same host) and loads them on every rollout server under the
run's version; ``served_version`` is then that version. ``heal`` replaces the rollout servers
when one stopped answering and brings the new ones to the current weights; a failure reported
by requests to servers that were already replaced (an older ``generation``) is ignored.

Consumes: the trainer actor, the run's version. Produces: rollout servers serving it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

from mopd.inference.client import EngineError
from mopd.inference.protocol import UpdateWeightsFromDisk, UpdateWeightsFromTensor

from .errors import RunError
from .metrics import StepStats
from .services import Services
from .state import RunPaths, RunState

__all__ = ["WeightSync"]

log = logging.getLogger("mopd.run")


class WeightSync:
    """Keeps the rollout servers on the trainer's weights (``sync``) and alive (``heal``)."""

    def __init__(
        self, services: Services, paths: RunPaths, state: RunState, stats: StepStats
    ) -> None:
        self.services, self.paths, self.state, self.stats = services, paths, state, stats
        self.mode = services.cfg.rollout.weight_sync
        self.served_version = 0  # weights version the rollout servers hold
        self.generation = 0  # bumped each time the rollout servers are replaced
        self._heal_lock: asyncio.Lock | None = None

    @property
    def current(self) -> bool:
        """The rollout servers serve the trainer's version."""
        return self.served_version == self.state.version

    async def sync(self) -> None:
        """Export the trainer's weights and load them on every rollout server."""
        t0 = time.perf_counter()
        version, generation = self.state.version, self.generation
        request = await self._export(version)
        try:
            result = await self.services.rollout.router.update_weights(request)
        except EngineError as e:
            await self.heal(generation)  # replaced servers are synced by heal
            if self.generation == generation:
                raise RunError(f"weight sync to the rollout servers failed: {e}") from e
            return
        if not result.success:
            raise RunError(f"rollout servers refused weights v{version}: {result.message}")
        self.served_version = version
        for old in sorted(self.paths.weights.glob("v*"))[:-2]:  # keep the last two versions
            shutil.rmtree(old, ignore_errors=True)
        self.stats.phase_s["sync"] += time.perf_counter() - t0

    async def _export(self, version: int) -> Any:
        trainer = self.services.trainer
        if self.mode == "tensor":
            # Same host: the servers map the trainer's tensors (shared memory on CPU, CUDA IPC
            # on GPU) instead of reading a checkpoint from disk; one payload per server. The
            # embedded engine serves the trainer's own HF module tree: module names need no
            # conversion; SGLang loads checkpoint (hub) names.
            embedded = self.services.cfg.rollout.backend == "embedded"
            naming = "state_dict" if embedded else "checkpoint"
            servers = len(self.services.rollout.router.urls)
            payloads = await trainer.serialized_weights.remote(naming, servers)
            return [
                UpdateWeightsFromTensor(serialized_named_tensors=(p,), weight_version=str(version))
                for p in payloads
            ]
        target = self.paths.weights / f"v{version:08d}"
        path = await trainer.export_weights.remote(str(target), version)
        return UpdateWeightsFromDisk(model_path=str(path), weight_version=str(version))

    async def heal(self, generation: int) -> None:
        """Replace the rollout servers if one stopped answering; they resume serving the
        current weights. Failures of requests sent to servers already replaced are ignored."""
        if self._heal_lock is None:
            self._heal_lock = asyncio.Lock()
        async with self._heal_lock:
            if generation != self.generation:
                return  # that failure belongs to servers that were replaced meanwhile
            workers = self.services.rollout.workers
            healthy = await asyncio.gather(
                *(w.health.remote() for w in workers), return_exceptions=True
            )
            if all(h is True for h in healthy):
                return
            log.warning(
                "%d of %d rollout servers are down: restarting the rollout servers",
                sum(h is not True for h in healthy),
                len(healthy),
            )
            await self.services.replace_rollout()
            self.generation += 1
            self.served_version = 0
            if self.state.version > 0:
                await self.sync()
            self.services.write_processes()
