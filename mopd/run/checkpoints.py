"""Run checkpoints: the driver's state next to the trainer's, committed as one.

``save`` writes the driver state (step, version, scheduler cursors, the stream ids the
checkpoint accounts for) to a staging file, has the trainer write its checkpoint (model,
optimizer, RNG; its ``COMMITTED`` marker commits the directory), moves the driver state into
it, and only then acknowledges the samples in the stream. ``restore`` is the one recovery path
of ``--resume`` and of a trainer that died: load the latest committed checkpoint, replay its
stream commit, take back this consumer's pending samples and push its weights to the servers.
The last two checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from mopd.io import write_json_atomic
from mopd.scheduler.scheduler import DataScheduler

from .ledger import StreamLedger
from .metrics import StepStats
from .services import Services
from .state import DRIVER_STATE, RunPaths, RunState
from .weights import WeightSync

__all__ = ["Checkpoints"]

log = logging.getLogger("mopd.run")


class Checkpoints:
    """Saves and restores the run at a step boundary; see the module docstring."""

    def __init__(
        self,
        paths: RunPaths,
        state: RunState,
        scheduler: DataScheduler,
        ledger: StreamLedger,
        services: Services,
        weights: WeightSync,
        stats: StepStats,
    ) -> None:
        self.paths, self.state, self.scheduler, self.ledger = paths, state, scheduler, ledger
        self.services, self.weights, self.stats = services, weights, stats

    async def save(self) -> Path:
        """Driver state first, then the trainer's checkpoint (its marker commits both), then
        acknowledge the samples the checkpoint accounts for."""
        t0 = time.perf_counter()
        step = self.state.step
        target = self.paths.checkpoint(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        ids = self.ledger.checkpoint_ids()
        driver_state = {
            "step": step,
            "version": self.state.version,
            "scheduler": self.scheduler.state_dict(),
            **ids,
        }
        staging = self.paths.checkpoints / f".driver-{step:08d}.json"
        write_json_atomic(staging, driver_state)
        await self.services.trainer.save.remote(str(target))
        shutil.move(staging, target / DRIVER_STATE)
        self.ledger.committed(ids)
        for old in self.paths.committed_checkpoints()[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        self.stats.phase_s["checkpoint"] += time.perf_counter() - t0
        return target

    async def restore(self, *, resume: bool) -> None:
        """Continue from the latest committed checkpoint (``--resume``, or a trainer restart);
        nothing to do without one."""
        ckpt = self.paths.latest_checkpoint()
        if ckpt is None:
            if resume:
                log.warning(
                    "--resume: no checkpoint under %s; starting from scratch",
                    self.paths.checkpoints,
                )
            return
        saved = json.loads((ckpt / DRIVER_STATE).read_text())
        await self.services.trainer.load.remote(str(ckpt))
        self.state.step, self.state.version = int(saved["step"]), int(saved["version"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # A crash between the checkpoint and its stream commit: replay the commit (idempotent).
        recovered = self.ledger.recover(saved)
        await self.weights.sync()
        log.info(
            "resumed at step %d (version %d) from %s; %d samples recovered",
            self.state.step,
            self.state.version,
            ckpt,
            recovered,
        )
