"""Training throughput of the Megatron backend on one GPU: a MiMo-V2-Flash-style MoE in bf16
with Rollout Routing Replay on, reported as tokens/s and model FLOP utilisation (MFU).

The model comes from a config dict written here (transformers is not needed: the GPU image's
transformers predates MiMo-V2-Flash). The script writes a random HF-layout checkpoint of it
(safetensors + config.json) into a temporary directory, builds ``MegatronTrainer`` on it
exactly as a run would (HF -> Megatron conversion included), and trains on synthetic MOPD
micro-batches: random tokens (a quarter prompt, the rest response), rollout log-probs = the
trainer's own (one R3 forward) + N(0, 0.05), teacher log-probs below them, and recorded
routes drawn uniformly (k distinct experts per token and MoE layer), so the expert load is
balanced and route agreement is about k / E.

Default model (``BENCH``): the MiMo-V2-Flash recipe scaled down: 8 layers in the release's
hybrid pattern (global at 0 and 5, sliding window 128 elsewhere, learnable sinks, twice the
KV heads in sliding layers), q/k head dim 192 with partial RoPE on a third of it, v head dim
128, value scale 0.707, a dense first layer, 64 experts top-8 with a sigmoid router and
selection bias, MiMo's 152576-token vocabulary; ~0.7 B parameters, ~0.24 B active per token.

FLOPs, counted per step from the actual micro-batches (multiply-add = 2 FLOPs):
    matmuls     2 * tokens * active matmul parameters: q/k/v/o projections, the dense MLP,
                the router, the k chosen experts' three matrices, the LM head (the input
                embedding is a lookup and is not counted)
    attention   per layer and sequence: 2 * heads * (d_qk + d_v) * sum_i keys_i, with keys_i
                the keys position i attends to (i + 1 for global layers, min(i + 1, window)
                for sliding ones): causal masking and the window counted exactly
    training    3 x forward (backward = 2 x forward). ``--recompute`` adds a forward that is
                reported separately (hardware FLOPs); MFU uses the model FLOPs.
MFU = training FLOPs per second / ``--peak-tflops`` (default 790, the H200's measured dense
bf16 peak).

    GPU:   python benchmarks/bench_megatron_gpu.py [--model bench|prod] [--profile]
    CPU:   python benchmarks/bench_megatron_gpu.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# MiMo-V2-Flash recipe at ~0.7 B parameters (HF config.json fields of MiMoV2FlashConfig).
BENCH: dict[str, Any] = {
    "model_type": "mimo_v2_flash",
    "architectures": ["MiMoV2FlashForCausalLM"],
    "vocab_size": 152576,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 192,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "sliding_window": 128,
    "layer_types": ["full_attention"]
    + ["sliding_attention"] * 4
    + ["full_attention"] * 1
    + ["sliding_attention"] * 2,
    "mlp_layer_types": ["dense"] + ["sparse"] * 7,
    "rope_parameters": {
        "full_attention": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "partial_rotary_factor": 0.334,
        },
        "sliding_attention": {
            "rope_type": "default",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.334,
        },
    },
    "attention_value_scale": 0.707,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
}

# A slice of the production model with its real per-layer dimensions (MiMo-V2-Flash: hidden
# 4096, 64 query heads, 4 KV heads (8 in sliding layers), q/k head dim 192, v 128, window 128
# with sinks, dense intermediate 16384, moe_intermediate 2048, top-8 of a sigmoid router, the
# 152k vocabulary): four layers, the first global and dense, and 32 experts per MoE layer, the
# per-GPU share of 256 experts at expert parallelism 8 (what one GPU holds with its optimizer).
PROD: dict[str, Any] = BENCH | {
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "n_routed_experts": 32,
    "layer_types": ["full_attention"] + ["sliding_attention"] * 3,
    "mlp_layer_types": ["dense"] + ["sparse"] * 3,
}

# The same recipe at test size (the tiny MiMo-V2-Flash of mopd.models.tiny).
TINY: dict[str, Any] = BENCH | {
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 24,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "sliding_window": 8,
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
}


def hf_shapes(layout: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the HF (hub layout) tensors of ``layout``."""
    H, V = layout.hidden_size, layout.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i, (att, moe) in enumerate(zip(layout.attention, layout.moe, strict=True)):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
        a = p + "self_attn."
        shapes[a + "q_proj.weight"] = (layout.num_heads * att.qk_head_dim, H)
        shapes[a + "k_proj.weight"] = (att.num_kv_heads * att.qk_head_dim, H)
        shapes[a + "v_proj.weight"] = (att.num_kv_heads * att.v_head_dim, H)
        shapes[a + "o_proj.weight"] = (H, layout.num_heads * att.v_head_dim)
        if att.sink:
            shapes[a + "attention_sink_bias"] = (layout.num_heads,)
        m = p + "mlp."
        if not moe:
            F = layout.ffn_hidden_size
            shapes |= {m + "gate_proj.weight": (F, H), m + "up_proj.weight": (F, H)}
            shapes[m + "down_proj.weight"] = (H, F)
            continue
        shapes[m + "gate.weight"] = (layout.num_experts, H)
        shapes[m + "gate.e_score_correction_bias"] = (layout.num_experts,)
        In = layout.moe_ffn_hidden_size
        for j in range(layout.num_experts):
            e = f"{m}experts.{j}."
            shapes |= {e + "gate_proj.weight": (In, H), e + "up_proj.weight": (In, H)}
            shapes[e + "down_proj.weight"] = (H, In)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def write_checkpoint(out: Path, config: dict[str, Any], dtype: Any, seed: int) -> int:
    """A random HF checkpoint of ``config``; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    from trainer.megatron.model import layout_from_hf

    layout = layout_from_hf(config)
    gen = torch.Generator().manual_seed(seed)
    std = float(config["initializer_range"])
    tensors, count = {}, 0
    for name, shape in hf_shapes(layout).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith("e_score_correction_bias"):
            t = 0.01 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        # MiMo keeps its router (weight and selection bias) in fp32.
        keep32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        tensors[name] = t.to(torch.float32 if keep32 else dtype).contiguous()
        count += t.numel()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return count


def active_params(layout: Any) -> dict[str, int]:
    """Matmul parameters a token passes through, by part (embedding lookup excluded)."""
    H = layout.hidden_size
    attn = dense = routed = router = 0
    for att, moe in zip(layout.attention, layout.moe, strict=True):
        d, e, g, h = att.qk_head_dim, att.v_head_dim, att.num_kv_heads, layout.num_heads
        attn += H * (h * d + g * d + g * e) + h * e * H
        if moe:
            routed += layout.topk * 3 * H * layout.moe_ffn_hidden_size
            router += layout.num_experts * H
        else:
            dense += 3 * H * layout.ffn_hidden_size
    return {"attention": attn, "dense_mlp": dense, "experts": routed, "router": router,
            "lm_head": layout.vocab_size * H}  # fmt: skip


def forward_flops(layout: Any, lengths: list[int]) -> dict[str, float]:
    """Forward FLOPs of sequences of the given lengths (see the module docstring)."""
    tokens = sum(lengths)
    matmul = 2.0 * tokens * sum(active_params(layout).values())
    attention = 0.0
    for att in layout.attention:
        per_key = 2.0 * layout.num_heads * (att.qk_head_dim + att.v_head_dim)
        for S in lengths:
            if att.window is None:
                keys = S * (S + 1) / 2
            else:
                W = min(att.window, S)
                keys = W * (W + 1) / 2 + (S - W) * W
            attention += per_key * keys
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def micro_batches(trainer: Any, layout: Any, args: argparse.Namespace, step_seed: int) -> list:
    """Synthetic MOPD micro-batches with recorded routes (see the module docstring)."""
    import numpy as np

    from mopd.algo.routing import routes_dtype
    from mopd.types import MicroBatch

    rng = np.random.default_rng(step_seed)
    S, B = args.seq_len, args.seqs_per_micro_batch
    P = S // 4
    L, E, k = len(layout.moe_layer_ids), layout.num_experts, layout.topk
    out = []
    for _ in range(args.micro_batches):
        N = S * B
        mask = np.tile(np.r_[np.zeros(P, bool), np.ones(S - P, bool)], B)
        routes = np.argsort(rng.random((N, L, E), dtype=np.float32), axis=-1)[..., :k]
        out.append(
            MicroBatch(
                tokens_N=rng.integers(3, layout.vocab_size, N, dtype=np.int32),
                cu_seqlens_B1=np.arange(B + 1, dtype=np.int32) * S,
                loss_mask_N=mask,
                logp_rollout_N=np.zeros(N, np.float32),
                adv_orm_B=rng.normal(size=B).astype(np.float32),
                logp_teacher_N=np.zeros(N, np.float32),
                versions_N=np.where(mask, 0, -1).astype(np.int32),
                routes_NLk=routes.astype(routes_dtype(E, library="numpy")),
            )
        )
    # The rollout engine's log-probs: the trainer's own (one forward with R3) plus noise.
    from dataclasses import replace

    logp = trainer.compute_logprobs(out)
    result = []
    for mb, lp in zip(out, logp, strict=True):
        noise = rng.normal(scale=0.05, size=lp.shape).astype(np.float32)
        rollout = np.where(mb.loss_mask_N, lp + noise, 0).astype(np.float32)
        shift = np.abs(rng.normal(scale=0.3, size=lp.shape)).astype(np.float32)
        teacher = np.where(mb.loss_mask_N, rollout - shift, 0).astype(np.float32)
        result.append(replace(mb, logp_rollout_N=rollout, logp_teacher_N=teacher))
    return result


def profile_step(trainer: Any, mbs: list, top: int = 15) -> dict[str, Any]:
    """One step under torch.profiler: its wall time, the time of all CUDA kernels, the ``top``
    kernels by time with their share of kernel time, and the ``top`` CPU-side operators by
    self time (what keeps the GPU waiting when kernels are far below the wall)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        trainer.forward_backward(mbs)
        trainer.optim_step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    kernels = [
        e  # GPU-side ranges such as "Optimizer.step#AdamW.step" overlap their kernels
        for e in averages
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    cpu = sorted(
        (e for e in averages if e.device_type == DeviceType.CPU),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    return {
        "wall_ms": wall * 1e3,  # profiled: slower than the timed steps
        "kernel_ms": total / 1e3,
        "kernels": [
            {
                "name": e.key,
                "cuda_ms": e.self_device_time_total / 1e3,
                "calls": e.count,
                "share": e.self_device_time_total / total,
            }
            for e in kernels[:top]
        ],
        "cpu_ops": [
            {"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in cpu[:top]
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        choices=("bench", "prod", "tiny"),
        default="bench",
        help="bench: the 708M model; prod: a slice of the production shape (32k tokens/step)",
    )
    ap.add_argument("--tiny", action="store_true", help="same as --model tiny (CPU smoke run)")
    ap.add_argument(
        "--profile", action="store_true", help="profile one more step: the top CUDA kernels"
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument(
        "--warmup", type=int, default=6, help="untimed steps first (compiled attention settles)"
    )
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (2048; tiny 32)")
    ap.add_argument(
        "--seqs-per-micro-batch",
        type=int,
        default=None,
        help="sequences per micro-batch (8; tiny 4)",
    )
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--experts", choices=("auto", "grouped", "sequential"), default="auto")
    ap.add_argument("--recompute", action="store_true", help="full activation recompute")
    ap.add_argument("--no-r3", action="store_true", help="routing replay off (own routing)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    args.tiny = args.model == "tiny"
    if args.seq_len is None:
        args.seq_len = {"tiny": 32, "bench": 2048, "prod": 4096}[args.model]
    if args.seqs_per_micro_batch is None:
        args.seqs_per_micro_batch = {"tiny": 4, "bench": 8, "prod": 2}[args.model]
    if args.model == "prod" and "--micro-batches" not in (argv or sys.argv):
        args.micro_batches = 4  # 4 x 8k tokens: 32k per step
    if args.tiny:
        args.steps = min(args.steps, 3)
        args.warmup = min(args.warmup, 1)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    import torch

    from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
    from trainer.megatron.backend import MegatronTrainer
    from trainer.megatron.model import layout_from_hf
    from trainer.megatron.parallel import destroy_parallel

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu (with --tiny)")
    config = dict({"tiny": TINY, "bench": BENCH, "prod": PROD}[args.model])
    layout = layout_from_hf(config)
    bf16 = args.device == "cuda"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mopd-bench-") as tmp:
        ckpt = Path(tmp)
        n_params = write_checkpoint(ckpt, config, torch.bfloat16 if bf16 else torch.float32, 0)
        t_ckpt = time.perf_counter() - t0
        trainer = MegatronTrainer(
            TrainerConfig(
                backend="megatron",
                dtype="bfloat16" if bf16 else "float32",
                lr=1e-5,
                routing_replay=not args.no_r3,
                micro_batch_tokens=args.seq_len * args.seqs_per_micro_batch,
            ),
            ModelConfig(path=str(ckpt)),
            AlgorithmConfig(loss="mopd"),
            experts=args.experts,
            recompute=args.recompute,
        )
        t_build = time.perf_counter() - t0 - t_ckpt

        def sync() -> None:
            if bf16:
                torch.cuda.synchronize()

        if bf16:
            torch.cuda.reset_peak_memory_stats()
        times, metrics = [], {}
        for step in range(args.warmup + args.steps):
            mbs = micro_batches(trainer, layout, args, step_seed=step)
            sync()
            start = time.perf_counter()
            metrics = trainer.forward_backward(mbs)
            metrics |= trainer.optim_step()
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        kernels = None
        if args.profile and bf16:
            mbs = micro_batches(trainer, layout, args, step_seed=args.warmup + args.steps)
            kernels = profile_step(trainer, mbs)
        device_name = torch.cuda.get_device_name() if bf16 else "cpu"
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if bf16 else None
        experts_impl = trainer.experts
        del trainer
        destroy_parallel()

    lengths = [args.seq_len] * (args.seqs_per_micro_batch * args.micro_batches)
    fwd = forward_flops(layout, lengths)
    step_time = sum(times) / len(times)
    tokens = sum(lengths)
    train_flops = 3.0 * fwd["total"]
    hw_flops = train_flops + (fwd["total"] if args.recompute else 0.0)
    active = active_params(layout)
    result = {
        "model": args.model,
        "device": device_name,
        "params": n_params,
        "active_params_per_token": sum(active.values()),
        "active_params": active,
        "experts_impl": experts_impl,
        "recompute": args.recompute,
        "routing_replay": not args.no_r3,
        "tokens_per_step": tokens,
        "step_time_s": step_time,
        "step_times_s": times,
        "tokens_per_s": tokens / step_time,
        "train_tflop_per_step": train_flops / 1e12,
        "attention_share_of_flops": fwd["attention"] / fwd["total"],
        "model_tflops": train_flops / step_time / 1e12,
        "hardware_tflops": hw_flops / step_time / 1e12,
        "mfu": train_flops / step_time / (args.peak_tflops * 1e12),
        "peak_tflops": args.peak_tflops,
        "peak_memory_gib": peak_mem,
        "setup_s": {"checkpoint": t_ckpt, "trainer": t_build},
        "top_kernels": kernels,
        "last_step": {
            k: metrics.get(k)
            for k in ("loss", "grad_norm", "route_agreement", "train_rollout_k3", "entropy")
        },
    }
    print(
        f"{result['model']} MoE, {n_params / 1e6:.0f}M params ({result['active_params_per_token'] / 1e6:.0f}M"
        f" active), {result['experts_impl']} experts, R3 {'on' if not args.no_r3 else 'off'}"
    )
    print(
        f"  {tokens} tokens/step  {step_time * 1e3:.1f} ms/step  {result['tokens_per_s']:.0f} tok/s"
        f"  {result['model_tflops']:.2f} TFLOP/s  MFU {100 * result['mfu']:.2f}% of"
        f" {args.peak_tflops:.0f} TFLOP/s"
    )
    print("  " + json.dumps(result["last_step"]))
    if kernels is not None:
        print(f"  profiled step {kernels['wall_ms']:.1f} ms, kernels {kernels['kernel_ms']:.1f} ms")
        for k in kernels["kernels"]:
            print(f"  {k['share']:6.1%} {k['cuda_ms']:8.2f} ms {k['calls']:5d}x  {k['name'][:90]}")
        print("  CPU self time:")
        for k in kernels["cpu_ops"]:
            print(f"  {k['self_cpu_ms']:8.2f} ms {k['calls']:6d}x  {k['name'][:90]}")
    if result["peak_memory_gib"] is not None:
        print(f"  peak memory {result['peak_memory_gib']:.1f} GiB")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not all(math.isfinite(float(v)) for v in result["last_step"].values() if v is not None):
        raise SystemExit("non-finite training metrics")
    return result


if __name__ == "__main__":
    main()
