"""Structured configuration of a run: one dataclass per component, read by OmegaConf.

A run's YAML file is merged onto these dataclasses, so an unknown key or a value of the
wrong type is rejected by OmegaConf before anything starts; the checks that span
fields (a MOPD domain with no teacher, eps_low >= eps_high, ...) live in
``mopd.config.validate``. Each component receives its own slice (``cfg.trainer``,
``cfg.rollout``, ...), never the whole run config.

Every field carries a docstring (the string literal under it); ``mopd config-docs``
prints them. Fields without a default (``MISSING``) are required.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# Accepted values for the options that select a component. The algorithm options
# (loss, advantage, aggregation, ...) come from ``mopd.algo.registry``.
ROLLOUT_BACKENDS = ("embedded", "sglang")
TEACHER_BACKENDS = ("embedded", "sglang")
TRAINER_BACKENDS = ("torch", "megatron")
WEIGHT_SYNC_MODES = ("disk", "tensor", "distributed")
SOURCE_KINDS = ("generator", "jsonl", "parquet")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
SCHEDULING_MODES = ("sync", "async")


@dataclass
class RunSection:
    """Identity and output location of the run."""

    name: str = "mopd-run"
    """Run name: used for the output folder, the MLflow run name and Redis key namespace."""
    seed: int = 0
    """Global seed for data order, sampling and model initialisation."""
    output_dir: str = "runs/${run.name}"
    """Folder for checkpoints, exported weights, logs and the resolved config."""
    eval_every: int = 0
    """Evaluate held-out accuracy every this many steps; 0: only at the start and the end."""


@dataclass
class ModelConfig:
    """The student policy."""

    path: str = MISSING
    """Local Hugging Face checkpoint folder, or an MLflow model URI (``models:/name/version``)."""
    tokenizer_path: str | None = None
    """Tokenizer folder; defaults to ``path``. Teachers must share this tokenizer."""
    dtype: str = "auto"
    """Training and serving precision: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the checkpoint (off by default: it runs arbitrary code)."""


@dataclass
class SamplingConfig:
    """Default sampling parameters of rollout requests (SGLang's ``sampling_params``)."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per response (a data source may lower it)."""
    temperature: float = 1.0
    """Sampling temperature; on-policy RL and MOPD normally sample at 1.0."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the response ends at the first match."""


@dataclass
class RolloutConfig:
    """Rollout servers that sample the student on-policy."""

    backend: str = "embedded"
    """embedded (the project's own engine server, any machine) or sglang (GPU clusters)."""
    num_servers: int = 1
    """Number of rollout servers, one Ray actor each."""
    host: str = "127.0.0.1"
    """Interface the servers bind to: loopback for local runs, the cluster interface otherwise."""
    max_running_requests: int = 64
    """Requests decoded together by one server (continuous-batching width)."""
    context_length: int | None = None
    """Maximum prompt + response length; defaults to the model's own."""
    return_routed_experts: bool = True
    """Record the experts each MoE layer chose for every token (needed for R3)."""
    weight_sync: str = "disk"
    """How new weights reach the servers: disk (safetensors), tensor (same host) or distributed (NCCL)."""
    request_timeout_s: float = 600.0
    """Time limit for one generate request before it is retried on another server."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default sampling parameters."""
    server_args: dict[str, Any] = field(default_factory=dict)
    """Extra launch arguments passed through to the server (e.g. tp_size, ep_size, mem_fraction_static)."""


@dataclass
class TeacherConfig:
    """One domain teacher: a model served for prefill-only scoring of student tokens."""

    name: str = MISSING
    """Unique teacher name (used in metrics and the MLflow model registry)."""
    model: str = MISSING
    """Local checkpoint folder or MLflow model URI (``models:/math-teacher/3``)."""
    domains: list[str] = MISSING
    """Domains this teacher scores; every MOPD data-source domain needs exactly one teacher."""
    backend: str = "embedded"
    """Serving backend: embedded or sglang."""
    num_servers: int = 1
    """Scoring servers for this teacher."""
    timeout_s: float = 120.0
    """Time limit for one scoring request; a teacher down past its retries fails the run."""
    max_retries: int = 3
    """Retries with exponential back-off before the teacher is declared down."""
    top_logprobs: int = 0
    """Top-k log-probs per position returned by the teacher (needed by algorithm.teacher_kl=topk)."""
    server_args: dict[str, Any] = field(default_factory=dict)
    """Extra launch arguments passed through to the teacher's server."""


@dataclass
class DataSourceConfig:
    """One source of prompts, with its own domain, quota and limits."""

    name: str = MISSING
    """Unique source name (metrics are reported per source and per domain)."""
    domain: str = MISSING
    """Domain of every prompt of this source; selects the MOPD teacher."""
    kind: str = "generator"
    """generator (a procedural task family), jsonl or parquet (a file of prompts)."""
    path: str | None = None
    """File path, required for jsonl and parquet sources."""
    generator: str | None = None
    """Task family for generator sources (a reasoning-gym dataset name such as chain_sum)."""
    generator_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the generator (difficulty, sizes, ...)."""
    reward: str = "exact_match"
    """Reward function from envs/ that scores a response of this source."""
    weight: float = 1.0
    """Share of prompts drawn from this source, relative to the other sources."""
    priority: int = 0
    """Higher-priority sources are served first when several have work ready."""
    group_size: int = 8
    """Samples per prompt (G); group-normalised advantages are computed over them."""
    temperature: float | None = None
    """Sampling temperature for this source; defaults to rollout.sampling.temperature."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this are skipped (and counted)."""
    max_response_tokens: int | None = None
    """Response limit for this source; defaults to rollout.sampling.max_new_tokens."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (no learning signal) and draw replacements.
    RL only: in MOPD the teacher term gives every token a signal, so no group is dropped."""
    num_eval_prompts: int = 0
    """Held-out prompts of this source used for evaluation (0: no evaluation)."""


@dataclass
class DataConfig:
    """Prompt sources of the run."""

    sources: list[DataSourceConfig] = field(default_factory=list)
    """The data sources; at least one is required."""


@dataclass
class AlgorithmConfig:
    """The loss and its knobs (shared/docs/algorithms.md is the contract)."""

    loss: str = "mopd"
    """sft (stage 1), rl (stage 2, domain-teacher RL) or mopd (stage 3)."""
    alpha: float = 1.0
    """Weight of the outcome-reward (ORM) advantage next to the teacher term (eq. 9)."""
    eps_low: float = 0.5
    """Lower bound of the train/rollout importance ratio; tokens outside [eps_low, eps_high] are masked."""
    eps_high: float = 2.0
    """Upper bound of the train/rollout importance ratio."""
    aggregation: str = "seq_mean_token_mean"
    """seq_mean_token_mean (eq. 7: mean over tokens, then over samples) or token_mean."""
    student_logprob_source: str = "train"
    """Student log-prob inside the teacher advantage: train (eq. 8) or rollout."""
    teacher_kl: str = "sampled"
    """Teacher term on the sampled token (sampled, as the report) or reverse KL over the teacher's top-k (topk)."""
    advantage: str = "grpo"
    """ORM advantage estimator: grpo, drgrpo (no std division) or rloo (leave-one-out)."""
    advantage_eps: float = 1e-6
    """Added to the group std in grpo advantages."""
    is_correction: str = "mask"
    """Token importance correction for rl: mask (as MOPD), truncate, or ppo_clip."""
    clip_low: float = 0.2
    """PPO lower clip range (ppo_clip only)."""
    clip_high: float = 0.28
    """PPO upper clip range (ppo_clip only)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy (rl only); 0 disables it."""
    kl_estimator: str = "k3"
    """KL estimator for the penalty: k1, k2 or k3."""


@dataclass
class SchedulerConfig:
    """The fine-grained, Redis-backed data scheduler."""

    redis_url: str | None = None
    """External Redis (redis://host:port/db or rediss:// for TLS); unset starts an embedded Redis."""
    redis_password_env: str = "MOPD_REDIS_PASSWORD"
    """Environment variable that holds the Redis password (secrets never go in config files)."""
    mode: str = "sync"
    """sync (on-policy: rollout waits for each weight update) or async (bounded by max_staleness)."""
    prompts_per_step: int = 16
    """Prompt groups that make up one optimizer step."""
    max_staleness: int = 0
    """Largest allowed gap between the trainer's version and a sample's oldest token version."""
    partial_rollout: bool = False
    """Keep responses still generating at a weight update and continue them under the new version."""
    max_partial_fraction: float = 0.5
    """Cap on the share of partial (multi-version) samples in one batch."""
    max_inflight_groups: int = 64
    """Prompt groups handed out to rollout servers and not yet consumed by the trainer."""


@dataclass
class TrainerConfig:
    """The trainer backend and optimisation."""

    backend: str = "torch"
    """torch (PyTorch on a transformers model; CPU or GPU) or megatron (Megatron-core)."""
    steps: int = 100
    """Optimizer steps to run."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    min_lr: float = 0.0
    """Learning rate at the end of a decaying schedule."""
    lr_schedule: str = "constant"
    """constant, linear or cosine decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    micro_batch_tokens: int = 8192
    """Tokens packed into one micro-batch (token-balanced across data-parallel ranks)."""
    routing_replay: bool = True
    """Rollout Routing Replay (R3): replay the experts the rollout engine chose."""
    dtype: str = "auto"
    """Training precision: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."""
    tensor_parallel: int = 1
    """Megatron tensor-parallel size."""
    expert_parallel: int = 1
    """Megatron expert-parallel size."""
    pipeline_parallel: int = 1
    """Megatron pipeline-parallel size."""
    data_parallel: int = 1
    """Data-parallel ranks (trainer processes = tp * pp * dp)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and at the end)."""


@dataclass
class TrackingConfig:
    """Experiment tracking in MLflow; tracker failures are warnings, never crashes."""

    enabled: bool = True
    """Log to MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI; unset uses a local sqlite store under run.output_dir."""
    experiment: str = "mopd"
    """MLflow experiment name."""
    log_every: int = 1
    """Log metrics every this many steps."""
    register_model: str | None = None
    """Register the trained model (run.output_dir/model) in the MLflow model registry under
    this name at the end of the run, e.g. a domain teacher that MOPD configs then name as
    ``models:/<name>/<version>``."""


@dataclass
class ClusterConfig:
    """Where the roles run."""

    address: str | None = None
    """Ray cluster address; unset starts a local Ray on this machine."""
    bind_host: str = "127.0.0.1"
    """Interface that services started by a local run bind to (loopback by default)."""
    num_cpus: int | None = None
    """CPUs for a local Ray; unset uses all."""
    num_gpus: int | None = None
    """GPUs for a local Ray; unset uses all that are visible."""
    colocate: bool = False
    """Colocate rollout and trainer on the same GPUs (release/resume memory around each phase)."""


@dataclass
class AgentConfig:
    """Agentic rollouts: the data sources with ``reward: agentic`` (envs/agentic tasks).

    Their prompts run as multi-turn trajectories (``envs.tool_manager.ToolManager``) with
    tools in sandboxes leased from one Toolbox actor; the environment sets each sample's
    reward when its trajectory ends.
    """

    pool_size: int = 8
    """Pre-warmed sandboxes (the most agentic samples in flight at once)."""
    max_turns: int = 8
    """Generated turns per trajectory at most."""
    max_response_tokens: int = 4096
    """Tokens after the prompt at most (generated and tool-output tokens together)."""
    max_tokens_per_turn: int = 1024
    """max_new_tokens of one turn."""
    turn_timeout_s: float = 300.0
    """Wall time of one generation turn; past it the trajectory ends with reward 0."""
    tool_timeout_s: float = 120.0
    """Wall time of one tool call; past it the model sees a timeout observation."""
    reward_timeout_s: float = 300.0
    """Wall time of the environment's reward (e.g. the task's tests); past it the reward is 0."""
    tool_max_concurrency: dict[str, int] = field(
        default_factory=lambda: {"bash": 8, "str_replace": 8, "check": 4}
    )
    """Calls of each tool running at once, across all rollouts (check: the reward command)."""
    tool_max_qps: dict[str, float] = field(default_factory=dict)
    """Call starts per second of each tool, across all rollouts (absent: no rate limit)."""
    sandbox_wall_seconds: float = 60.0
    """Wall-time limit of one command in a sandbox."""
    sandbox_cpu_seconds: float = 30.0
    """CPU-time limit of one command in a sandbox."""
    sandbox_memory_bytes: int = 1 << 30
    """Memory limit of one command in a sandbox."""
    tasks_dir: str | None = None
    """Folder with one sub-folder of tasks per environment (default: the shipped envs/tasks)."""


@dataclass
class RunConfig:
    """A whole run: what ``mopd train CONFIG`` reads."""

    run: RunSection = field(default_factory=RunSection)
    """Name, seed and output folder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student policy."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout servers."""
    teachers: list[TeacherConfig] = field(default_factory=list)
    """Domain teachers (MOPD); each domain of the data maps to exactly one."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Loss and its knobs."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The Redis-backed data scheduler."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Trainer backend and optimisation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster and placement."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """Agentic rollouts (sources with reward: agentic)."""
