"""The run driver: the one module that wires the roles together (design.md, style.md).

Data moves one way and only weights come back:

    DataScheduler.next_groups                      prompt groups, pulled as rollout frees up
      -> rollout router (SGLang or embedded)       G samples per prompt, log-probs, routed experts
      -> RewardWorker (envs/)                      outcome rewards, with timeouts
      -> DataScheduler.complete_group              group advantages, dynamic sampling
      -> TeacherScorer of the prompt's domain      teacher log-probs of the sampled tokens (MOPD)
      -> TrainingStream.publish (Redis)            durable, once per sample id
    TrainingStream.read -> DataScheduler.select_batch -> pack_micro_batches
      -> trainer.forward_backward / optim_step     the loss of mopd.algo (SFT, RL or MOPD)
      -> checkpoint (driver state, then trainer)   the trainer's COMMITTED marker commits both
      -> TrainingStream.commit                     samples acknowledged only after that
      -> export_weights -> update_weights_from_disk on every rollout server (version + 1)

Sync mode trains strictly on-policy: the rollout of step s finishes before step s trains and
weights s+1 reach the servers before step s+1 samples. Async mode keeps rollout running while
the trainer steps, within ``scheduler.max_staleness`` versions (``select_batch`` enforces it);
without ``partial_rollout`` the groups still generating at a weight update are aborted and
handed out again.

Recovery is one code path for ``--resume`` and for a trainer that dies mid-run: load the
latest committed checkpoint, replay its stream commit, restore the scheduler, take back this
consumer's pending samples, and push the checkpoint's weights to the servers. A rollout
server that dies is restarted and its groups are handed out again; a teacher that stays down
fails the run with its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mopd.config import RunConfig, save_resolved
from mopd.config.schema import RolloutConfig, TeacherConfig
from mopd.inference.client import EngineError
from mopd.inference.protocol import (
    GenerateOutput,
    GenerateRequest,
    SamplingParams,
    UpdateWeightsFromDisk,
    UpdateWeightsFromTensor,
    compact_routes,
)
from mopd.models.moe import MoELayout, moe_layout
from mopd.packing import pack_micro_batches
from mopd.scheduler.redis_server import EmbeddedRedis, connect
from mopd.scheduler.scheduler import DataScheduler, PromptGroup
from mopd.scheduler.sources import derive_seed
from mopd.scheduler.stream import Delivery, TrainingStream
from mopd.scheduler.tokenize import load_tokenize
from mopd.tracking import (
    MLflowTracker,
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten,
    resolve_model,
)
from mopd.types import Prompt, RolloutSample, ScoredSample

log = logging.getLogger("mopd.driver")

CONSUMER = "trainer"
DRIVER_STATE = "driver_state.json"
TRAINED_LOG = "trained_samples.jsonl"


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class _TrainerDied(RuntimeError):
    """The trainer actor's process is gone (killed, OOM, crashed)."""


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files, all under ``run.output_dir``."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def models(self) -> Path:
        return self.root / "models_cache"

    @property
    def trained_log(self) -> Path:
        return self.root / TRAINED_LOG


def _ckpt_dir(root: Path, step: int) -> Path:
    from trainer.checkpoint import checkpoint_dir

    return checkpoint_dir(root, step)


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _teacher_rollout_config(base: RolloutConfig, teacher: TeacherConfig) -> RolloutConfig:
    """A teacher's servers: same host and batching as rollout, its own backend and args."""
    return dataclasses.replace(
        base,
        backend=teacher.backend,
        num_servers=teacher.num_servers,
        return_routed_experts=False,
        request_timeout_s=teacher.timeout_s,
        server_args=dict(teacher.server_args),
    )


