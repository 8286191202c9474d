"""The embedded PyTorch trainer: any transformers causal LM, CPU or GPUs, with R3.

Step anatomy (``Trainer`` protocol, trainer/base.py)::

    forward_backward(micro_batches)     per micro-batch: packed forward -> per-token log-probs
                                        -> loss from mopd.algo's registry -> weighted backward
    optim_step()                        clip grad norm, AdamW step, LR schedule, version += 1

Packing. A MicroBatch is a flat row of whole sequences. It runs as one batch-of-one forward
with ``position_ids`` restarting at 0 for every sequence and no attention mask: transformers
(>= 5) then detects the packed layout from the position ids and builds a block-diagonal
causal mask (sliding-window layers included) for every attention implementation, eager
(MiMo-V2-Flash needs it for its sink logits) as well as sdpa/flash. No padding is computed.
Tests check the per-token log-probs against an unpacked per-sequence forward (1e-5).

Log-probs and loss. Position i of the row scores ``tokens_N[i]`` from the logits at i - 1
(``mopd.algo.selective_log_softmax``), computed only at loss positions. They are scattered
into a [B, T] layout (one row per sequence) and handed, with the micro-batch's rollout and
teacher log-probs and advantages, to the loss that ``AlgorithmConfig.loss`` selects in
``mopd.algo.registry.LOSSES``: the trainer adds no math of its own.

Gradient accumulation. Each micro-batch's loss is the configured aggregation over that
micro-batch only; it is weighted by (its count / the step's count), where the count is the
number of non-empty sequences (``seq_mean_token_mean``, eq. 7) or valid tokens
(``token_mean``) summed over all micro-batches of the step and all data-parallel ranks. The
accumulated gradient is then exactly the gradient of the aggregation over the whole step.

Precision. ``TrainerConfig.dtype``: ``auto`` is fp32 on CPU and bf16 on GPU. Parameters,
gradients and AdamW state stay fp32 (master weights); bf16 runs the forward/backward under
``torch.autocast`` on one device, or through FSDP2's ``MixedPrecisionPolicy`` (bf16 params in
compute, fp32 gradient reduction) on several.

Data parallel. When ``torch.distributed`` is initialised with more than one rank (e.g. under
``torchrun``), every decoder layer and then the root are wrapped with FSDP2 ``fully_shard``;
each rank calls ``forward_backward`` with its own micro-batches (``mopd.packing`` gives every
rank the same number), counts are all-reduced, and metrics are gathered to every rank.

R3. With routes in the micro-batch and ``routing_replay`` on, ``trainer.r3_hooks`` replays
them in every MoE layer (forward and any recompute); with it off, agreement is still measured.

Checkpoint (``save``/``load``), one committed directory (trainer.checkpoint protocol)::

    model.pt             full model state dict (fp32; gathered from FSDP shards on rank 0)
    optimizer.pt         full AdamW state, keyed by parameter name
    scheduler.pt         LR scheduler state
    rng_rank<R>.pt       torch / CUDA / numpy / python RNG states of rank R
    trainer_state.json   step, version, world size, source model
    COMMITTED            written last

Shape suffixes: N tokens of a packed micro-batch, B sequences, T positions of the longest
sequence, V vocabulary, M loss positions, L MoE layers, k experts per token.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mopd.algo import entropy_from_logits, kl_k1, selective_log_softmax, train_rollout_mismatch
from mopd.algo.registry import LOSSES, lookup
from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.types import MicroBatch
from trainer import checkpoint as ckpt
from trainer.export import export_hf_checkpoint, named_tensors_for_handoff, serialize_named_tensors
from trainer.optim import build_optimizer, build_scheduler
from trainer.r3_hooks import RoutingReplay

__all__ = ["TorchTrainer", "loss_count", "loss_kwargs", "resolve_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Loss metrics that are means over samples (the rest are means over valid tokens).
_SAMPLE_MEANS = frozenset({"orm_adv_mean"})
# Loss metrics that add up across micro-batches.
_SUMS = frozenset({"num_tokens", "num_samples"})


def resolve_dtype(name: str, device: torch.device, *, field: str = "trainer.dtype") -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r}; accepted values: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def loss_kwargs(cfg: AlgorithmConfig) -> dict[str, Any]:
    """Keyword arguments of the registry loss ``cfg.loss`` taken from the algorithm config."""
    lookup("algorithm.loss", LOSSES, cfg.loss)
    if cfg.loss == "sft":
        return {"aggregation": cfg.aggregation}
    if cfg.loss == "rl":
        if cfg.kl_coef > 0:
            raise ValueError(
                f"algorithm.kl_coef={cfg.kl_coef}: the KL penalty needs reference-policy "
                "log-probs, which micro-batches do not carry yet; set algorithm.kl_coef=0"
            )
        return {
            "is_correction": cfg.is_correction,
            "eps_low": cfg.eps_low,
            "eps_high": cfg.eps_high,
            "clip_low": cfg.clip_low,
            "clip_high": cfg.clip_high,
            "aggregation": cfg.aggregation,
        }
    if cfg.teacher_kl != "sampled":
        raise ValueError(
            f"algorithm.teacher_kl={cfg.teacher_kl!r}: micro-batches do not carry the teacher's "
            "top-k log-probs yet; use teacher_kl=sampled"
        )
    return {
        "alpha": cfg.alpha,
        "eps_low": cfg.eps_low,
        "eps_high": cfg.eps_high,
        "aggregation": cfg.aggregation,
        "student_logprob_source": cfg.student_logprob_source,
        "teacher_kl": cfg.teacher_kl,
    }


def loss_count(mb: MicroBatch, aggregation: str) -> int:
    """What a micro-batch adds to the step's aggregation denominator: non-empty sequences
    (``seq_mean_token_mean``) or loss tokens (``token_mean``)."""
    if aggregation == "token_mean":
        return int(mb.loss_mask_N.sum())
    per_seq = np.add.reduceat(mb.loss_mask_N.astype(np.int64), mb.cu_seqlens_B1[:-1])
    return int((per_seq > 0).sum())


@dataclass
class _Batch:
    """One micro-batch on the device, in the layouts the forward and the loss need."""

    tokens_1N: torch.Tensor
    positions_1N: torch.Tensor
    rows_M: torch.Tensor  # token positions that carry loss (never a sequence start)
    seq_M: torch.Tensor  # their sequence index
    pos_M: torch.Tensor  # their offset inside the sequence
    mask_BT: torch.Tensor
    logp_rollout_BT: torch.Tensor
    logp_teacher_BT: torch.Tensor | None
    adv_B: torch.Tensor
    routes_NLk: torch.Tensor | None
    agree_N: torch.Tensor
    starts_B: torch.Tensor
    domains: tuple[str, ...]
    num_tokens: int


def _to_batch(mb: MicroBatch, device: torch.device, vocab_size: int) -> _Batch:
    if not isinstance(mb, MicroBatch):
        raise ValueError(f"forward_backward expects MicroBatch records, got {type(mb).__name__}")
    cu = mb.cu_seqlens_B1.astype(np.int64)
    B, N = mb.num_sequences, mb.num_tokens
    lengths = np.diff(cu)
    if mb.loss_mask_N[cu[:-1]].any():
        raise ValueError(
            "a sequence's first token carries loss, but it has no preceding context to be "
            "predicted from; the first token of every sequence must be a prompt token"
        )
    if N and (int(mb.tokens_N.min()) < 0 or int(mb.tokens_N.max()) >= vocab_size):
        raise ValueError(
            f"token ids span [{mb.tokens_N.min()}, {mb.tokens_N.max()}] but the model has "
            f"vocab_size={vocab_size}; were the samples tokenized for another model?"
        )
    seq_N = np.repeat(np.arange(B), lengths)
    pos_N = np.arange(N) - cu[seq_N]
    T = int(lengths.max())
    rows = np.flatnonzero(mb.loss_mask_N)

    def padded(x_N: np.ndarray) -> torch.Tensor:
        out = np.zeros((B, T), dtype=np.float32)
        out[seq_N[rows], pos_N[rows]] = x_N[rows]
        return torch.from_numpy(out).to(device)

    mask_BT = np.zeros((B, T), dtype=bool)
    mask_BT[seq_N[rows], pos_N[rows]] = True
    agree_N = np.ones(N, dtype=bool)
    agree_N[cu[1:] - 1] = False  # the last token's route row is a copy, not a recorded choice
    return _Batch(
        tokens_1N=torch.from_numpy(mb.tokens_N.astype(np.int64))[None].to(device),
        positions_1N=torch.from_numpy(pos_N)[None].to(device),
        rows_M=torch.from_numpy(rows).to(device),
        seq_M=torch.from_numpy(seq_N[rows]).to(device),
        pos_M=torch.from_numpy(pos_N[rows]).to(device),
        mask_BT=torch.from_numpy(mask_BT).to(device),
        logp_rollout_BT=padded(mb.logp_rollout_N),
        logp_teacher_BT=None if mb.logp_teacher_N is None else padded(mb.logp_teacher_N),
        adv_B=torch.from_numpy(mb.adv_orm_B).to(device),
        routes_NLk=None if mb.routes_NLk is None else torch.from_numpy(mb.routes_NLk).to(device),
        agree_N=torch.from_numpy(agree_N).to(device),
        starts_B=torch.from_numpy(cu[:-1]).to(device),
        domains=mb.domains,
        num_tokens=N,
    )


class _Metrics:
    """Sums and weighted means gathered over micro-batches (and ranks)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.means: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add_sum(self, key: str, value: float) -> None:
        self.sums[key] += float(value)

    def add_mean(self, key: str, value: float, weight: float) -> None:
        acc = self.means[key]
        acc[0] += float(value) * weight
        acc[1] += weight

    def merge(self, other: _Metrics) -> None:
        for k, v in other.sums.items():
            self.sums[k] += v
        for k, (s, w) in other.means.items():
            self.means[k][0] += s
            self.means[k][1] += w

    def result(self) -> dict[str, float]:
        out = dict(self.sums)
        for k, (s, w) in self.means.items():
            if w > 0:
                out[k] = s / w
        return out


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TorchTrainer:
    """The ``Trainer`` protocol on a transformers model (see the module docstring).

    Args:
        trainer_cfg: optimisation, precision, micro-batching, routing replay.
        model_cfg: the student checkpoint (a local HF folder) and its serving dtype.
        algorithm_cfg: the loss and its knobs.
        device: torch device; default ``cuda`` (this rank's GPU) if available, else ``cpu``.
        seed: seeds torch, numpy and python RNGs at start.
        gradient_checkpointing: recompute decoder layers in backward (R3 replays the same ids).
        attn_implementation: override transformers' choice (e.g. ``eager``); None keeps it.
        export_max_shard_size: largest safetensors shard written by ``export_weights``.
    """

    def __init__(
        self,
        trainer_cfg: TrainerConfig,
        model_cfg: ModelConfig,
        algorithm_cfg: AlgorithmConfig,
        *,
        device: str | torch.device | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        export_max_shard_size: int | str = "5GB",
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.trainer_cfg = trainer_cfg
        self.model_cfg = model_cfg
        self.algorithm_cfg = algorithm_cfg
        self._loss_fn: Callable[..., Any] = lookup("algorithm.loss", LOSSES, algorithm_cfg.loss)
        self._loss_kwargs = loss_kwargs(algorithm_cfg)
        self.export_max_shard_size = export_max_shard_size

        self._world = dist.get_world_size() if dist.is_initialized() else 1
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        if device is None:
            if torch.cuda.is_available():
                local = self._rank % torch.cuda.device_count()
                device = f"cuda:{local}"
            else:
                device = "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.compute_dtype = resolve_dtype(trainer_cfg.dtype, self.device)
        if self.compute_dtype == torch.float16:
            raise ValueError("trainer.dtype=float16 needs loss scaling; use bfloat16 or float32")
        self.export_dtype = resolve_dtype(model_cfg.dtype, self.device, field="model.dtype")

        path = Path(model_cfg.path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.path={model_cfg.path!r} is not a local checkpoint folder; the torch "
                "trainer loads a Hugging Face directory (resolve registry URIs to a folder first)"
            )
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch.float32,
            trust_remote_code=model_cfg.trust_remote_code,
            **extra,
        )
        model.config.use_cache = False
        if gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # the v5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.to(self.device)
        model.train()
        self._hf_model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.r3 = RoutingReplay(model, replay=trainer_cfg.routing_replay)
        self._autocast = self.compute_dtype != torch.float32
        if self._world > 1:
            self._shard(model)
        self.optimizer = build_optimizer(model.named_parameters(), trainer_cfg)
        self.scheduler = build_scheduler(self.optimizer, trainer_cfg)
        self._version = 0
        self._warned_no_routes = False
        self._handoff: list[tuple[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ properties

    @property
    def version(self) -> int:
        """Optimizer steps applied (0 = the loaded weights)."""
        return self._version

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model being trained (FSDP-sharded when data-parallel)."""
        return self._hf_model

    # ------------------------------------------------------------------ setup helpers

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        base = getattr(model, model.base_model_prefix)
        for layer in base.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self._autocast = False  # FSDP casts parameters itself

    # ------------------------------------------------------------------ forward

    def _forward_logits(self, batch: _Batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self._autocast):
            out = self._hf_model(
                input_ids=batch.tokens_1N, position_ids=batch.positions_1N, use_cache=False
            )
        return out.logits[0]

    def _routes_for(self, batch: _Batch) -> torch.Tensor | None:
        missing = batch.routes_NLk is None and self.r3.is_moe and self.trainer_cfg.routing_replay
        if missing and not self._warned_no_routes:
            log.warning(
                "routing_replay is on but micro-batches carry no routes: the trainer uses "
                "its own routing (enable rollout.return_routed_experts)"
            )
            self._warned_no_routes = True
        return batch.routes_NLk if self.r3.is_moe else None

    @torch.no_grad()
    def compute_logprobs(self, micro_batches: Sequence[MicroBatch]) -> list[np.ndarray]:
        """Per-token log-probs of each micro-batch under the current weights (with R3).

        Returns float32 [N] per micro-batch: entry i is log p(tokens_N[i] | the tokens of its
        sequence before i); 0 at the first token of every sequence.
        """
        out = []
        for mb in micro_batches:
            batch = _to_batch(mb, self.device, self.vocab_size)
            with self.r3.bind(self._routes_for(batch), batch.agree_N):
                logits_NV = self._forward_logits(batch)
            logp_N = torch.zeros(batch.num_tokens, dtype=torch.float32, device=self.device)
            if batch.num_tokens > 1:
                logp_N[1:] = selective_log_softmax(logits_NV[:-1], batch.tokens_1N[0, 1:])
            logp_N[batch.starts_B] = 0.0
            out.append(logp_N.cpu().numpy())
        return out

    # ------------------------------------------------------------------ protocol

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        if self._world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _call_loss(self, logp_BT: torch.Tensor, b: _Batch) -> tuple[torch.Tensor, dict]:
        loss = self.algorithm_cfg.loss
        if loss == "sft":
            return self._loss_fn(logp_BT, b.mask_BT, **self._loss_kwargs)
        if loss == "rl":
            return self._loss_fn(
                logp_BT, b.logp_rollout_BT, b.adv_B, b.mask_BT, **self._loss_kwargs
            )
        if b.logp_teacher_BT is None:
            raise ValueError(
                "algorithm.loss=mopd needs teacher log-probs, but a micro-batch has none; "
                "score every sample with its domain teacher before training"
            )
        return self._loss_fn(
            logp_BT, b.logp_rollout_BT, b.logp_teacher_BT, b.adv_B, b.mask_BT, **self._loss_kwargs
        )

    def forward_backward(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """Accumulate the gradients of one step's micro-batches; return the step's metrics.

        Metrics: ``loss`` (the aggregation over all micro-batches and ranks), the loss's own
        metrics (token-weighted across micro-batches: masked_fraction, is_ratio_mean,
        is_ratio_abs_dev, teacher_log_ratio, ...; num_tokens / num_samples summed),
        ``entropy``, ``train_rollout_k3`` (rl/mopd), ``route_agreement`` (MoE with routes),
        ``teacher_log_ratio/<domain>`` and ``orm_adv/<domain>``, ``tokens`` (all tokens run),
        ``staleness_max`` (when versions are known) and ``version``.
        Calling it twice before ``optim_step`` adds the two steps' gradients.
        """
        micro_batches = list(micro_batches)
        if not micro_batches:
            raise ValueError("forward_backward needs at least one micro-batch")
        aggregation = self.algorithm_cfg.aggregation
        local = sum(loss_count(mb, aggregation) for mb in micro_batches)
        (denom,) = self._all_reduce_sum([float(local)])
        denom = max(denom, 1.0)
        uses_rollout = self.algorithm_cfg.loss != "sft"
        student_train = self.algorithm_cfg.student_logprob_source == "train"
        m = _Metrics()
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            b = _to_batch(mb, self.device, self.vocab_size)
            if self._world > 1:
                self._hf_model.set_requires_gradient_sync(i == last)
            with self.r3.bind(self._routes_for(b), b.agree_N):
                with self.r3.measuring():
                    logits_NV = self._forward_logits(b)
                logits_MV = logits_NV[b.rows_M - 1]
                logp_M = selective_log_softmax(logits_MV, b.tokens_1N[0, b.rows_M])
                logp_BT = torch.zeros_like(b.logp_rollout_BT).index_put((b.seq_M, b.pos_M), logp_M)
                loss, lm = self._call_loss(logp_BT, b)
                weight = loss_count(mb, aggregation) / denom
                (loss * (weight * self._world)).backward()
            hits, total = self.r3.pop_agreement()
            if total:
                m.add_mean("route_agreement", hits / total, total)
            ntok = float(lm.get("num_tokens", 0.0))
            m.add_sum("loss", lm["loss"] * weight)
            m.add_sum("tokens", b.num_tokens)
            for key, value in lm.items():
                if key == "loss":
                    continue
                if key in _SUMS:
                    m.add_sum(key, value)
                else:
                    m.add_mean(key, value, lm["num_samples"] if key in _SAMPLE_MEANS else ntok)
            with torch.no_grad():
                self._token_metrics(m, mb, b, logits_MV, logp_BT, ntok, uses_rollout, student_train)
        return self._finish_metrics(m)

    def _token_metrics(
        self,
        m: _Metrics,
        mb: MicroBatch,
        b: _Batch,
        logits_MV: torch.Tensor,
        logp_BT: torch.Tensor,
        ntok: float,
        uses_rollout: bool,
        student_train: bool,
    ) -> None:
        if ntok == 0:
            return
        logp_BT = logp_BT.detach()
        m.add_mean("entropy", float(entropy_from_logits(logits_MV.detach()).mean()), ntok)
        if uses_rollout:
            k3 = train_rollout_mismatch(b.logp_rollout_BT, logp_BT, b.mask_BT)
            m.add_mean("train_rollout_k3", float(k3), ntok)
        if mb.versions_N is not None and mb.loss_mask_N.any():
            oldest = int(mb.versions_N[mb.loss_mask_N].min())
            if oldest >= 0:
                m.sums["staleness_max"] = max(m.sums["staleness_max"], self._version - oldest)
        if not b.domains:
            return
        seq_tokens_B = b.mask_BT.sum(dim=1).cpu().numpy()
        term_BT = None
        if b.logp_teacher_BT is not None:
            student_BT = logp_BT if student_train else b.logp_rollout_BT
            term_BT = torch.where(b.mask_BT, kl_k1(b.logp_teacher_BT, student_BT), 0.0)
            term_B = term_BT.sum(dim=1).cpu().numpy()
        adv_B = mb.adv_orm_B
        for d in sorted(set(b.domains)):
            sel = np.array([x == d for x in b.domains]) & (seq_tokens_B > 0)
            if not sel.any():
                continue
            n = float(seq_tokens_B[sel].sum())
            if term_BT is not None:
                m.add_mean(f"teacher_log_ratio/{d}", float(term_B[sel].sum()) / n, n)
            m.add_mean(f"orm_adv/{d}", float(adv_B[sel].mean()), float(sel.sum()))

    def _finish_metrics(self, m: _Metrics) -> dict[str, float]:
        if self._world > 1:
            gathered: list[Any] = [None] * self._world
            dist.all_gather_object(gathered, (dict(m.sums), dict(m.means)))
            m = _Metrics()
            for sums, means in gathered:
                part = _Metrics()
                part.sums.update(sums)
                part.means.update({k: list(v) for k, v in means.items()})
                m.merge(part)
            stale = [s["staleness_max"] for s, _ in gathered if "staleness_max" in s]
            if stale:
                m.sums["staleness_max"] = max(stale)
        out = m.result()
        out["version"] = float(self._version)
        return out

    def optim_step(self) -> dict[str, float]:
        """Clip the global grad norm, step AdamW and the LR schedule, zero grads, version += 1.

        A non-finite grad norm skips the update (weights untouched, ``optim_skipped`` = 1) but
        still advances the schedule and the version, so steps stay aligned with the data.
        """
        params = [p for p in self._hf_model.parameters() if p.requires_grad]
        max_norm = self.trainer_cfg.grad_clip if self.trainer_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        skipped = not np.isfinite(grad_norm)
        if skipped:
            log.warning(
                "non-finite grad norm %s: skipping the update of step %d", norm, self._version
            )
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._version += 1
        return {
            "grad_norm": grad_norm,
            "lr": lr,
            "version": float(self._version),
            "optim_skipped": float(skipped),
        }

    # ------------------------------------------------------------------ state

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copy of the model state (collective; complete on rank 0 only)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self._hf_model, options=opts)

    def _full_optimizer_state(self) -> dict[str, Any]:
        """Unsharded CPU copy of the AdamW state keyed by parameter name (collective)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self._hf_model, self.optimizer, options=opts)

    def _barrier(self) -> None:
        if self._world > 1:
            dist.barrier()

    def _shared_token(self) -> str:
        import uuid

        token = [uuid.uuid4().hex]
        if self._world > 1:
            dist.broadcast_object_list(token, src=0)
        return token[0]

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint into directory ``path`` atomically (see the module docstring)."""
        path = Path(path)
        model_sd = self._full_model_state()  # collectives: every rank takes part
        optim_sd = self._full_optimizer_state()
        token = self._shared_token()
        tmp = ckpt.temp_path(path, token)
        if self._rank == 0:
            ckpt.begin(path, token)
        self._barrier()
        try:
            if self._rank == 0:
                torch.save(model_sd, tmp / "model.pt")
                torch.save(optim_sd, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                state = {
                    "step": self._version,
                    "version": self._version,
                    "world_size": self._world,
                    "model_path": str(self.model_cfg.path),
                    "loss": self.algorithm_cfg.loss,
                }
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            torch.save(_rng_state(), tmp / f"rng_rank{self._rank}.pt")
        except BaseException:
            if self._rank == 0:
                ckpt.abort(tmp)
            raise
        self._barrier()
        if self._rank == 0:
            ckpt.commit(tmp, path, {"step": self._version, "version": self._version})
        self._barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Restore model, optimizer, LR schedule, RNG, step and version from ``save(path)``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = ckpt.require_committed(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != self._world:
            log.warning(
                "checkpoint %s was written by %d ranks, loading on %d: RNG state of rank 0 is used",
                path,
                state["world_size"],
                self._world,
            )
        opts = StateDictOptions(full_state_dict=True)
        model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(self._hf_model, model_sd, options=opts)
        optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self._hf_model, self.optimizer, optim_sd, options=opts)
        self.scheduler.load_state_dict(
            torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
        )
        rng = path / f"rng_rank{self._rank}.pt"
        if not rng.exists():
            rng = path / "rng_rank0.pt"
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        self._version = int(state["version"])
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ weights out

    def export_weights(self, path: str | Path, version: int) -> Path:
        """Write HF safetensors (model.dtype precision) + config + tokenizer to ``path``."""
        path = Path(path)
        model_sd = self._full_model_state() if self._world > 1 else None
        if self._rank == 0:
            tokenizer = self.model_cfg.tokenizer_path
            export_hf_checkpoint(
                self._hf_model,
                path,
                version,
                source_dir=self.model_cfg.path,
                tokenizer_dir=tokenizer if tokenizer and tokenizer != self.model_cfg.path else None,
                state_dict=model_sd,
                dtype=self.export_dtype,
                max_shard_size=self.export_max_shard_size,
            )
        self._barrier()
        return path

    def handoff_weights(self, naming: str = "checkpoint") -> list[tuple[str, torch.Tensor]]:
        """Private copies of the weights (serving dtype, on the trainer's device) for a
        same-host engine; see ``trainer.export.named_tensors_for_handoff``. Single rank only."""
        if self._world > 1:
            raise NotImplementedError("tensor handoff from a sharded trainer: use export_weights")
        return named_tensors_for_handoff(self._hf_model, naming=naming, dtype=self.export_dtype)

    def serialized_weights(self, naming: str = "checkpoint") -> bytes:
        """One ``serialized_named_tensors`` payload for ``/update_weights_from_tensor``.

        The tensors stay referenced by this trainer until the next call (the receiver maps
        their memory). Switches this process to torch's ``file_system`` sharing strategy
        when the weights are on the CPU.
        """
        named = self.handoff_weights(naming)
        if any(not t.is_cuda for _, t in named):
            torch.multiprocessing.set_sharing_strategy("file_system")
        self._handoff = named
        return serialize_named_tensors(named)
