"""The rollout producer: prompt groups in, scored samples published to the training stream.

For each group the scheduler hands out it samples G responses (one batched generate call, or
G agentic trajectories), scores them (reward worker), lets the scheduler compute advantages
and apply dynamic sampling (``complete_group``), has the teacher of the prompt's domain score
every token (stages that use a teacher), and publishes what is left. SFT generates nothing:
the reference answer is the response.

Work is refilled per request slot, not per group (``SlotPool``): a group holds a slot only
while its own sample is generating, so the short samples of a group free their slots for the
next group while its longest sample is still running. In async mode the groups the scheduler
reports too stale to ever train are cancelled and handed out again instead of finishing for
nothing.

Consumes: ``DataScheduler`` groups, the rollout router, rewards, teachers, the run's version.
Produces: ``ScoredSample`` records in the ``TrainingStream``; step statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import numpy as np

from mopd.algo.stages import Stage
from mopd.batching import Coalescer
from mopd.config import RunConfig
from mopd.inference.client import EngineError
from mopd.inference.protocol import GenerateOutput, GenerateRequest
from mopd.scheduler.scheduler import DataScheduler, PromptGroup
from mopd.scheduler.stream import TrainingStream
from mopd.types import Prompt, RolloutSample, ScoredSample

from .errors import RunError
from .metrics import StepStats
from .requests import generate_request, to_sample
from .services import Services
from .state import RunState
from .weights import WeightSync

__all__ = ["RolloutProducer", "SlotPool"]

log = logging.getLogger("mopd.run")


class SlotPool:
    """The rollout servers' request slots: each sample generating holds one.

    ``take`` and ``give`` count them; ``freed`` is an event set whenever slots come back, so
    the producer can wake up and hand out more work.
    """

    def __init__(self) -> None:
        self.held = 0
        self.freed = asyncio.Event()

    def take(self, n: int) -> None:
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n
        self.freed.set()

    def fits(self, n: int, capacity: int) -> bool:
        """Whether ``n`` more slots fit in ``capacity``."""
        return self.held + n <= capacity


class RolloutProducer:
    """Keeps the rollout servers busy and the training stream fed; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        stage: Stage,
        scheduler: DataScheduler,
        stream: TrainingStream,
        services: Services,
        weights: WeightSync,
        state: RunState,
        stats: StepStats,
    ) -> None:
        self.cfg, self.stage, self.scheduler, self.stream = cfg, stage, scheduler, stream
        self.services, self.weights, self.state, self.stats = services, weights, state, stats
        self.slots = SlotPool()
        self.group_size = max(s.group_size for s in cfg.data.sources)
        self._background: asyncio.Task | None = None
        # The groups of one wave (e.g. a synchronous step) score their rewards in one call.
        self._rewards: Coalescer[RolloutSample, float] = Coalescer(self._score_rewards)

    # ------------------------------------------------------------------ the pool
    async def produce(self, groups_wanted: int) -> None:
        """Keep every request slot busy until ``groups_wanted`` groups with a learning signal
        are published."""
        capacity = self.cfg.rollout.max_running_requests * len(self.services.rollout.router.urls)
        done = 0
        tasks: dict[asyncio.Task, tuple[PromptGroup, int]] = {}
        while done < groups_wanted:
            self._cancel_too_stale(tasks)
            self._hand_out(tasks, groups_wanted - done, capacity)
            if not tasks and self.cfg.scheduler.mode == "async":
                await asyncio.sleep(0.02)  # back-pressure: wait for the trainer to consume
                continue
            if not tasks:
                raise RunError(
                    "the scheduler handed out no work: raise scheduler.max_inflight_groups "
                    f"(now {self.cfg.scheduler.max_inflight_groups})"
                )
            for task in await self._wait_any(tasks):
                group, generation = tasks.pop(task)
                done += await self._settle(task, group, generation)

    def _cancel_too_stale(self, tasks: dict[asyncio.Task, tuple[PromptGroup, int]]) -> None:
        if self.cfg.scheduler.mode != "async":
            return
        stale = set(self.scheduler.too_stale_groups(self.state.version))
        for task, (group, _) in tasks.items():
            if group.group_id in stale:
                task.cancel()

    def _hand_out(
        self, tasks: dict[asyncio.Task, tuple[PromptGroup, int]], wanted: int, capacity: int
    ) -> None:
        while wanted - len(tasks) > 0 and (not tasks or self.slots.fits(self.group_size, capacity)):
            groups = self.scheduler.next_groups(1)
            if not groups:
                return
            self.slots.take(groups[0].group_size)
            task = asyncio.create_task(self.run_group(groups[0]))
            tasks[task] = (groups[0], self.weights.generation)

    async def _wait_any(self, tasks: dict[asyncio.Task, tuple[PromptGroup, int]]) -> set:
        """The tasks that finished once a group finished or a request slot came back."""
        self.slots.freed.clear()
        slot_freed = asyncio.create_task(self.slots.freed.wait())
        finished, _ = await asyncio.wait([*tasks, slot_freed], return_when=asyncio.FIRST_COMPLETED)
        slot_freed.cancel()
        return {t for t in finished if t is not slot_freed}

    async def _settle(self, task: asyncio.Task, group: PromptGroup, generation: int) -> int:
        """1 if the finished task published its group, else 0 (the group is handed out again
        when it was cancelled as too stale or its rollout failed)."""
        try:
            return int(bool(task.result()))
        except asyncio.CancelledError:
            self.scheduler.requeue(group.group_id)  # too stale to train: redo it
        except EngineError as e:
            log.warning("rollout of %s failed: %s", group.group_id, e)
            self.scheduler.requeue(group.group_id)
            await self.weights.heal(generation)
        return 0

    # ------------------------------------------------------------------ async mode
    def run_in_background(self) -> None:
        """Async mode: keep producing while the trainer steps (a crash surfaces here)."""
        if self._background is None or self._background.done():
            if self._background is not None:
                self._background.result()  # surface a crash of the background rollout
            self._background = asyncio.create_task(self.produce(10**12))

    async def stop(self) -> None:
        """Cancel the background production and abort whatever it left in flight."""
        producer, self._background = self._background, None
        if producer is not None:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            with contextlib.suppress(Exception):
                await self.services.rollout.router.abort_all()

    # ------------------------------------------------------------------ one group
    async def run_group(self, group: PromptGroup) -> list[ScoredSample]:
        """Sample, reward, advantage and (stages with a teacher) teacher-score one group;
        publish it."""
        version = self.state.version
        if not self.stage.generates:
            return self._reference_group(group)
        t0 = time.perf_counter()
        if "agentic" in group.prompt.metadata:
            # Multi-turn trajectories with tools; each reward is set when its trajectory ends.
            samples = list(
                await asyncio.gather(
                    *(self._agent_rollout(group.prompt, sid, version) for sid in group.sample_ids())
                )
            )
            if any(s.finish_reason == "abort" for s in samples):
                self.scheduler.requeue(group.group_id)
                return []
            t1 = t2 = time.perf_counter()
            rewards = [float(s.reward) for s in samples]  # type: ignore[arg-type]
        else:
            outs = await self._generate_group(
                [self._request(group.prompt, sid, version) for sid in group.sample_ids()]
            )
            if any(o.aborted for o in outs):
                self.scheduler.requeue(group.group_id)
                return []
            layout = self.services.layout
            samples = [
                to_sample(group.prompt, sid, o, version, layout)
                for sid, o in zip(group.sample_ids(), outs)
            ]
            t1 = time.perf_counter()
            rewards = await self._rewards(samples)
            t2 = time.perf_counter()
        scored = self.scheduler.complete_group(samples, rewards)
        self._record(group.prompt.domain, samples, rewards)
        if scored and self.stage.uses_teacher:
            scored = await self._teacher_scored(group.prompt.domain, samples, scored)
        t3 = time.perf_counter()
        self.stats.phase_s["rollout"] += t1 - t0
        self.stats.phase_s["reward"] += t2 - t1
        self.stats.phase_s["teacher"] += t3 - t2
        if scored:
            self.stream.publish(scored)
        return scored

    async def _score_rewards(self, samples: list[RolloutSample], _: list[int]) -> list[float]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.services.rewards.score, samples)

    def _request(self, prompt: Prompt, sample_id: str, version: int) -> GenerateRequest:
        return generate_request(
            self.cfg, prompt, sample_id, version, routes=self.services.records_routes
        )

    def _record(self, domain: str, samples: list[RolloutSample], rewards: list[float]) -> None:
        stats = self.stats.rollout
        stats[f"reward/{domain}"].extend(rewards)
        stats[f"response_length/{domain}"].extend(len(s.response_ids_T) for s in samples)
        stats["truncated"].extend(float(s.finish_reason == "length") for s in samples)

    async def _teacher_scored(
        self, domain: str, samples: list[RolloutSample], scored: list[ScoredSample]
    ) -> list[ScoredSample]:
        """``scored`` with the log-probs (and top-k) of the teacher of ``domain``."""
        from teachers.base import TeacherUnavailableError

        name = self.services.teacher_of[domain]
        try:
            scores = await self.services.teachers[name].score_samples(samples)
        except TeacherUnavailableError as e:
            raise RunError(f"teacher {name!r} stayed down past its retries: {e}") from e
        return [
            dataclasses.replace(
                s,
                logp_teacher_T=sc.logp_T,
                teacher_topk_logp_TK=sc.topk_logp_TK,
                teacher_topk_ids_TK=sc.topk_ids_TK,
                teacher=name,
            )
            for s, sc in zip(scored, scores)
        ]

    async def _agent_rollout(self, prompt: Prompt, sample_id: str, version: int) -> RolloutSample:
        """One agentic trajectory; gives its request slot back when done. A trajectory holds
        one slot: its turns run one after another."""
        if self.services.agents is None:
            raise RunError(
                f"prompt {prompt.prompt_id} of source {prompt.source!r} names an agentic task "
                "but the source's reward is not 'agentic'; set data.sources[*].reward: agentic"
            )
        try:
            return await self.services.agents.run(prompt, sample_id, version=version)
        finally:
            self.slots.give(1)

    async def _generate_group(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """A group's samples in one batched generate call (one round trip, not G); gives
        their request slots back when done."""
        try:
            return await self.services.rollout.router.generate_batch(requests)
        finally:
            self.slots.give(len(requests))

    def _reference_group(self, group: PromptGroup) -> list[ScoredSample]:
        """Stages that generate nothing (SFT): the reference answer (+ EOS) is the response."""
        self.slots.give(group.group_size)  # no request slot is used
        prompt = group.prompt
        if prompt.answer is None:
            raise RunError(
                f"algorithm.loss={self.stage.name} needs reference answers, but source "
                f"{prompt.source!r} gave none for {prompt.prompt_id}; use a source with answers"
            )
        tokenizer = self.services.tokenizer
        ids = list(tokenizer.encode(prompt.answer, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        samples = [
            RolloutSample(
                sample_id=sid,
                prompt=prompt,
                response_ids_T=np.asarray(ids, dtype=np.int32),
                logp_rollout_T=np.zeros(len(ids), dtype=np.float32),  # unused by the SFT loss
                versions_T=np.full(len(ids), self.state.version, dtype=np.int32),
                finish_reason="stop",
                text=prompt.answer,
            )
            for sid in group.sample_ids()
        ]
        scored = self.scheduler.complete_group(samples, [1.0] * len(samples))
        self.stats.rollout[f"response_length/{prompt.domain}"].extend(len(ids) for _ in samples)
        self.stream.publish(scored)
        return scored
