"""The run's services: everything that is started before the loop and stopped after it.

``Services.start`` brings up, in this order: tracking (MLflow, or nothing), the Redis queue
(embedded unless ``scheduler.redis_url``; the embedded one is restarted on its append-only file
if it dies, an external one that goes away ends the run with ``RedisUnavailable``), Ray (a
local one bound to ``cluster.bind_host``), the models (paths or MLflow registry URIs),
the reward worker, the trainer actor, the rollout servers, the agentic Toolbox and Tool
Manager (when a source is agentic) and the teacher servers with their scorers. Everything it
starts is stopped by ``aclose`` (async servers and clients) and ``close`` (the rest, in
reverse order). ``logs/processes.json`` names the pid of every process, by role.

Consumes: the run config. Produces: handles the producer, the evaluator, the weight sync and
the loop use; it never drives the run itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from mopd.config import RunConfig, save_resolved
from mopd.config.schema import RolloutConfig, TeacherConfig
from mopd.io import write_json_atomic
from mopd.models.moe import MoELayout, moe_layout
from mopd.scheduler.redis_server import EmbeddedRedis, connect, redacted
from mopd.scheduler.stream import TrainingStream
from mopd.tracking import (
    MLflowTracker,
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten,
    resolve_model,
)

from .errors import RedisUnavailable, RunError
from .state import RunPaths

if TYPE_CHECKING:  # the rollout package is imported when the servers start
    from rollout.build import RolloutService

__all__ = ["Services", "teacher_rollout_config"]

log = logging.getLogger("mopd.run")

# On a CPU machine every server and the trainer share few cores: one thread each avoids
# oversubscription that makes everyone slower. Decoding a tiny batch gains nothing from more.
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def teacher_rollout_config(base: RolloutConfig, teacher: TeacherConfig) -> RolloutConfig:
    """A teacher's servers: same host and batching as rollout, its own backend and args."""
    return dataclasses.replace(
        base,
        backend=teacher.backend,
        num_servers=teacher.num_servers,
        return_routed_experts=False,
        request_timeout_s=teacher.timeout_s,
        server_args=dict(teacher.server_args),
    )