class Driver:
    """One run: owns the services, the roles and the loop. Use ``train(cfg)``."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume
        self.paths = RunPaths(Path(cfg.run.output_dir).resolve())
        self.stack = contextlib.ExitStack()
        self.step = 0
        self.version = 0
        self.stop_requested = False
        self.tracker: Tracker = NullTracker()
        # Stream entries trained (or dropped as stale) since the last checkpoint: they are
        # acknowledged only once a checkpoint that accounts for them is committed.
        self.uncommitted: list[Delivery] = []
        self.undropped: list[Delivery] = []
        self.waiting: list[Delivery] = []
        self.phase_s: dict[str, float] = defaultdict(float)
        self.rollout_stats: dict[str, list[float]] = defaultdict(list)
        self.main_started = False
        self.rollout_generation = 0  # bumped each time the rollout servers are replaced
        self.served_version = 0  # weights version the rollout servers hold
        self.agents: Any = None  # the ToolManager when a data source is agentic
        self._reserved_requests = 0  # request slots held by groups in flight
        self._recovered_ids: set[str] = set()  # pending at the last restart (see _clamp_versions)
        self._request_done = asyncio.Event()
        self._heal_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, paths = self.cfg, self.paths
        paths.root.mkdir(parents=True, exist_ok=True)
        for sub in (paths.checkpoints, paths.weights, paths.logs):
            sub.mkdir(exist_ok=True)
        if not self.resume and _latest(paths.checkpoints) is not None:
            raise RunError(
                f"{paths.checkpoints} already holds checkpoints; pass --resume to continue "
                "that run, or choose another run.output_dir / run.name"
            )
        if cfg.rollout.weight_sync == "distributed":
            raise RunError(
                "rollout.weight_sync=distributed (an NCCL group between trainer and engines) is "
                "not available in this release; use disk (any machine) or tensor (same host)"
            )
        save_resolved(cfg, paths.root)

        self.tracker = self._start_tracking()
        self.tracker.log_params(flatten(json.loads(json.dumps(dataclasses.asdict(cfg)))))
        self.tracker.log_artifact(self.paths.root / "resolved_config.yaml")

        redis_url = cfg.scheduler.redis_url
        self.embedded_redis: EmbeddedRedis | None = None
        if redis_url is None:
            self.embedded_redis = self.stack.enter_context(EmbeddedRedis(paths.redis))
            redis_url = self.embedded_redis.url
        assert redis_url is not None
        self.redis = connect(redis_url, cfg.scheduler.redis_password_env)
        self.stream = TrainingStream(self.redis, cfg.run.name)

        self._start_ray()
        tracking_uri = self._tracking_uri()
        self.student_path = resolve_model(cfg.model.path, tracking_uri, paths.models)
        self.layout: MoELayout | None = moe_layout(self.student_path)
        self.teacher_paths = {
            t.name: resolve_model(t.model, tracking_uri, paths.models) for t in cfg.teachers
        }
        self._check_tokenizers()

        tokenizer_path = cfg.model.tokenizer_path or str(self.student_path)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.scheduler = DataScheduler(
            cfg.data.sources,
            cfg.scheduler,
            tokenize=load_tokenize(tokenizer_path),
            seed=cfg.run.seed,
            advantage=cfg.algorithm.advantage,
            advantage_eps=cfg.algorithm.advantage_eps,
            dense_signal=cfg.algorithm.loss == "mopd",
        )
        self.rewards = self._start_rewards()
        self.trainer = self._start_trainer()
        self.rollout = self._start_rollout(cfg.rollout, self.student_path, replicas=None)
        self.agents = self._start_agents()
        self.teachers = self._start_teachers()
        self.teacher_of = {d: t.name for t in cfg.teachers for d in t.domains}
        self.write_processes()

    def _tracking_uri(self) -> str:
        return self.cfg.tracking.tracking_uri or default_tracking_uri(self.paths.root)

    def _start_tracking(self) -> Tracker:
        t = self.cfg.tracking
        if not t.enabled:
            return NullTracker()
        return MLflowTracker(
            self._tracking_uri(),
            t.experiment,
            self.cfg.run.name,
            artifact_location=self.paths.root / "mlartifacts",
            parent_run_id=os.environ.get("MOPD_PARENT_RUN_ID"),
        )

    def _start_ray(self) -> None:
        import ray

        c = self.cfg.cluster
        if ray.is_initialized():
            return
        if c.address is None and "RAY_ADDRESS" not in os.environ:
            ray.init(
                address="local",
                num_cpus=c.num_cpus,
                num_gpus=c.num_gpus,
                include_dashboard=False,
                _node_ip_address=c.bind_host,
                log_to_driver=True,
                configure_logging=False,
            )
        elif "RAY_ADDRESS" in os.environ:
            ray.init()  # inside a Ray job (mopd submit): RAY_ADDRESS names the cluster
        elif c.address.startswith(("http://", "https://")):
            raise RunError(
                f"cluster.address={c.address!r} is a dashboard URL, which `mopd submit` uses; "
                "to run the driver here against that cluster, set it to the GCS address "
                "(host:6379) or 'auto'"
            )
        else:
            ray.init(address=c.address)
        self.stack.callback(ray.shutdown)

    def _check_tokenizers(self) -> None:
        from teachers.tokenizer import TokenizerMismatchError, check_tokenizer_compatible

        student_tok = self.cfg.model.tokenizer_path or str(self.student_path)
        for name, path in self.teacher_paths.items():
            try:
                check_tokenizer_compatible(student_tok, str(path), teacher_name=name)
            except TokenizerMismatchError as e:
                raise RunError(str(e)) from None

    def _thread_env(self) -> dict[str, str]:
        # On a CPU machine every server and the trainer share few cores: one thread each
        # avoids oversubscription that makes everyone slower.
        return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _start_rollout(self, rcfg: RolloutConfig, model: Path, replicas: int | None):
        from rollout.build import build_rollout_backend

        n = replicas or rcfg.num_servers
        overrides = [
            {"random_seed": self.cfg.run.seed + i, "env": self._thread_env()} for i in range(n)
        ]
        service = build_rollout_backend(
            dataclasses.replace(rcfg, num_servers=n),
            str(model),
            use_ray=True,
            ray_options={"num_cpus": 0, "max_restarts": 0},
            spec_overrides=overrides,
        )
        return service

    def _start_teachers(self) -> dict[str, Any]:
        from teachers.scorer import TeacherScorer

        scorers = {}
        self.teacher_services = {}
        for t in self.cfg.teachers:
            service = self._start_rollout(
                _teacher_rollout_config(self.cfg.rollout, t), self.teacher_paths[t.name], None
            )
            self.teacher_services[t.name] = service
            scorers[t.name] = TeacherScorer.from_config(t, service.router.urls)
        return scorers

    def _start_rewards(self):
        from envs.registry import get_reward
        from envs.worker import RewardWorker

        for i, src in enumerate(self.cfg.data.sources):
            try:
                get_reward(src.reward)
            except Exception as e:
                raise RunError(f"data.sources[{i}].reward: {e}") from None
        worker = RewardWorker({s.name: s.reward for s in self.cfg.data.sources}, num_processes=1)
        self.stack.callback(worker.close)
        return worker

    def _start_agents(self):
        """The Toolbox actor and the ToolManager, when a data source is agentic (its tasks
        run as multi-turn trajectories; their environment sets the reward)."""
        from envs.registry import AGENTIC

        if not any(s.reward == AGENTIC for s in self.cfg.data.sources):
            return None
        import ray

        from envs.agentic import ENVIRONMENTS, build_env
        from envs.sandbox import SandboxLimits
        from envs.tool_manager import ToolManager, ToolManagerConfig
        from envs.toolbox import ToolboxConfig, ToolQuota, remote_toolbox

        a = self.cfg.agent
        quotas = {
            tool: ToolQuota(max_concurrency=n, max_qps=a.tool_max_qps.get(tool))
            for tool, n in a.tool_max_concurrency.items()
        }
        limits = SandboxLimits(
            wall_seconds=a.sandbox_wall_seconds,
            cpu_seconds=a.sandbox_cpu_seconds,
            memory_bytes=a.sandbox_memory_bytes,
        )
        # Sandboxes fail closed: a host without isolation stops the run here, with the reason.
        toolbox = remote_toolbox(num_cpus=0, max_restarts=0).remote(
            ToolboxConfig(pool_size=a.pool_size, limits=limits, quotas=quotas)
        )
        try:
            ray.get(toolbox.stats.remote())
        except Exception as e:
            raise RunError(f"the Toolbox cannot start its sandboxes: {e}") from None
        self.stack.callback(lambda: ray.kill(toolbox))
        tasks_dir = Path(a.tasks_dir) if a.tasks_dir else None
        envs = {n: build_env(n, tasks_dir / n if tasks_dir else None) for n in ENVIRONMENTS}
        s = self.cfg.rollout.sampling
        config = ToolManagerConfig(
            max_turns=a.max_turns,
            max_response_tokens=a.max_response_tokens,
            max_tokens_per_turn=a.max_tokens_per_turn,
            turn_timeout_s=a.turn_timeout_s,
            tool_timeout_s=a.tool_timeout_s,
            reward_timeout_s=a.reward_timeout_s,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            stop=tuple(s.stop),
        )
        layout = self.layout if self.cfg.rollout.return_routed_experts else None
        return ToolManager(
            self.rollout.router, toolbox, self.tokenizer, config, layout=layout, envs=envs
        )

    def _start_trainer(self):
        import ray

        from trainer.actor import TrainerActor

        model_cfg = dataclasses.replace(self.cfg.model, path=str(self.student_path))
        gpus = 1 if self.cfg.trainer.backend == "torch" and _has_gpu() else 0
        actor = ray.remote(num_cpus=0, num_gpus=gpus, max_restarts=0)(TrainerActor).options(
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.cfg.cluster.num_cpus or 1)}}
        )
        return actor.remote(self.cfg.trainer, model_cfg, self.cfg.algorithm, seed=self.cfg.run.seed)

    # ------------------------------------------------------------------ recovery
    async def recover(self) -> None:
        """Continue from the latest committed checkpoint (``--resume``, or a trainer restart)."""
        ckpt = _latest(self.paths.checkpoints)
        if ckpt is None:
            if self.resume:
                log.warning(
                    "--resume: no checkpoint under %s; starting from scratch",
                    self.paths.checkpoints,
                )
            return
        state = json.loads((ckpt / DRIVER_STATE).read_text())
        await self.trainer.load.remote(str(ckpt))
        self.step, self.version = int(state["step"]), int(state["version"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A crash between the checkpoint and its stream commit: replay the commit (idempotent).
        self.stream.commit_ids(state["commit"]["entries"], state["commit"]["samples"])
        self.stream.discard_ids(state["drop"]["entries"], state["drop"]["samples"])
        self.uncommitted, self.undropped = [], []
        recovered = self.stream.recover(CONSUMER)
        self._recovered_ids = {d.sample.sample.sample_id for d in recovered}
        self.waiting = self._clamp_versions(recovered)
        _truncate_log(self.paths.trained_log, self.step)
        await self.sync_weights()
        log.info(
            "resumed at step %d (version %d) from %s; %d samples recovered",
            self.step,
            self.version,
            ckpt,
            len(self.waiting),
        )

    # ------------------------------------------------------------------ rollout
    def _request(self, prompt: Prompt, sample_id: str, *, greedy: bool = False) -> GenerateRequest:
        s = self.cfg.rollout.sampling
        temperature = (
            0.0
            if greedy
            else (prompt.temperature if prompt.temperature is not None else s.temperature)
        )
        rid = f"{sample_id}@v{self.version}"
        params = SamplingParams(
            max_new_tokens=prompt.max_new_tokens or s.max_new_tokens,
            temperature=temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            stop=tuple(s.stop) or None,
            # Each request draws from its own seed (run seed, request id): the same samples
            # whatever the engine batches it with, so a seeded run reproduces.
            sampling_seed=derive_seed(self.cfg.run.seed, rid) % 2**31,
        )
        return GenerateRequest(
            input_ids=tuple(int(t) for t in prompt.input_ids_P),
            sampling_params=params,
            rid=rid,
            return_logprob=True,
            return_routed_experts=bool(self.cfg.rollout.return_routed_experts and self.layout),
        )

    def _to_sample(
        self, prompt: Prompt, sample_id: str, out: GenerateOutput, version: int
    ) -> RolloutSample:
        ids = np.asarray(out.output_ids, dtype=np.int32)
        if out.output_logprobs is None:
            raise RunError(f"rollout server returned no log-probs for {sample_id}")
        versions = np.full(ids.shape[0], version, dtype=np.int32)
        for span in out.weight_version_spans:  # partial rollouts: tokens of several versions
            with contextlib.suppress(ValueError):
                versions[span.start : span.end] = int(span.version)
        routes = None
        if out.routed_experts is not None and self.layout is not None:
            routes = compact_routes(
                out.routed_experts, self.layout.moe_layer_ids, self.layout.num_experts
            )
        return RolloutSample(
            sample_id=sample_id,
            prompt=prompt,
            response_ids_T=ids,
            logp_rollout_T=out.output_logprobs,
            versions_T=versions,
            finish_reason=out.finish_reason.type if out.finish_reason else "stop",
            routes_SLk=routes,
            text=out.text or "",
        )

    async def run_group(self, group: PromptGroup) -> list[ScoredSample]:
        """Sample, reward, advantage and (MOPD) teacher-score one group; publish it."""
        from teachers.base import TeacherUnavailableError

        version = self.version
        if self.cfg.algorithm.loss == "sft":
            return self._sft_group(group)
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
            requests = [self._request(group.prompt, sid) for sid in group.sample_ids()]
            outs = await self._generate_group(requests)
            if any(o.aborted for o in outs):
                self.scheduler.requeue(group.group_id)
                return []
            samples = [
                self._to_sample(group.prompt, sid, o, version)
                for sid, o in zip(group.sample_ids(), outs)
            ]
            t1 = time.perf_counter()
            rewards = await asyncio.get_running_loop().run_in_executor(
                None, self.rewards.score, samples
            )
            t2 = time.perf_counter()
        scored = self.scheduler.complete_group(samples, rewards)
        domain = group.prompt.domain
        self.rollout_stats[f"reward/{domain}"].extend(rewards)
        self.rollout_stats[f"response_length/{domain}"].extend(
            len(s.response_ids_T) for s in samples
        )
        self.rollout_stats["truncated"].extend(float(s.finish_reason == "length") for s in samples)
        if scored and self.cfg.algorithm.loss == "mopd":
            name = self.teacher_of[domain]
            try:
                scores = await self.teachers[name].score_samples(samples)
            except TeacherUnavailableError as e:
                raise RunError(f"teacher {name!r} stayed down past its retries: {e}") from e
            scored = [
                dataclasses.replace(
                    s,
                    logp_teacher_T=sc.logp_T,
                    teacher_topk_logp_TK=sc.topk_logp_TK,
                    teacher_topk_ids_TK=sc.topk_ids_TK,
                    teacher=name,
                )
                for s, sc in zip(scored, scores)
            ]
        t3 = time.perf_counter()
        self.phase_s["rollout"] += t1 - t0
        self.phase_s["reward"] += t2 - t1
        self.phase_s["teacher"] += t3 - t2
        if scored:
            self.stream.publish(scored)
        return scored

    async def _agent_rollout(self, prompt: Prompt, sample_id: str, version: int) -> RolloutSample:
        """One agentic trajectory; frees its request slot (reserved by rollout_until) when done.
        A trajectory holds one slot: its turns run one after another."""
        if self.agents is None:
            raise RunError(
                f"prompt {prompt.prompt_id} of source {prompt.source!r} names an agentic task "
                "but the source's reward is not 'agentic'; set data.sources[*].reward: agentic"
            )
        try:
            return await self.agents.run(prompt, sample_id, version=version)
        finally:
            self._reserved_requests -= 1
            self._request_done.set()

    async def _generate_group(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """A group's samples in one batched generate call (one round trip, not G); frees
        their request slots (reserved by rollout_until) when done."""
        try:
            return await self.rollout.router.generate_batch(requests)
        finally:
            self._reserved_requests -= len(requests)
            self._request_done.set()

    def _sft_group(self, group: PromptGroup) -> list[ScoredSample]:
        """SFT: the reference answer (+ EOS) is the response; nothing is generated."""
        self._reserved_requests -= group.group_size  # no request slot is used
        prompt = group.prompt
        if prompt.answer is None:
            raise RunError(
                f"algorithm.loss=sft needs reference answers, but source {prompt.source!r} "
                f"gave none for {prompt.prompt_id}; use a source with answers"
            )
        ids = list(self.tokenizer.encode(prompt.answer, add_special_tokens=False))
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        samples = [
            RolloutSample(
                sample_id=sid,
                prompt=prompt,
                response_ids_T=np.asarray(ids, dtype=np.int32),
                logp_rollout_T=np.zeros(len(ids), dtype=np.float32),  # unused by the SFT loss
                versions_T=np.full(len(ids), self.version, dtype=np.int32),
                finish_reason="stop",
                text=prompt.answer,
            )
            for sid in group.sample_ids()
        ]
        scored = self.scheduler.complete_group(samples, [1.0] * len(samples))
        self.rollout_stats[f"response_length/{prompt.domain}"].extend(len(ids) for _ in samples)
        self.stream.publish(scored)
        self._request_done.set()
        return scored

    async def rollout_until(self, groups_wanted: int) -> None:
        """Keep every request slot of the rollout servers busy until ``groups_wanted`` groups
        with a learning signal are published.

        Work is refilled per request slot, not per group: a group holds a slot only while its
        own sample is generating, so the short samples of a group free their slots for the
        next group while its longest sample is still running. In async mode, groups that
        have become too stale to ever train (handed out more than ``max_staleness`` versions
        ago) are aborted and handed out again instead of finishing for nothing.
        """
        cfg = self.cfg
        capacity = cfg.rollout.max_running_requests * self.rollout_replicas
        done = 0
        tasks: dict[asyncio.Task, tuple[PromptGroup, int]] = {}
        while done < groups_wanted:
            if cfg.scheduler.mode == "async":
                for task, (group, _) in tasks.items():
                    if self.version - group.version > cfg.scheduler.max_staleness:
                        task.cancel()
            while groups_wanted - done - len(tasks) > 0 and (
                not tasks or self._reserved_requests + self._group_size() <= capacity
            ):
                groups = self.scheduler.next_groups(1)
                if not groups:
                    break
                self._reserved_requests += groups[0].group_size
                task = asyncio.create_task(self.run_group(groups[0]))
                tasks[task] = (groups[0], self.rollout_generation)
            if not tasks and cfg.scheduler.mode == "async":
                await asyncio.sleep(0.02)  # back-pressure: wait for the trainer to consume
                continue
            if not tasks:
                raise RunError(
                    "the scheduler handed out no work: raise scheduler.max_inflight_groups "
                    f"(now {cfg.scheduler.max_inflight_groups})"
                )
            self._request_done.clear()
            slot_freed = asyncio.create_task(self._request_done.wait())
            finished, _ = await asyncio.wait(
                [*tasks, slot_freed], return_when=asyncio.FIRST_COMPLETED
            )
            slot_freed.cancel()
            for task in finished:
                if task is slot_freed:
                    continue
                group, generation = tasks.pop(task)
                try:
                    if task.result():
                        done += 1
                except asyncio.CancelledError:
                    self.scheduler.requeue(group.group_id)  # too stale to train: redo it
                except EngineError as e:
                    log.warning("rollout of %s failed: %s", group.group_id, e)
                    self.scheduler.requeue(group.group_id)
                    await self.heal_rollout(generation)

    def _group_size(self) -> int:
        return max(s.group_size for s in self.cfg.data.sources)

    @property
    def rollout_replicas(self) -> int:
        return len(self.rollout.router.urls)

    async def heal_rollout(self, generation: int) -> None:
        """Replace the rollout servers if one stopped answering; they resume serving the
        current weights. Failures of requests sent to servers already replaced are ignored."""
        if self._heal_lock is None:
            self._heal_lock = asyncio.Lock()
        async with self._heal_lock:
            if generation != self.rollout_generation:
                return  # that failure belongs to servers that were replaced meanwhile
            healthy = await asyncio.gather(
                *(w.health.remote() for w in self.rollout.workers), return_exceptions=True
            )
            if all(h is True for h in healthy):
                return
            log.warning(
                "%d of %d rollout servers are down: restarting the rollout servers",
                sum(h is not True for h in healthy),
                len(healthy),
            )
            with contextlib.suppress(Exception):
                await self.rollout.aclose()
            self.rollout = self._start_rollout(self.cfg.rollout, self.student_path, None)
            self.rollout_generation += 1
            self.served_version = 0
            if self.version > 0:
                await self.sync_weights()
            self.write_processes()

    def write_processes(self) -> None:
        """logs/processes.json: the pid of every process this run started, by role (what
        operators and the fault tests use; never kill by name)."""
        import ray

        state = {
            "driver": os.getpid(),
            "trainer": ray.get(self.trainer.pid.remote()),
            "rollout": ray.get([w.server_pid.remote() for w in self.rollout.workers]),
            "teachers": {
                name: ray.get([w.server_pid.remote() for w in svc.workers])
                for name, svc in self.teacher_services.items()
            },
            "redis": self.embedded_redis.pid if self.embedded_redis else None,
        }
        _write_json_atomic(self.paths.logs / "processes.json", state)

    # ------------------------------------------------------------------ training
    async def train_step(self) -> dict[str, float]:
        """One optimizer step on samples from the stream; returns its metrics."""
        want = self.cfg.scheduler.prompts_per_step * self._group_size()
        while True:
            got = await self._collect(want)
            by_id = {d.sample.sample.sample_id: d for d in got}
            selection = self.scheduler.select_batch(
                [d.sample for d in got], self.version, max_samples=want
            )
            batch = [by_id[s.sample.sample_id] for s in selection.batch]
            self.waiting = [by_id[s.sample.sample_id] for s in selection.waiting]
            self.undropped.extend(by_id[s.sample.sample_id] for s in selection.dropped_stale)
            if batch or self.cfg.scheduler.mode == "sync":
                break
            # Async: every admissible sample was held back by the partial cap; wait for more.
            await asyncio.sleep(0.05)
        if not batch:
            raise RunError(
                f"no trainable samples for step {self.step + 1} at version {self.version}: "
                f"{len(got)} candidates, {len(selection.dropped_stale)} too stale, "
                f"{selection.num_partial_held} partial held back; check scheduler.max_staleness "
                "and scheduler.max_partial_fraction"
            )

        t0 = time.perf_counter()
        per_rank = pack_micro_batches(
            [d.sample for d in batch],
            micro_batch_tokens=self.cfg.trainer.micro_batch_tokens,
            dp_size=1,
        )
        metrics = await self.trainer.forward_backward.remote(per_rank[0])
        metrics |= await self.trainer.optim_step.remote()
        self.phase_s["train"] += time.perf_counter() - t0
        self.version += 1
        self.step += 1
        self.uncommitted.extend(batch)
        staleness = [
            self.version - 1 - int(d.sample.sample.versions_T.min())
            for d in batch
            if d.sample.sample.versions_T.size
        ]
        metrics["staleness/mean"] = float(np.mean(staleness)) if staleness else 0.0
        metrics["staleness/max"] = float(max(staleness, default=0))
        metrics["batch/samples"] = float(len(batch))
        metrics["batch/partial"] = float(selection.num_partial)
        metrics["batch/dropped_stale"] = float(len(selection.dropped_stale))
        record = {
            "step": self.step,
            "trained_at_version": self.version - 1,
            "samples": [d.sample.sample.sample_id for d in batch],
            "oldest_token_versions": [
                int(d.sample.sample.versions_T.min(initial=self.version)) for d in batch
            ],
        }
        with open(self.paths.trained_log, "a") as f:
            f.write(json.dumps(record) + "\n")
        return metrics

    def _clamp_versions(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Versions of samples that outlived the policy that made them.

        After a restart from a checkpoint the steps past it are lost, and with them the
        weights that produced the samples still pending in the stream. Those recovered
        samples are the only copies (the re-dispatched groups reuse their ids, so
        ``publish`` drops the regenerated ones): they train once, in order, as if produced by
        the policy that trains them; their recorded rollout log-probs keep the importance
        weights right, and the staleness bound cannot apply to a policy that no longer
        exists. Any other sample made by weights newer than the trainer's counts as the
        trainer's version.
        """
        out = []
        for d in deliveries:
            v_T = d.sample.sample.versions_T
            if d.sample.sample.sample_id in self._recovered_ids:
                new_T = np.full_like(v_T, self.version)
            elif v_T.size and int(v_T.max()) > self.version:
                new_T = np.minimum(v_T, self.version)
            else:
                out.append(d)
                continue
            sample = dataclasses.replace(d.sample.sample, versions_T=new_T)
            out.append(Delivery(d.entry_id, dataclasses.replace(d.sample, sample=sample)))
        return out

    async def _collect(self, want: int) -> list[Delivery]:
        """Candidates for the next step: held-back samples first, then the stream.

        Sync mode takes what the rollout phase published. Async mode waits until ``want``
        admissible samples are there, dropping samples that became too stale on the way
        (they free their in-flight slots, so rollout is never blocked by them).
        """
        got, self.waiting = self._clamp_versions(self.waiting), []
        while True:
            fresh = self.stream.read(CONSUMER, count=max(1, want - len(got)), block_ms=20)
            got.extend(self._clamp_versions(fresh))
            fresh_enough = [d for d in got if self.scheduler.admit(d.sample, self.version)]
            if len(fresh_enough) >= want or (self.cfg.scheduler.mode == "sync" and not fresh):
                return got
            stale = [d for d in got if d not in fresh_enough]
            if stale:
                dropped = self.scheduler.select_batch(
                    [d.sample for d in stale], self.version, max_samples=0
                )
                assert len(dropped.dropped_stale) == len(stale)
                self.undropped.extend(stale)
                got = fresh_enough
            await asyncio.sleep(0.02)

    async def sync_weights(self) -> None:
        """Export the trainer's weights and load them on every rollout server."""
        t0 = time.perf_counter()
        target = self.paths.weights / f"v{self.version:08d}"
        generation = self.rollout_generation
        if self.cfg.rollout.weight_sync == "tensor":
            # Same host: the servers map the trainer's tensors (shared memory on CPU, CUDA IPC
            # on GPU) instead of reading a checkpoint from disk.
            payload = await self.trainer.serialized_weights.remote()
            request: Any = UpdateWeightsFromTensor(
                serialized_named_tensors=(payload,), weight_version=str(self.version)
            )
        else:
            path = await self.trainer.export_weights.remote(str(target), self.version)
            request = UpdateWeightsFromDisk(model_path=str(path), weight_version=str(self.version))
        try:
            result = await self.rollout.router.update_weights(request)
        except EngineError as e:
            await self.heal_rollout(generation)  # replaced servers are synced by heal_rollout
            if self.rollout_generation == generation:
                raise RunError(f"weight sync to the rollout servers failed: {e}") from e
            return
        if not result.success:
            raise RunError(f"rollout servers refused weights v{self.version}: {result.message}")
        self.served_version = self.version
        for old in sorted(self.paths.weights.glob("v*"))[:-2]:  # keep the last two versions
            shutil.rmtree(old, ignore_errors=True)
        self.phase_s["sync"] += time.perf_counter() - t0

    async def checkpoint(self) -> Path:
        """Driver state first, then the trainer's checkpoint (its marker commits both), then
        acknowledge the samples the checkpoint accounts for."""
        t0 = time.perf_counter()
        target = _ckpt_dir(self.paths.checkpoints, self.step)
        target.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "version": self.version,
            "scheduler": self.scheduler.state_dict(),
            "commit": _ids(self.uncommitted),
            "drop": _ids(self.undropped),
        }
        staging = self.paths.checkpoints / f".driver-{self.step:08d}.json"
        _write_json_atomic(staging, state)
        await self.trainer.save.remote(str(target))
        shutil.move(staging, target / DRIVER_STATE)
        self.stream.commit(self.uncommitted)
        self.stream.discard_ids(
            **{"entry_ids": state["drop"]["entries"], "sample_ids": state["drop"]["samples"]}
        )
        self.uncommitted, self.undropped = [], []
        for old in _committed(self.paths.checkpoints)[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        self.phase_s["checkpoint"] += time.perf_counter() - t0
        return target

    # ------------------------------------------------------------------ evaluation
    async def evaluate(self) -> dict[str, float]:
        """Held-out accuracy per domain: greedy responses scored by the sources' rewards."""
        prompts = self.scheduler.eval_prompts()
        if not prompts:
            return {}
        if self.served_version != self.version:
            await self.sync_weights()
        agentic = [p for p in prompts if "agentic" in p.metadata]
        prompts = [p for p in prompts if "agentic" not in p.metadata] + agentic
        outs = await asyncio.gather(
            *(self._eval_generate(p) for p in prompts[: len(prompts) - len(agentic)])
        )
        samples = [
            self._to_sample(p, f"{p.prompt_id}/eval", o, self.version)
            for p, o in zip(prompts, outs)
        ]
        rewards = await asyncio.get_running_loop().run_in_executor(
            None, self.rewards.score, samples
        )
        if agentic:  # trajectories at the rollout temperature, scored by their environment
            assert self.agents is not None
            runs = await asyncio.gather(
                *(self.agents.run(p, f"{p.prompt_id}/eval", version=self.version) for p in agentic)
            )
            rewards = [*rewards, *(float(s.reward or 0.0) for s in runs)]
        per: dict[str, list[float]] = defaultdict(list)
        for p, r in zip(prompts, rewards):
            per[p.domain].append(float(r >= 1.0 - 1e-6))
        return {f"eval/accuracy/{d}": float(np.mean(v)) for d, v in sorted(per.items())}

    async def _eval_generate(self, prompt: Prompt, attempts: int = 4) -> GenerateOutput:
        """One greedy eval request; a failed call heals the servers and is retried (as
        rollout requeues a failed group), so a dropped connection does not end the run."""
        for attempt in range(1, attempts + 1):
            generation = self.rollout_generation
            try:
                return await self.rollout.router.generate(
                    self._request(prompt, f"{prompt.prompt_id}/eval", greedy=True)
                )
            except EngineError as e:
                if attempt == attempts:
                    raise RunError(
                        f"evaluation request {prompt.prompt_id} failed {attempts} times: {e}"
                    ) from e
                log.warning("eval of %s failed (%s); retrying", prompt.prompt_id, e)
                await self.heal_rollout(generation)
                # 2, 4, 8 s: past the pool's cool-down of a server that failed (5 s).
                await asyncio.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the loop
    async def run_loop(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = cfg.trainer.steps
        last: dict[str, float] = {}
        if self.step == 0:
            evals = await self.evaluate()
            if evals:
                self.tracker.log_metrics(evals, step=0)
                last |= evals
        self.producer: asyncio.Task | None = None
        with tqdm(
            total=total, initial=self.step, desc=cfg.run.name, unit="step", dynamic_ncols=True
        ) as bar:
            while self.step < total and not self.stop_requested:
                t_step = time.perf_counter()
                self.phase_s.clear()
                self.rollout_stats.clear()
                try:
                    metrics = await self._one_step()
                except _TrainerDied as e:
                    log.warning("the trainer died (%s): restarting it from the last checkpoint", e)
                    await self._restart_trainer()
                    bar.n = self.step
                    bar.refresh()
                    continue
                metrics |= self._step_metrics(time.perf_counter() - t_step)
                every = cfg.run.eval_every
                if self.step == total or (every > 0 and self.step % every == 0):
                    metrics |= await self.evaluate()
                self.tracker.log_metrics(metrics, step=self.step)
                last = metrics
                bar.update(1)
                bar.write(_summary_line(self.step, metrics))
        await self._stop_producer()
        if self.step >= total and "eval/accuracy" not in " ".join(last):
            # Resumed at the last step (a crash after its checkpoint): evaluate the end now.
            evals = await self.evaluate()
            if evals:
                self.tracker.log_metrics(evals, step=self.step)
                last |= evals
        if self.stop_requested and self.step % cfg.trainer.checkpoint_every != 0:
            await self.checkpoint()
        if self.step >= total:
            await self.finish()
        return last

    async def finish(self) -> Path:
        """Write the trained model to run.output_dir/model (HF layout) and, if configured,
        register it in the MLflow model registry."""
        model_dir = self.paths.root / "model"
        await self.trainer.export_weights.remote(str(model_dir), self.version)
        name = self.cfg.tracking.register_model
        if name:
            uri = self.tracker.register_model(model_dir, name)
            if uri:
                (self.paths.root / "registered_model.txt").write_text(uri + "\n")
                log.info("registered %s as %s", model_dir, uri)
        return model_dir

    async def _one_step(self) -> dict[str, float]:
        """Rollout (sync) or wait for samples (async), train, checkpoint, sync weights."""
        import ray.exceptions

        cfg = self.cfg
        if cfg.scheduler.mode == "sync":
            await self.rollout_until(cfg.scheduler.prompts_per_step)
        else:
            if self.producer is None or self.producer.done():
                if self.producer is not None:
                    self.producer.result()  # surface a crash of the background rollout
                self.producer = asyncio.create_task(self.rollout_until(10**12))
        try:
            metrics = await self.train_step()
            if self.step % cfg.trainer.checkpoint_every == 0 or self.step == cfg.trainer.steps:
                await self.checkpoint()
            if cfg.scheduler.mode == "async" and not cfg.scheduler.partial_rollout:
                # Every request in flight now started under the old weights: abort them; their
                # groups are handed out again (run_group requeues aborted groups).
                await self.rollout.router.abort_all()
            if cfg.algorithm.loss != "sft":
                await self.sync_weights()
            # SFT samples nothing between evaluations: ``evaluate`` syncs when it needs to.
        except ray.exceptions.RayActorError as e:
            raise _TrainerDied(str(e).splitlines()[0]) from e
        self.scheduler.on_weight_update(self.version)
        return metrics

    async def _stop_producer(self) -> None:
        producer, self.producer = getattr(self, "producer", None), None
        if producer is not None:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            with contextlib.suppress(Exception):
                await self.rollout.router.abort_all()

    async def _restart_trainer(self) -> None:
        """A trainer process that died loses the steps since the last checkpoint: start a new
        one and continue from that checkpoint (the same path as --resume)."""
        import ray

        await self._stop_producer()
        with contextlib.suppress(Exception):
            ray.kill(self.trainer)
        self.trainer = self._start_trainer()
        self.write_processes()
        self.resume = True
        if _latest(self.paths.checkpoints) is None:
            raise RunError("the trainer died before the first checkpoint; nothing to resume from")
        await self.recover()

    def _step_metrics(self, step_s: float) -> dict[str, float]:
        out: dict[str, float] = {f"time/{k}_s": v for k, v in self.phase_s.items()}
        out["time/step_s"] = step_s
        for key, values in self.rollout_stats.items():
            if values:
                out[f"rollout/{key}"] = float(np.mean(values))
        tokens = sum(
            sum(v) for k, v in self.rollout_stats.items() if k.startswith("response_length/")
        )
        out["throughput/rollout_tokens_per_s"] = tokens / step_s if step_s > 0 else 0.0
        for k, v in self.stream.depth().items():
            out[f"queue/{k}"] = float(v)
        out |= self.scheduler.metrics()
        out |= {f"reward_worker/{k}": float(v) for k, v in self.rewards.metrics().items()}
        if self.agents is not None:
            out |= self.agents.metrics()
        out["version"] = float(self.version)
        return out

    async def aclose_services(self) -> None:
        await self._stop_producer()
        services = [getattr(self, "rollout", None), *getattr(self, "teacher_services", {}).values()]
        for service in services:
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.aclose()
        for scorer in getattr(self, "teachers", {}).values():
            with contextlib.suppress(Exception):
                await scorer.aclose()

    def close(self, status: str) -> None:
        self.tracker.end(status)
        self.stack.close()

    async def main(self) -> dict[str, float]:
        self.main_started = True
        try:
            await self.recover()
            return await self.run_loop()
        finally:
            await self.aclose_services()


def train(cfg: RunConfig, *, resume: bool = False) -> dict[str, float]:
    """Run ``cfg`` to the end (or until SIGINT, which checkpoints first); returns the last
    step's metrics."""
    driver = Driver(cfg, resume=resume)
    status = "FAILED"
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if driver.stop_requested:  # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        log.warning(
            "SIGINT: finishing this step, checkpointing and stopping (Ctrl-C again to abort)"
        )
        driver.stop_requested = True

    signal.signal(signal.SIGINT, on_sigint)
    try:
        driver.setup()
        metrics = asyncio.run(driver.main())
        status = "KILLED" if driver.stop_requested else "FINISHED"
        return metrics
    finally:
        signal.signal(signal.SIGINT, previous)
        if not driver.main_started:  # set-up failed half-way: stop what it started
            asyncio.run(driver.aclose_services())
        driver.close(status)


# ---------------------------------------------------------------------- helpers
def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _latest(root: Path) -> Path | None:
    from trainer.checkpoint import latest_checkpoint

    return latest_checkpoint(root) if root.exists() else None


def _committed(root: Path) -> list[Path]:
    from trainer.checkpoint import list_checkpoints

    return list_checkpoints(root)


def _ids(deliveries: Iterable[Delivery]) -> dict[str, list[str]]:
    deliveries = list(deliveries)
    return {
        "entries": [d.entry_id for d in deliveries],
        "samples": [d.sample.sample.sample_id for d in deliveries],
    }


def _truncate_log(path: Path, step: int) -> None:
    """Drop the audit lines of steps after ``step`` (they were not in a committed checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _summary_line(step: int, m: dict[str, float]) -> str:
    keys = [
        ("loss", "loss"),
        ("grad_norm", "gnorm"),
        ("teacher_log_ratio", "tlr"),
        ("masked_fraction", "masked"),
        ("time/step_s", "s"),
    ]
    parts = [f"step {step}"]
    parts += [f"{short}={m[k]:.4g}" for k, short in keys if k in m]
    parts += [
        f"{k.split('/', 1)[1]}={v:.3f}"
        for k, v in sorted(m.items())
        if k.startswith("rollout/reward/")
    ]
    parts += [
        f"acc/{k.rsplit('/', 1)[1]}={v:.3f}"
        for k, v in sorted(m.items())
        if k.startswith("eval/accuracy/")
    ]
    return "  ".join(parts)


def trained_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The run's audit log: one record per committed step (step, the version it trained,
    its sample ids and the oldest token version of each)."""
    path = Path(output_dir) / TRAINED_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def trained_sample_ids(output_dir: str | Path) -> list[str]:
    """Every sample id trained by committed steps, in order."""
    return [sid for record in trained_log(output_dir) for sid in record["samples"]]


__all__ = ["Driver", "RunError", "RunPaths", "train", "trained_log", "trained_sample_ids"]
