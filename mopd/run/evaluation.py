"""Held-out evaluation: greedy responses to every source's eval prompts, scored by the
sources' rewards (agentic prompts run as trajectories scored by their environment), as
``eval/accuracy/<domain>``.

Consumes: the scheduler's eval prompts, the rollout servers (brought to the trainer's weights
first). Produces: metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import numpy as np

from mopd.config import RunConfig
from mopd.inference.client import EngineError
from mopd.inference.protocol import GenerateOutput
from mopd.scheduler.scheduler import DataScheduler
from mopd.types import Prompt

from .errors import RunError
from .requests import generate_request, to_sample
from .services import Services
from .state import RunState
from .weights import WeightSync

__all__ = ["Evaluator"]

log = logging.getLogger("mopd.run")


class Evaluator:
    """``await evaluate()`` -> ``{"eval/accuracy/<domain>": accuracy}`` at the run's version."""

    def __init__(
        self,
        cfg: RunConfig,
        scheduler: DataScheduler,
        services: Services,
        weights: WeightSync,
        state: RunState,
    ) -> None:
        self.cfg, self.scheduler, self.services = cfg, scheduler, services
        self.weights, self.state = weights, state

    async def evaluate(self) -> dict[str, float]:
        """Held-out accuracy per domain: greedy responses scored by the sources' rewards."""
        prompts = self.scheduler.eval_prompts()
        if not prompts:
            return {}
        if not self.weights.current:
            await self.weights.sync()
        version = self.state.version
        agentic = [p for p in prompts if "agentic" in p.metadata]
        prompts = [p for p in prompts if "agentic" not in p.metadata] + agentic
        single = prompts[: len(prompts) - len(agentic)]
        outs = await asyncio.gather(*(self._generate(p) for p in single))
        layout = self.services.layout
        samples = [
            to_sample(p, f"{p.prompt_id}/eval", o, version, layout) for p, o in zip(prompts, outs)
        ]
        rewards = await asyncio.get_running_loop().run_in_executor(
            None, self.services.rewards.score, samples
        )
        if agentic:  # trajectories at the rollout temperature, scored by their environment
            agents = self.services.agents
            assert agents is not None
            runs = await asyncio.gather(
                *(agents.run(p, f"{p.prompt_id}/eval", version=version) for p in agentic)
            )
            rewards = [*rewards, *(float(s.reward or 0.0) for s in runs)]
        per: dict[str, list[float]] = defaultdict(list)
        for p, r in zip(prompts, rewards):
            per[p.domain].append(float(r >= 1.0 - 1e-6))
        return {f"eval/accuracy/{d}": float(np.mean(v)) for d, v in sorted(per.items())}

    async def _generate(self, prompt: Prompt, attempts: int = 4) -> GenerateOutput:
        """One greedy eval request; a failed call heals the servers and is retried (as
        rollout requeues a failed group), so a dropped connection does not end the run."""
        for attempt in range(1, attempts + 1):
            generation = self.weights.generation
            request = generate_request(
                self.cfg,
                prompt,
                f"{prompt.prompt_id}/eval",
                self.state.version,
                routes=self.services.records_routes,
                greedy=True,
            )
            try:
                return await self.services.rollout.router.generate(request)
            except EngineError as e:
                if attempt == attempts:
                    raise RunError(
                        f"evaluation request {prompt.prompt_id} failed {attempts} times: {e}"
                    ) from e
                log.warning("eval of %s failed (%s); retrying", prompt.prompt_id, e)
                await self.weights.heal(generation)
                # 2, 4, 8 s: past the pool's cool-down of a server that failed (5 s).
                await asyncio.sleep(2.0**attempt)
        raise AssertionError("unreachable")