class Services:
    """The started services of one run. Use ``Services(cfg, paths).start(...)``."""

    def __init__(self, cfg: RunConfig, paths: RunPaths) -> None:
        self.cfg, self.paths = cfg, paths
        self.stack = contextlib.ExitStack()
        self.tracker: Tracker = NullTracker()
        self.embedded_redis: EmbeddedRedis | None = None
        self.rollout: RolloutService | None = None
        self.teacher_services: dict[str, RolloutService] = {}
        self.teachers: dict[str, Any] = {}  # teacher name -> TeacherScorer
        self.agents: Any = None  # the ToolManager when a data source is agentic
        self.layout: MoELayout | None = None
        self._processes: dict[str, Any] = {}  # the last logs/processes.json
        self._processes_lock = threading.Lock()

    # ------------------------------------------------------------------ start-up
    def start_tracking(self, parent_run_id: str | None) -> None:
        """The MLflow run (nested under ``parent_run_id`` when given) with the resolved config."""
        cfg, paths = self.cfg, self.paths
        save_resolved(cfg, paths.root)
        t = cfg.tracking
        if t.enabled:
            self.tracker = MLflowTracker(
                self.tracking_uri,
                t.experiment,
                cfg.run.name,
                artifact_location=paths.root / "mlartifacts",
                parent_run_id=parent_run_id,
            )
        self.tracker.log_params(flatten(json.loads(json.dumps(dataclasses.asdict(cfg)))))
        self.tracker.log_artifact(paths.root / "resolved_config.yaml")

    def start_queue(self) -> TrainingStream:
        """The Redis training stream (an embedded Redis in the run folder by default)."""
        redis_url = self.cfg.scheduler.redis_url
        if redis_url is None:
            self.embedded_redis = self.stack.enter_context(
                EmbeddedRedis(self.paths.redis, on_restart=self._redis_restarted)
            )
            self.redis = self.embedded_redis.client()
        else:
            self.redis = connect(redis_url, self.cfg.scheduler.redis_password_env)
        try:
            stream = TrainingStream(self.redis, self.cfg.run.name)
        except redis.ConnectionError as e:  # an authentication error included
            raise RunError(
                f"scheduler.redis_url: cannot use the Redis at {self.redis_name}: {e}; check "
                "that it runs, the URL, and the password in "
                f"${self.cfg.scheduler.redis_password_env}"
            ) from None
        if redis_url is not None:
            _warn_if_not_durable(self.redis, self.redis_name)
        return stream

    @property
    def redis_name(self) -> str:
        """The training stream's Redis, for messages (never its password)."""
        if self.embedded_redis is not None:
            return f"the embedded Redis ({self.embedded_redis.url}, pid {self.embedded_redis.pid})"
        return redacted(self.cfg.scheduler.redis_url or "")

    def redis_lost(self, error: Exception) -> RedisUnavailable:
        """The error that ends a run whose Redis went away (the embedded one: after its
        restart failed): what it was, that nothing acknowledged is lost, how to go on."""
        embedded = self.embedded_redis
        if embedded is not None:
            what = (
                f"{self.redis_name} died and could not be restarted "
                f"({embedded.failure or error}; its log: {self.paths.redis / 'redis.log'})"
            )
        else:
            what = f"lost the connection to the Redis at {self.redis_name} ({error})"
        return RedisUnavailable(
            f"the training stream {what}. Nothing acknowledged was lost: a sample is "
            "acknowledged only once a committed checkpoint holds the step that trained it, "
            "and every other one is delivered again. Once the Redis is back, continue the run "
            f"with `mopd train <config> --resume` (run.output_dir {self.paths.root})."
        )

    def _redis_restarted(self, pid: int) -> None:
        log.warning("the embedded Redis was restarted (pid %d); the run goes on", pid)
        with self._processes_lock:
            if self._processes:
                self._processes["redis"] = pid
                write_json_atomic(self.paths.logs / "processes.json", self._processes)

    def check_cluster(self) -> None:
        """Refuse, before any service starts, a Ray address this driver cannot join: a
        dashboard URL is for `mopd submit`, whose job then finds the cluster in
        $RAY_ADDRESS."""
        c = self.cfg.cluster
        if (
            c.address is not None
            and c.address.startswith(("http://", "https://"))
            and "RAY_ADDRESS" not in os.environ
        ):
            raise RunError(
                f"cluster.address={c.address!r} is a dashboard URL, which `mopd submit` uses; "
                "to run the driver here against that cluster, set it to the GCS address "
                "(host:6379) or 'auto'"
            )

    def start_ray(self) -> None:
        import ray

        c = self.cfg.cluster
        if ray.is_initialized():
            return
        self.check_cluster()
        if c.address is None and "RAY_ADDRESS" not in os.environ:
            with _ray_node_ip(c.bind_host):
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
        else:
            ray.init(address=c.address)
        self.stack.callback(ray.shutdown)

    def resolve_models(self) -> None:
        """Local folders of the student and teachers (MLflow URIs are downloaded), the MoE
        layout of the student, and the check that every teacher shares its tokenizer."""
        from teachers.tokenizer import TokenizerMismatchError, check_tokenizer_compatible

        cfg, uri = self.cfg, self.tracking_uri
        self.student_path = resolve_model(cfg.model.path, uri, self.paths.models)
        self.layout = moe_layout(self.student_path)
        self.teacher_paths = {
            t.name: resolve_model(t.model, uri, self.paths.models) for t in cfg.teachers
        }
        self.tokenizer_path = cfg.model.tokenizer_path or str(self.student_path)
        for name, path in self.teacher_paths.items():
            try:
                check_tokenizer_compatible(self.tokenizer_path, str(path), teacher_name=name)
            except TokenizerMismatchError as e:
                raise RunError(str(e)) from None
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)

    def start_roles(self) -> None:
        """Rewards, trainer, rollout servers, agents and teachers (``processes.json`` last)."""
        self.rewards = self._start_rewards()
        self.trainer = self.start_trainer()
        self.rollout = self.start_rollout()
        self.agents = self._start_agents()
        self._start_teachers()
        self.teacher_of = {d: t.name for t in self.cfg.teachers for d in t.domains}
        self.write_processes()

    @property
    def records_routes(self) -> bool:
        """Generate requests ask for routed experts (R3): configured and the student is MoE."""
        return bool(self.cfg.rollout.return_routed_experts and self.layout)

    @property
    def tracking_uri(self) -> str:
        return self.cfg.tracking.tracking_uri or default_tracking_uri(self.paths.root)

    def _start_servers(self, rcfg: RolloutConfig, model: Path, threads: int = 1) -> RolloutService:
        from rollout.build import build_rollout_backend

        n = rcfg.num_servers
        env = {k: str(threads) for k in _THREAD_ENV}
        overrides = [{"random_seed": self.cfg.run.seed + i, "env": dict(env)} for i in range(n)]
        return build_rollout_backend(
            rcfg,
            str(model),
            use_ray=True,
            ray_options={"num_cpus": 0, "max_restarts": 0},
            spec_overrides=overrides,
        )

    def start_rollout(self) -> RolloutService:
        """New rollout servers for the student (at start-up, and to replace dead ones)."""
        return self._start_servers(self.cfg.rollout, self.student_path)

    def _start_teachers(self) -> None:
        from teachers.scorer import TeacherScorer

        for t in self.cfg.teachers:
            rcfg = teacher_rollout_config(self.cfg.rollout, t)
            service = self._start_servers(
                rcfg, self.teacher_paths[t.name], self._teacher_threads(t)
            )
            self.teacher_services[t.name] = service
            self.teachers[t.name] = TeacherScorer.from_config(t, service.router.urls)

    def _teacher_threads(self, teacher: TeacherConfig) -> int:
        """CPU threads of each of a teacher's servers. A synchronous step scores while the
        rollout servers and the trainer wait, so a teacher's prefill (one large forward) gets
        the machine's CPUs shared over its servers; otherwise (async mode, or a GPU machine
        where the threads only feed the GPU) one thread, as every other server."""
        if self.cfg.scheduler.mode != "sync" or _has_gpu():
            return 1
        cpus = self.cfg.cluster.num_cpus or os.cpu_count() or 1
        return max(1, cpus // max(1, teacher.num_servers))

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
        from envs.agentic import ENVIRONMENTS, build_env
        from envs.tool_manager import ToolManager

        a = self.cfg.agent
        toolbox = self._start_toolbox()
        tasks_dir = Path(a.tasks_dir) if a.tasks_dir else None
        envs = {n: build_env(n, tasks_dir / n if tasks_dir else None) for n in ENVIRONMENTS}
        layout = self.layout if self.cfg.rollout.return_routed_experts else None
        return ToolManager(
            self.rollout.router, toolbox, self.tokenizer, self._tool_manager_config(),
            layout=layout, envs=envs,
        )  # fmt: skip

    def _start_toolbox(self):
        import ray

        from envs.sandbox import SandboxLimits
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
        self.stack.callback(_stop_toolbox, toolbox)
        return toolbox

    def _tool_manager_config(self):
        from envs.tool_manager import ToolManagerConfig

        a, s = self.cfg.agent, self.cfg.rollout.sampling
        return ToolManagerConfig(
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

    def start_trainer(self):
        """A new trainer actor (at start-up, and to replace one that died)."""
        import ray

        from trainer.actor import TrainerActor

        cfg = self.cfg
        model_cfg = dataclasses.replace(cfg.model, path=str(self.student_path))
        gpus = 1 if cfg.trainer.backend == "torch" and _has_gpu() else 0
        actor = ray.remote(num_cpus=0, num_gpus=gpus, max_restarts=0)(TrainerActor).options(
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.cluster.num_cpus or 1)}}
        )
        return actor.remote(cfg.trainer, model_cfg, cfg.algorithm, seed=cfg.run.seed)

    # ------------------------------------------------------------------ replacing parts
    async def replace_rollout(self) -> None:
        """Stop the rollout servers (whatever state they are in) and start new ones."""
        with contextlib.suppress(Exception):
            await self.rollout.aclose()
        self.rollout = self.start_rollout()

    def replace_trainer(self) -> None:
        """Kill the trainer actor (if anything is left of it) and start a new one."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.trainer)
        self.trainer = self.start_trainer()
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
        }
        with self._processes_lock:  # the Redis pid changes when it is restarted
            state["redis"] = self.embedded_redis.pid if self.embedded_redis else None
            self._processes = state
            write_json_atomic(self.paths.logs / "processes.json", state)

    # ------------------------------------------------------------------ shutdown
    async def aclose(self) -> None:
        """Stop the rollout and teacher servers and close the scorers' clients."""
        for service in [self.rollout, *self.teacher_services.values()]:
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.aclose()
        for scorer in self.teachers.values():
            with contextlib.suppress(Exception):
                await scorer.aclose()

    def close(self, status: str) -> None:
        """End the tracking run with ``status`` and stop the rest (Ray, Redis, rewards)."""
        self.tracker.end(status)
        self.stack.close()


