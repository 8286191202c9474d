"""The run driver: one run of SFT, teacher RL or MOPD, top to bottom.

Data moves one way and only weights come back::

    DataScheduler.next_groups                      prompt groups, pulled as request slots free up
      -> RolloutProducer                           G samples per prompt (rollout servers), rewards,
                                                   group advantages and dynamic sampling, the
                                                   teacher of the prompt's domain (MOPD)
      -> TrainingStream.publish (Redis)            durable, once per sample id
    StreamLedger.next_batch -> pack_micro_batches
      -> trainer.forward_backward / optim_step     the stage's loss (mopd.algo)
      -> Checkpoints.save                          driver state + trainer; COMMITTED commits both,
                                                   then the stream acknowledges the samples
      -> WeightSync.sync                           new weights (version + 1) -> rollout servers
      -> Evaluator.evaluate                        every ``run.eval_every`` steps and at the end

The parts live in this package, one file each, and none of them knows the driver:
``services`` (start-up, shutdown), ``producer`` (the slot pool), ``ledger`` (exactly-once
bookkeeping, audit log), ``checkpoints`` (save, and the one recovery path), ``weights`` (sync,
healing of dead rollout servers), ``evaluation``, ``metrics``, ``state`` (paths, step, version).

Sync mode trains strictly on-policy: the rollout of step s finishes before step s trains and
weights s+1 reach the servers before step s+1 samples. Async mode keeps rollout running while
the trainer steps, within ``scheduler.max_staleness`` versions (``select_batch`` enforces it);
without ``partial_rollout`` the groups still generating at a weight update are aborted and
handed out again. A trainer that dies is restarted from the last checkpoint (the ``--resume``
path); a rollout server that dies is replaced; a teacher that stays down fails the run.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import redis

from mopd.algo.stages import stage_for
from mopd.catalog import registries
from mopd.config import ConfigError, RunConfig
from mopd.config.validate import validate
from mopd.packing import pack_micro_batches
from mopd.scheduler.scheduler import DataScheduler
from mopd.scheduler.tokenize import load_tokenize

from .checkpoints import Checkpoints
from .errors import RunError, TrainerDied
from .evaluation import Evaluator
from .ledger import StreamLedger, staleness_metrics
from .metrics import StepStats, summary_line
from .producer import RolloutProducer
from .services import Services
from .state import RunPaths, RunState
from .weights import WeightSync

__all__ = ["Driver", "train"]

log = logging.getLogger("mopd.run")


class Driver:
    """One run: ``setup()`` starts it, ``await run()`` runs it to the end, ``close`` stops it."""

    def __init__(
        self, cfg: RunConfig, *, resume: bool = False, parent_run_id: str | None = None
    ) -> None:
        # A config the run would refuse is refused here, before anything starts.
        problems = validate(cfg, registries())
        if problems:
            raise ConfigError(problems)
        self.cfg, self.resume, self.parent_run_id = cfg, resume, parent_run_id
        self.stage = stage_for(cfg.algorithm.loss)
        self.paths = RunPaths(Path(cfg.run.output_dir).resolve())
        self.state, self.stats = RunState(), StepStats()
        self.services = Services(cfg, self.paths)
        self.producer: RolloutProducer | None = None
        self.main_started = False

    # ------------------------------------------------------------------ set up
    def setup(self) -> None:
        cfg, paths, services = self.cfg, self.paths, self.services
        paths.make_dirs()
        if not self.resume and paths.latest_checkpoint() is not None:
            raise RunError(
                f"{paths.checkpoints} already holds checkpoints; pass --resume to continue "
                "that run, or choose another run.output_dir / run.name"
            )
        # What needs files (model folders, registry URIs, tokenizers, data sources and their
        # generator arguments) is checked before the first service (MLflow, Redis, Ray) starts.
        services.check_cluster()
        services.resolve_models()
        self.scheduler = DataScheduler(
            cfg.data.sources,
            cfg.scheduler,
            tokenize=load_tokenize(services.tokenizer_path),
            seed=cfg.run.seed,
            advantage=cfg.algorithm.advantage,
            advantage_eps=cfg.algorithm.advantage_eps,
            dense_signal=self.stage.uses_teacher,
        )
        services.start_tracking(self.parent_run_id)
        stream = services.start_queue()
        services.start_ray()
        services.start_roles()
        state, stats = self.state, self.stats
        sync_mode = cfg.scheduler.mode == "sync"
        self.ledger = StreamLedger(
            stream, self.scheduler, state, paths.trained_log, sync_mode=sync_mode
        )
        self.weights = WeightSync(services, paths, state, stats)
        self.producer = RolloutProducer(
            cfg, self.stage, self.scheduler, stream, services, self.weights, state, stats
        )
        self.evaluator = Evaluator(cfg, self.scheduler, services, self.weights, self.state)
        self.checkpoints = Checkpoints(
            paths, self.state, self.scheduler, self.ledger, services, self.weights, self.stats
        )

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict[str, float]:
        """Recover (a checkpoint, if any), loop to ``trainer.steps``, finish."""
        self.main_started = True
        try:
            await self.checkpoints.restore(resume=self.resume)
            return await self.loop()
        except (redis.ConnectionError, redis.TimeoutError) as e:  # past the client's retries
            raise self.services.redis_lost(e) from None
        finally:
            await self.aclose()

    async def loop(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, state, total = self.cfg, self.state, self.cfg.trainer.steps
        last: dict[str, float] = {}
        if state.step == 0:
            last |= await self._evaluate_and_log()
        with tqdm(
            total=total, initial=state.step, desc=cfg.run.name, unit="step", dynamic_ncols=True
        ) as bar:
            while state.step < total and not state.stop_requested:
                t_step = time.perf_counter()
                self.stats.clear()
                try:
                    metrics = await self.step()
                except TrainerDied as e:
                    log.warning("the trainer died (%s): restarting it from the last checkpoint", e)
                    await self._restart_trainer()
                    bar.n = state.step
                    bar.refresh()
                    continue
                metrics |= self._step_metrics(time.perf_counter() - t_step)
                every = cfg.run.eval_every
                if state.step == total or (every > 0 and state.step % every == 0):
                    metrics |= await self.evaluator.evaluate()
                self.services.tracker.log_metrics(metrics, step=state.step)
                last = metrics
                bar.update(1)
                bar.write(summary_line(state.step, metrics))
        await self.producer.stop()
        if state.step >= total and "eval/accuracy" not in " ".join(last):
            # Resumed at the last step (a crash after its checkpoint): evaluate the end now.
            last |= await self._evaluate_and_log()
        if state.stop_requested and state.step % cfg.trainer.checkpoint_every != 0:
            await self.checkpoints.save()
        if state.step >= total:
            await self.finish()
        return last

    async def step(self) -> dict[str, float]:
        """produce -> collect -> train -> checkpoint -> commit -> sync (one optimizer step)."""
        import ray.exceptions

        cfg, state = self.cfg, self.state
        if cfg.scheduler.mode == "sync":
            await self.producer.produce(cfg.scheduler.prompts_per_step)
        else:
            self.producer.run_in_background()
        try:
            metrics = await self.train()
            if state.step % cfg.trainer.checkpoint_every == 0 or state.step == cfg.trainer.steps:
                await self.checkpoints.save()
            if cfg.scheduler.mode == "async" and not cfg.scheduler.partial_rollout:
                # Every request in flight now started under the old weights: abort them; their
                # groups are handed out again (the producer requeues aborted groups).
                await self.services.rollout.router.abort_all()
            if self.stage.syncs_weights_every_step:
                await self.weights.sync()
            # Stages that sample nothing in between: ``evaluate`` syncs when it needs to.
        except ray.exceptions.RayActorError as e:
            raise TrainerDied(str(e).splitlines()[0]) from e
        self.scheduler.on_weight_update(state.version)
        return metrics

    async def train(self) -> dict[str, float]:
        """One optimizer step on samples from the stream; returns its metrics."""
        state, trainer = self.state, self.services.trainer
        want = self.cfg.scheduler.prompts_per_step * self.producer.group_size
        batch, selection, candidates = await self.ledger.next_batch(want)
        if not batch:
            raise RunError(
                f"no trainable samples for step {state.step + 1} at version {state.version}: "
                f"{candidates} candidates, {len(selection.dropped_stale)} too stale, "
                f"{selection.num_partial_held} partial held back; check scheduler.max_staleness "
                "and scheduler.max_partial_fraction"
            )
        t0 = time.perf_counter()
        per_rank = pack_micro_batches(
            [d.sample for d in batch],
            micro_batch_tokens=self.cfg.trainer.micro_batch_tokens,
            dp_size=1,
        )
        metrics = await trainer.forward_backward.remote(per_rank[0])
        metrics |= await trainer.optim_step.remote()
        self.stats.phase_s["train"] += time.perf_counter() - t0
        state.version += 1
        state.step += 1
        self.ledger.trained(batch, state.step, trained_at_version=state.version - 1)
        metrics |= staleness_metrics(batch, trained_at_version=state.version - 1)
        metrics["batch/samples"] = float(len(batch))
        metrics["batch/partial"] = float(selection.num_partial)
        metrics["batch/dropped_stale"] = float(len(selection.dropped_stale))
        return metrics

    async def finish(self) -> Path:
        """Write the trained model to run.output_dir/model (HF layout) and, if configured,
        register it in the MLflow model registry."""
        model_dir = self.paths.model
        await self.services.trainer.export_weights.remote(str(model_dir), self.state.version)
        name = self.cfg.tracking.register_model
        if name:
            uri = self.services.tracker.register_model(model_dir, name)
            if uri:
                (self.paths.root / "registered_model.txt").write_text(uri + "\n")
                log.info("registered %s as %s", model_dir, uri)
        return model_dir

    # ------------------------------------------------------------------ helpers
    async def _evaluate_and_log(self) -> dict[str, float]:
        evals = await self.evaluator.evaluate()
        if evals:
            self.services.tracker.log_metrics(evals, step=self.state.step)
        return evals

    async def _restart_trainer(self) -> None:
        """A trainer process that died loses the steps since the last checkpoint: start a new
        one and continue from that checkpoint (the same path as --resume)."""
        await self.producer.stop()
        self.services.replace_trainer()
        if self.paths.latest_checkpoint() is None:
            raise RunError("the trainer died before the first checkpoint; nothing to resume from")
        await self.checkpoints.restore(resume=True)

    def _step_metrics(self, step_s: float) -> dict[str, float]:
        services = self.services
        out = self.stats.metrics(step_s)
        out |= {f"queue/{k}": float(v) for k, v in self.ledger.stream.depth().items()}
        out |= self.scheduler.metrics()
        out |= {f"reward_worker/{k}": float(v) for k, v in services.rewards.metrics().items()}
        if services.agents is not None:
            out |= services.agents.metrics()
        out["version"] = float(self.state.version)
        return out

    async def aclose(self) -> None:
        """Stop producing and stop the servers (``close`` stops the rest)."""
        if self.producer is not None:
            await self.producer.stop()
        await self.services.aclose()

    def close(self, status: str) -> None:
        self.services.close(status)


def train(
    cfg: RunConfig, *, resume: bool = False, parent_run_id: str | None = None
) -> dict[str, float]:
    """Run ``cfg`` to the end (or until SIGINT, which checkpoints first); returns the last
    step's metrics. ``parent_run_id``: the MLflow run to nest this run's tracking under."""
    driver = Driver(cfg, resume=resume, parent_run_id=parent_run_id)
    status = "FAILED"
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if driver.state.stop_requested:  # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        log.warning(
            "SIGINT: finishing this step, checkpointing and stopping (Ctrl-C again to abort)"
        )
        driver.state.stop_requested = True

    signal.signal(signal.SIGINT, on_sigint)
    try:
        driver.setup()
        metrics = asyncio.run(driver.run())
        status = "KILLED" if driver.state.stop_requested else "FINISHED"
        return metrics
    finally:
        signal.signal(signal.SIGINT, previous)
        if not driver.main_started:  # set-up failed half-way: stop what it started
            asyncio.run(driver.aclose())
        driver.close(status)
