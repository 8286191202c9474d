"""``MegatronTrainer``: the Trainer protocol on a Megatron-core model (TP / EP / DP).

One process per rank (torchrun-style environment; a lone process is a world of one). Each
rank builds its shard of the Megatron model of ``trainer.megatron.model`` from the HF
checkpoint in ``ModelConfig.path`` (``trainer.megatron.convert``), wraps it in Megatron's
``DistributedDataParallel`` and builds Megatron's optimizer (``get_megatron_optimizer``:
AdamW, fp32 master weights, separate dense and expert parameter groups).

Step anatomy (same contract and metrics as ``trainer.torch_backend.TorchTrainer``)::

    forward_backward(mbs)   per micro-batch: packed THD forward (positions restart per
                            sequence) -> log-probs at loss positions -> the registry loss
                            (mopd.algo, no math here) -> weighted backward into DDP buffers
    optim_step()            DDP grad sync (finalize_model_grads), grad norm, clip, AdamW step,
                            LR from ``trainer.optim.lr_at``; version += 1

Weighting. Each micro-batch's loss is the aggregation over that micro-batch; it is weighted by
(its count / the step's count over all micro-batches of all data-parallel ranks), count = non-
empty sequences (eq. 7) or loss tokens (token_mean), times the data-parallel size because
Megatron's DDP averages gradients over data-parallel ranks. Tensor-parallel ranks of one
data-parallel rank see the same micro-batches.

R3 goes through Megatron-core's own ``RouterReplay`` (``moe_enable_routing_replay``): per MoE
layer, the micro-batch's replayed ids are set as targets; the forward runs in
``REPLAY_FORWARD`` (Megatron gathers its own router scores at those ids, so gate weights are
recomputed and the router keeps its gradient), the backward in ``REPLAY_BACKWARD`` (activation
recompute pops the same ids). Megatron's own top-k is recorded before it is replaced
(``AgreementRouterReplay``): ``route_agreement`` is measured with R3 on and off (off:
``RECORD`` mode), ``train_rollout_k3`` every step. ``trainer.megatron.router.RouteReplay``
drives the layers' replays per micro-batch.

Learning rate: ``trainer.optim.lr_at`` (the torch backend's schedule) sets the param groups'
``lr`` (times Megatron's ``lr_mult``) before every step; weight decay on matrices only (Megatron's
standard ``wd_mult = 0`` for 1-D parameters, the torch backend's rule too).

Checkpoint (``save``/``load``, one committed directory, trainer.checkpoint protocol)::

    model_rank<R>.pt       this rank's Megatron state dict (its TP slice and experts)
    optimizer_rank<R>.pt   this rank's Megatron optimizer state (AdamW moments, fp32 masters)
    rng_rank<R>.pt         torch / CUDA (this rank's device) / numpy / python RNG states and
                           Megatron's CUDA RNG tracker states (``trainer.rng``)
    trainer_state.json     step, version, world layout, source model
    COMMITTED              written last

A checkpoint reloads on the same layout (world size, TP, EP); ``export_weights`` writes the
layout-free HF checkpoint.

Precision: fp32 on CPU (the only dtype there); bf16 on GPU (Float16Module + fp32 masters).
CPU machines run through ``trainer.megatron.cpu_compat`` (gloo); GPU machines unpatched.

Shape suffixes: N tokens of a packed micro-batch, B sequences, T positions of the longest
sequence, V vocabulary, M loss positions, L MoE layers, k experts per token.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.types import MicroBatch
from trainer import checkpoint as ckpt
from trainer.common import (
    PackedBatch,
    RegistryLoss,
    StepMetrics,
    all_reduce_sum,
    gather_metrics,
    loss_logprobs,
    record_loss_metrics,
    resolve_dtype,
    sequence_logprobs,
    shared_token,
    step_weights,
    to_batch,
    token_metrics,
)
from trainer.export import write_hf_checkpoint
from trainer.megatron import convert, parallel
from trainer.megatron import model as mmodel
from trainer.megatron.router import RouteReplay
from trainer.optim import lr_at, step_metrics
from trainer.rng import load_rng_state, rng_file, save_rng_state

__all__ = ["MegatronTrainer"]

log = logging.getLogger(__name__)

# Tensors HF keeps in fp32 whatever the model dtype (MiMo's router), per architecture.
_KEEP_FP32 = {"mimo_v2_flash": ("mlp.gate.weight", "e_score_correction_bias")}


class MegatronTrainer:
    """The ``Trainer`` protocol on Megatron-core (see the module docstring).

    Args:
        trainer_cfg: optimisation, parallel sizes, micro-batching, routing replay.
        model_cfg: the student checkpoint (a local HF folder) and its serving dtype.
        algorithm_cfg: the loss and its knobs.
        seed: seeds every RNG; identical on all ranks so data-parallel replicas start alike.
        recompute: full activation recompute of every decoder layer (R3 replays the same ids).
        experts: ``sequential`` (Megatron's SequentialMLP), ``grouped`` (``GroupedExperts``,
            grouped GEMMs) or ``auto`` (grouped on CUDA machines, sequential elsewhere).
        export_max_shard_size: largest safetensors shard written by ``export_weights``.
    """

    def __init__(
        self,
        trainer_cfg: TrainerConfig,
        model_cfg: ModelConfig,
        algorithm_cfg: AlgorithmConfig,
        *,
        seed: int = 0,
        recompute: bool = False,
        experts: str = "auto",
        export_max_shard_size: int | str = "5GB",
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        self.trainer_cfg = trainer_cfg
        self.model_cfg = model_cfg
        self.algorithm_cfg = algorithm_cfg
        self._loss = RegistryLoss(algorithm_cfg)
        self.export_max_shard_size = export_max_shard_size

        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path={model_cfg.path!r} has no config.json; the Megatron trainer loads a "
                "local Hugging Face checkpoint folder"
            )
        self.hf_config: dict[str, Any] = json.loads((path / "config.json").read_text())
        self.layout = mmodel.layout_from_hf(self.hf_config)
        self._check_sizes(trainer_cfg)

        random.seed(seed)
        np.random.seed(seed)
        self.par = parallel.init_parallel(trainer_cfg, seed=seed)
        self.device = self.par.device
        self.compute_dtype = resolve_dtype(trainer_cfg.dtype, self.device)
        if self.device.type == "cpu" and self.compute_dtype != torch.float32:
            raise ValueError(
                f"trainer.dtype={trainer_cfg.dtype!r}: the Megatron backend runs fp32 on CPU; "
                "set trainer.dtype to float32 or auto"
            )
        if self.compute_dtype == torch.float16:
            raise ValueError("trainer.dtype=float16 needs loss scaling; use bfloat16 or float32")
        self.export_dtype = resolve_dtype(model_cfg.dtype, self.device, field="model.dtype")
        self._tp_group = ps.get_tensor_model_parallel_group()
        self._dp_group = ps.get_data_parallel_group()
        self._ep_group = ps.get_expert_model_parallel_group()

        self.tconfig = mmodel.transformer_config(
            self.layout,
            params_dtype=self.compute_dtype,
            tensor_parallel=trainer_cfg.tensor_parallel,
            expert_parallel=trainer_cfg.expert_parallel,
            routing_replay=True,  # RouterReplay also records own routes when R3 is off
            recompute=recompute,
        )
        if experts == "auto":
            grouped = self.device.type == "cuda" and hasattr(torch, "_grouped_mm")
            experts = "grouped" if grouped else "sequential"
        self.experts = experts
        gpt = mmodel.build_gpt_model(self.layout, self.tconfig, experts=experts)
        module: torch.nn.Module = gpt
        if self.compute_dtype != torch.float32:
            module = Float16Module(self.tconfig, gpt)  # casts every weight to bf16
            for sub in gpt.modules():
                if not isinstance(sub, mmodel.ReplayTopKRouter):
                    continue
                # The selection bias is fp32 in HF and in Megatron (which restores it at every
                # forward); set it before loading so the checkpoint's value is not rounded.
                if sub.expert_bias is not None:
                    sub.expert_bias.data = sub.expert_bias.data.float()
                if self.layout.router is not None and self.layout.router.fp32:
                    # HF (and the rollout engines) keep MiMo's router weight in fp32 too.
                    sub.weight.data = sub.weight.data.float()
        convert.load_hf(
            gpt,
            convert.read_hf_checkpoint(path),
            self.layout,
            tp_rank=self.par.tp_rank,
            tp=self.par.tp,
            ep_rank=self.par.ep_rank,
            ep=self.par.ep,
        )
        self.gpt = gpt
        self.r3 = RouteReplay(
            gpt,
            self.layout,
            replay=trainer_cfg.routing_replay,
            tp=self.par.tp,
            tp_rank=self.par.tp_rank,
        )
        # The plain Megatron optimizer wrapper (fp32 master weights on every rank): its state
        # dict saves per rank; the distributed optimizer would need Megatron's own checkpoints.
        use_dist_opt = False
        self.model = DistributedDataParallel(
            config=self.tconfig,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=use_dist_opt,
            ),
            module=module,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=trainer_cfg.lr,
                min_lr=trainer_cfg.min_lr,
                weight_decay=trainer_cfg.weight_decay,
                adam_beta1=trainer_cfg.adam_beta1,
                adam_beta2=trainer_cfg.adam_beta2,
                adam_eps=trainer_cfg.adam_eps,
                clip_grad=trainer_cfg.grad_clip,
                bf16=self.compute_dtype == torch.bfloat16,
                params_dtype=self.compute_dtype,
                use_distributed_optimizer=use_dist_opt,
            ),
            [self.model],
            # parallel.init_parallel creates gloo twins of the groups on GPU machines only.
            use_gloo_process_groups=self.device.type == "cuda",
        )
        self._version = 0
        self._set_lr()

    # ------------------------------------------------------------------ setup helpers

    def _check_sizes(self, cfg: TrainerConfig) -> None:
        lay = self.layout
        if lay.num_experts % cfg.expert_parallel:
            raise ValueError(
                f"trainer.expert_parallel={cfg.expert_parallel} must divide the model's "
                f"{lay.num_experts} experts"
            )
        if lay.num_heads % cfg.tensor_parallel:
            raise ValueError(
                f"trainer.tensor_parallel={cfg.tensor_parallel} must divide the model's "
                f"{lay.num_heads} attention heads"
            )

    def _set_lr(self) -> None:
        lr = lr_at(self._version, self.trainer_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.trainer_cfg.weight_decay * group.get("wd_mult", 1.0)

    @property
    def version(self) -> int:
        """Optimizer steps applied (0 = the loaded weights)."""
        return self._version

    # ------------------------------------------------------------------ batches

    def _to_batch(self, mb: MicroBatch, run_tokens: int | None = None) -> PackedBatch:
        # Megatron runs the row as ``run_tokens`` tokens (see ``_run_lengths``) and replays the
        # MoE layers' routes only, as int64 (RouterReplay's target indices); the torch backend
        # does neither (its RoutingReplay selects the layers itself).
        return to_batch(
            mb,
            self.device,
            self.layout.vocab_size,
            run_tokens=run_tokens,
            select_routes=lambda r: self.r3.moe_routes(r).astype(np.int64),
        )

    def _run_lengths(self, micro_batches: Sequence[MicroBatch]) -> list[int]:
        """Token count each micro-batch runs with: a multiple of TP (sequence parallelism
        splits the row), and with the allgather token dispatcher the largest count among the
        expert-parallel ranks (it gathers equal-sized token blocks; the all-to-all dispatcher
        used on GPUs does not need this)."""
        lengths = [mb.num_tokens for mb in micro_batches]
        if self.tconfig.moe_token_dispatcher_type == "allgather" and self.par.ep > 1:
            t = torch.tensor(lengths, dtype=torch.int64, device=self.device)
            n = torch.tensor([len(lengths)], dtype=torch.int64, device=self.device)
            counts = torch.stack([n, -n])
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._ep_group)
            if int(counts[0]) != -int(counts[1]):
                raise ValueError(
                    f"expert-parallel ranks got different numbers of micro-batches "
                    f"({len(lengths)} here); every rank must run the same number "
                    "(mopd.packing.pack_micro_batches(dp_size=...) guarantees it)"
                )
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ep_group)
            lengths = t.tolist()
        tp = self.par.tp
        return [-(-n // tp) * tp for n in lengths]

    # ------------------------------------------------------------------ forward

    def _logits(self, b: PackedBatch) -> torch.Tensor:
        """[N, V] logits of the real tokens (vocabulary and TP padding cut off)."""
        logits = mmodel.packed_forward(self.model, b.tokens_N, b.cu_B1)
        return logits[: b.num_tokens, : self.layout.vocab_size]

    @torch.no_grad()
    def compute_logprobs(self, micro_batches: Sequence[MicroBatch]) -> list[np.ndarray]:
        """Per-token log-probs of each micro-batch under the current weights (with R3).

        float32 [N] per micro-batch: entry i is log p(tokens_N[i] | its sequence before i);
        0 at the first token of every sequence.
        """
        micro_batches = list(micro_batches)
        out = []
        for mb, run in zip(micro_batches, self._run_lengths(micro_batches), strict=True):
            b = self._to_batch(mb, run)
            with self.r3.bound(b):
                logits_NV = self._logits(b)
            out.append(sequence_logprobs(logits_NV, b))
        return out

    def _dp_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, size=self.par.dp, device=self.device, group=self._dp_group)

    def forward_backward(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """Accumulate the gradients of one step's micro-batches; return the step's metrics.

        Same metrics as the torch backend: ``loss``, the loss's own metrics, ``entropy``,
        ``train_rollout_k3``, ``route_agreement``, per-domain ``teacher_log_ratio/<d>`` and
        ``orm_adv/<d>``, ``tokens``, ``staleness_max``, ``version``. Gradients of repeated
        calls add up until ``optim_step``.
        """
        micro_batches = list(micro_batches)
        weights = step_weights(micro_batches, self.algorithm_cfg.aggregation, self._dp_sum)
        runs = self._run_lengths(micro_batches)
        m = StepMetrics()
        agree = [0.0, 0.0]
        for mb, weight, run in zip(micro_batches, weights, runs, strict=True):
            b = self._to_batch(mb, run)
            with self.r3.bound(b):
                logits_NV = self._logits(b)
                hits, total = self.r3.agreement(b)
                agree[0] += hits
                agree[1] += total
                logits_MV, logp_BT = loss_logprobs(logits_NV, b)
                loss, lm = self._loss(logp_BT, b, logits_MV)
                self.r3.backward_pass()
                (loss * (weight * self.par.dp)).backward()
            ntok = record_loss_metrics(m, lm, weight, b.num_tokens)
            token_metrics(m, mb, b, logits_MV, logp_BT, ntok, self.algorithm_cfg, self._version)
        if self.par.tp > 1:
            # Sequence parallelism: each TP rank routed its own slice of the tokens.
            t = torch.tensor(agree, dtype=torch.float64, device=self.device)
            dist.all_reduce(t, group=self._tp_group)
            agree = t.tolist()
        if agree[1]:
            # One mean over the step (the torch backend adds one per micro-batch): the TP
            # all-reduce above has to see the whole step's counts.
            m.add_mean("route_agreement", agree[0] / agree[1], agree[1])
        out = gather_metrics(m, size=self.par.dp, group=self._dp_group).result()
        out["version"] = float(self._version)
        return out

    # ------------------------------------------------------------------ optimizer

    def optim_step(self) -> dict[str, float]:
        """DDP grad sync, grad norm, clip, AdamW step, version += 1.

        A non-finite grad norm skips the update (weights untouched, ``optim_skipped`` = 1) but
        still advances the version and schedule, as the torch backend does.
        """
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.model])
        lr = lr_at(self._version, self.trainer_cfg)
        self._set_lr()
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        skipped = bool(found_inf) or not np.isfinite(grad_norm)
        if skipped:
            log.warning(
                "non-finite grad norm %s: skipping the update of step %d", grad_norm, self._version
            )
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.model.zero_grad_buffer()
        self._version += 1
        self._set_lr()
        return step_metrics(grad_norm, lr, self._version, skipped)

    # ------------------------------------------------------------------ state

    def _barrier(self) -> None:
        if self.par.world_size > 1:
            dist.barrier()

    def _layout_meta(self) -> dict[str, int]:
        return {"world_size": self.par.world_size, "tp": self.par.tp, "ep": self.par.ep}

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint into directory ``path`` atomically (see the module docstring)."""
        rank = self.par.rank
        state = ckpt.trainer_state(
            self._version,
            self._layout_meta(),
            self.model_cfg.path,
            self.algorithm_cfg.loss,
            backend="megatron",
        )

        def write(tmp: Path) -> None:
            model_sd = {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in self.gpt.state_dict().items()
            }
            torch.save(model_sd, tmp / f"model_rank{rank}.pt")
            torch.save(self.optimizer.state_dict(), tmp / f"optimizer_rank{rank}.pt")
            save_rng_state(rng_file(tmp, rank), cuda="current", tracker=parallel.rng_tracker())
            if rank == 0:
                ckpt.write_trainer_state(tmp, state)

        return ckpt.save_on_ranks(
            path,
            shared_token(self.par.world_size),
            write,
            rank=rank,
            barrier=self._barrier,
            meta={"step": self._version, "version": self._version},
        )

    def load(self, path: str | Path) -> None:
        """Restore model, optimizer, RNG, step and version from ``save(path)`` (same layout)."""
        path, state = ckpt.read_trainer_state(path)
        if state.get("backend") != "megatron":
            raise ValueError(f"{path} was not written by the Megatron backend")
        mine = self._layout_meta()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(
                f"checkpoint {path} was written with layout {theirs}, this trainer runs {mine}; "
                "restart with the same world size / tensor_parallel / expert_parallel, or start "
                "from an exported HF checkpoint instead"
            )
        rank = self.par.rank
        model_sd = torch.load(path / f"model_rank{rank}.pt", map_location="cpu", weights_only=False)
        self.gpt.load_state_dict(model_sd, strict=True)
        self.optimizer.load_state_dict(
            torch.load(path / f"optimizer_rank{rank}.pt", map_location="cpu", weights_only=False)
        )
        load_rng_state(rng_file(path, rank), tracker=parallel.rng_tracker())
        self._version = int(state["version"])
        self.optimizer.zero_grad()
        self.model.zero_grad_buffer()
        self._set_lr()

    # ------------------------------------------------------------------ weights out

    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full HF (hub layout) state dict; a collective over TP and EP groups."""
        sd = convert.gather_hf(
            self.gpt, self.layout, tp_group=self._tp_group, ep_group=self._ep_group
        )
        if dtype is None:
            return sd
        keep = _KEEP_FP32.get(self.layout.arch, ())
        return {
            k: v if (not v.is_floating_point() or any(s in k for s in keep)) else v.to(dtype)
            for k, v in sd.items()
        }

    def export_weights(self, path: str | Path, version: int) -> Path:
        """Write HF safetensors (model.dtype precision) + config + tokenizer to ``path``."""
        path = Path(path)
        sd = self.hf_state_dict(self.export_dtype)
        if self.par.rank == 0:
            config = dict(self.hf_config)
            config["dtype"] = str(self.export_dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
            tokenizer = self.model_cfg.tokenizer_path
            write_hf_checkpoint(
                sd,
                config,
                path,
                version,
                source_dir=self.model_cfg.path,
                tokenizer_dir=tokenizer if tokenizer and tokenizer != self.model_cfg.path else None,
                max_shard_size=self.export_max_shard_size,
            )
        self._barrier()
        return path