_RAY_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _ray_node_ip(bind_host: str) -> Iterator[None]:
    """Around ``ray.init`` of a local Ray: make ``_node_ip_address`` a loopback address stick.

    Ray turns a loopback ``_node_ip_address`` into the machine's external address unless
    multi-node clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is
    imported); with the node on 127.0.0.1 its GCS, raylet, object manager, agents and workers
    listen on loopback only and advertise it. The variable is set for the processes Ray
    starts and, when Ray was imported before, its module constant for this call; both are
    restored afterwards. A non-loopback ``bind_host`` is passed through unchanged.
    """
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    env, constant = os.environ.get(_RAY_CLUSTERS_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTERS_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = constant
        if env is None:
            os.environ.pop(_RAY_CLUSTERS_ENV, None)
        else:
            os.environ[_RAY_CLUSTERS_ENV] = env


def _warn_if_not_durable(client: redis.Redis, name: str) -> None:
    """A warning when an external Redis can lose writes it acknowledged (then a kill -9 of it
    can lose published samples and commits); silent when CONFIG is not allowed."""
    try:
        aof = client.config_get("appendonly").get("appendonly")
        fsync = client.config_get("appendfsync").get("appendfsync")
    except redis.RedisError:
        return
    if aof != "yes" or fsync != "always":
        log.warning(
            "the Redis at %s runs with appendonly=%s appendfsync=%s: a crash of it can lose "
            "samples it acknowledged; set appendonly yes and appendfsync always",
            name,
            aof,
            fsync,
        )


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _stop_toolbox(toolbox: Any) -> None:
    """Close the Toolbox's sandboxes (their files and uids; it bounds each close), then end
    the actor: killed without it, the actor would leave every sandbox's directory behind."""
    import ray

    try:
        ray.get(toolbox.close.remote(), timeout=120)
    except Exception as e:  # the run is ending: say so, and kill it anyway
        log.warning("the Toolbox did not close its sandboxes: %s: %s", type(e).__name__, e)
    ray.kill(toolbox)
