"""The embedded PyTorch trainer: any transformers causal LM, CPU or GPUs, with R3.

Step anatomy (``Trainer`` protocol, trainer/base.py)::

    forward_backward(micro_batches)     per micro-batch: packed forward -> per-token log-probs
                                        -> loss from mopd.algo's registry -> weighted backward
    optim_step()                        clip grad norm, AdamW step, LR schedule, version += 1

Layout. A MicroBatch is a flat row of whole sequences. With a varlen attention kernel
(``flash_attention_*``) it runs as that row: a batch of one with ``position_ids`` restarting
at 0 for every sequence and no attention mask, from which transformers (>= 5) builds the
block-diagonal causal mask; no padding is computed. Every other implementation (eager, which
MiMo-V2-Flash needs for its sink logits, and sdpa) would compute the whole N x N score matrix
of that row, mostly masked: there the sequences run as a right-padded [B, T] batch with an
attention mask (cost B x T^2 instead of N^2), and logits and replayed routes are mapped
between the two layouts by one index. Tests check the per-token log-probs of both layouts
against an unpacked per-sequence forward (1e-5).

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
    rng_rank<R>.pt       torch / CUDA (every device) / numpy / python RNG states of rank R
                         (``trainer.rng``)
    trainer_state.json   step, version, world size, source model
    COMMITTED            written last

Shape suffixes: N tokens of a packed micro-batch, B sequences, T positions of the longest
sequence, V vocabulary, M loss positions, L MoE layers, k experts per token.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.types import MicroBatch
from trainer import checkpoint as ckpt
from trainer.common import (
    NO_ROUTES_WARNING,
    PackedBatch,
    RegistryLoss,
    StepMetrics,
    all_reduce_sum,
    gather_metrics,
    loss_count,
    loss_kwargs,
    loss_logprobs,
    record_loss_metrics,
    resolve_dtype,
    sequence_logprobs,
    shared_token,
    step_weights,
    to_batch,
    token_metrics,
)
from trainer.export import (
    export_hf_checkpoint,
    handoff_state_dict,
    named_tensors_for_handoff,
    serialize_named_tensors,
)
from trainer.optim import build_optimizer, build_scheduler, step_metrics
from trainer.r3_hooks import RoutingReplay
from trainer.rng import load_rng_state, rng_file, save_rng_state
from trainer.sink_attention import HF_ATTENTION, register_hf_attention

# loss_count, loss_kwargs and resolve_dtype live in trainer.common; re-exported here, where
# they were first public.
__all__ = ["TorchTrainer", "loss_count", "loss_kwargs", "resolve_dtype"]

log = logging.getLogger(__name__)


# Models whose transformers attention is exactly ``trainer.sink_attention`` (softmax over the
# causal / sliding-window keys and an optional sink column; repeat_kv head groups) and whose
# own choice on a GPU is the dense eager one.
_SINK_ATTENTION_MODELS = frozenset({"mimo_v2_flash"})


def _default_gpu_attention(path: Path) -> str | None:
    """``HF_ATTENTION`` for the models it computes exactly, else None (transformers' choice)."""
    import json

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return HF_ATTENTION if model_type in _SINK_ATTENTION_MODELS else None


@dataclass(frozen=True)
class _Run:
    """One micro-batch as the model runs it: keyword inputs, the routes and agreement rows in
    the same token order, and (padded layout) the index of each real token in the flat batch."""

    inputs: dict[str, torch.Tensor]
    routes: torch.Tensor | None
    agree: torch.Tensor
    gather_N: torch.Tensor | None


class TorchTrainer:
    """The ``Trainer`` protocol on a transformers model (see the module docstring).

    Args:
        trainer_cfg: optimisation, precision, micro-batching, routing replay.
        model_cfg: the student checkpoint (a local HF folder) and its serving dtype.
        algorithm_cfg: the loss and its knobs.
        device: torch device; default ``cuda`` (this rank's GPU) if available, else ``cpu``.
        seed: seeds torch, numpy and python RNGs at start.
        gradient_checkpointing: recompute decoder layers in backward (R3 replays the same ids).
        attn_implementation: override transformers' choice (e.g. ``eager``); None keeps it,
            except on a GPU for MiMo-V2-Flash, which then runs ``trainer.sink_attention``
            (FlexAttention, window-sized work) instead of the dense eager attention.
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
        self._loss = RegistryLoss(algorithm_cfg)
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
        if attn_implementation is None and self.device.type == "cuda":
            attn_implementation = _default_gpu_attention(path)
        if attn_implementation == HF_ATTENTION:
            register_hf_attention()
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

    @property
    def packed(self) -> bool:
        """Whether micro-batches run as one packed row (varlen attention) or padded [B, T]."""
        impl = getattr(self._hf_model.config, "_attn_implementation", None) or ""
        return impl.startswith("flash_attention")

    def _forward_logits(self, run: _Run) -> torch.Tensor:
        """[N, V] logits of the micro-batch's real tokens, in packed order."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self._autocast):
            out = self._hf_model(**run.inputs, use_cache=False)
        logits = out.logits
        return logits[0] if run.gather_N is None else logits.flatten(0, 1)[run.gather_N]

    def _layout(self, b: PackedBatch) -> _Run:
        """The model inputs of ``b`` and its routes / agreement rows in the same layout."""
        routes = self._routes_for(b)
        if self.packed:
            inputs = {"input_ids": b.tokens_N[None], "position_ids": b.positions_N[None]}
            return _Run(inputs, routes, b.agree_N, None)
        n = b.num_tokens
        lengths = (b.cu_B1[1:] - b.cu_B1[:-1]).long()
        B, T = int(lengths.numel()), int(lengths.max())
        seq_N = torch.repeat_interleave(torch.arange(B, device=self.device), lengths)
        flat_N = seq_N * T + b.positions_N  # where each real token sits in the [B, T] batch
        ids = b.tokens_N.new_zeros(B * T).index_copy(0, flat_N, b.tokens_N[:n])
        attn = torch.zeros(B * T, dtype=torch.long, device=self.device).index_fill(0, flat_N, 1)
        agree = torch.zeros(B * T, dtype=torch.bool, device=self.device)
        agree = agree.index_copy(0, flat_N, b.agree_N[:n])
        if routes is not None:
            # Padding rows get distinct ids like any top-k choice; they are never measured.
            k = routes.shape[2]
            fill = torch.arange(k, dtype=routes.dtype, device=routes.device)
            padded = fill.expand(B * T, routes.shape[1], k).clone()
            routes = padded.index_copy(0, flat_N, routes[:n])
        inputs = {"input_ids": ids.view(B, T), "attention_mask": attn.view(B, T)}
        return _Run(inputs, routes, agree, flat_N)

    def _routes_for(self, batch: PackedBatch) -> torch.Tensor | None:
        missing = batch.routes_NLk is None and self.r3.is_moe and self.trainer_cfg.routing_replay
        if missing and not self._warned_no_routes:
            log.warning(NO_ROUTES_WARNING)
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
            batch = self._to_batch(mb)
            run = self._layout(batch)
            with self.r3.bind(run.routes, run.agree):
                logits_NV = self._forward_logits(run)
            out.append(sequence_logprobs(logits_NV, batch))
        return out

    # ------------------------------------------------------------------ protocol

    def _to_batch(self, mb: MicroBatch) -> PackedBatch:
        # Routes go over as recorded (uint8/uint16, all layers): RoutingReplay picks the MoE
        # layers and widens them to int64 on the device, which copies fewer bytes.
        return to_batch(mb, self.device, self.vocab_size)

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, size=self._world, device=self.device)

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
        weights = step_weights(micro_batches, self.algorithm_cfg.aggregation, self._all_reduce_sum)
        m = StepMetrics()
        last = len(micro_batches) - 1
        for i, (mb, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            b = self._to_batch(mb)
            if self._world > 1:
                self._hf_model.set_requires_gradient_sync(i == last)
            run = self._layout(b)
            with self.r3.bind(run.routes, run.agree):
                with self.r3.measuring():
                    logits_NV = self._forward_logits(run)
                logits_MV, logp_BT = loss_logprobs(logits_NV, b)
                loss, lm = self._loss(logp_BT, b, logits_MV)
                # FSDP2 averages gradients over ranks; the weights are shares of the global count.
                (loss * (weight * self._world)).backward()
            hits, total = self.r3.pop_agreement()
            if total:
                m.add_mean("route_agreement", hits / total, total)
            ntok = record_loss_metrics(m, lm, weight, b.num_tokens)
            token_metrics(m, mb, b, logits_MV, logp_BT, ntok, self.algorithm_cfg, self._version)
        out = gather_metrics(m, size=self._world).result()
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
        return step_metrics(grad_norm, lr, self._version, skipped)

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

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint into directory ``path`` atomically (see the module docstring)."""
        model_sd = self._full_model_state()  # collectives: every rank takes part
        optim_sd = self._full_optimizer_state()

        state = ckpt.trainer_state(
            self._version, {"world_size": self._world}, self.model_cfg.path, self.algorithm_cfg.loss
        )

        def write(tmp: Path) -> None:
            if self._rank == 0:
                torch.save(model_sd, tmp / "model.pt")
                torch.save(optim_sd, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                ckpt.write_trainer_state(tmp, state)
            save_rng_state(rng_file(tmp, self._rank), cuda="all")

        return ckpt.save_on_ranks(
            path,
            shared_token(self._world),
            write,
            rank=self._rank,
            barrier=self._barrier,
            meta={"step": self._version, "version": self._version},
        )

    def load(self, path: str | Path) -> None:
        """Restore model, optimizer, LR schedule, RNG, step and version from ``save(path)``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path, state = ckpt.read_trainer_state(path)
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
        rng = rng_file(path, self._rank)
        load_rng_state(rng if rng.exists() else rng_file(path, 0))
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

    def serialized_weights(self, naming: str = "checkpoint", receivers: int = 1) -> list[bytes]:
        """``serialized_named_tensors`` payloads for ``/update_weights_from_tensor``: one per
        receiving server (torch's shared-memory refcount expects one pickle per unpickle; a
        payload decoded twice drops the shared file while the trainer still uses it).

        The weights are copied into handoff buffers this trainer keeps between calls (shared
        memory on the CPU, one CUDA allocation per tensor on GPU), so a sync after the first
        creates no shared-memory files and the receivers map the same memory again; receivers
        copy the tensors into their own weights before the sync returns, so the next sync may
        overwrite the buffers. Switches this process to torch's ``file_system`` sharing
        strategy when the weights are on the CPU.
        """
        if self._world > 1:
            raise NotImplementedError("tensor handoff from a sharded trainer: use export_weights")
        if receivers < 1:
            raise ValueError(f"receivers must be >= 1, got {receivers}")
        source = handoff_state_dict(self._hf_model, naming=naming, dtype=self.export_dtype)
        buffers = dict(self._handoff)
        if {n: (t.shape, t.dtype, t.device) for n, t in buffers.items()} != {
            n: (t.shape, t.dtype, t.device) for n, t in source.items()
        }:
            buffers = {n: torch.empty_like(t, memory_format=torch.contiguous_format)
                       for n, t in source.items()}  # fmt: skip
            if any(not t.is_cuda for t in buffers.values()):
                torch.multiprocessing.set_sharing_strategy("file_system")
                for t in buffers.values():
                    t.share_memory_()
        with torch.no_grad():
            for name, t in source.items():
                buffers[name].copy_(t)
        self._handoff = list(buffers.items())
        return [serialize_named_tensors(self._handoff) for _ in range(receivers)]
