"""Fixtures of the trainer tests: tiny checkpoints, a trainer factory, on-policy samples.

``make_samples`` plays the rollout engine: it runs a transformers model (the student itself, a
perturbed copy, ...) on random prompt + response tokens and records what an engine returns,
log-probs of the response tokens and, for MoE models, the experts every MoE layer chose for
every token it ran forward (S - 1 rows, MoE layers only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.models.tiny import build_tiny_checkpoint
from mopd.types import Prompt, RolloutSample, ScoredSample
from trainer.r3_hooks import RoutingReplay
from trainer.torch_backend import TorchTrainer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints: MiMo-V2-Flash (hidden 64, 4 layers, 8 experts top-2),
    Qwen3-MoE, Mixtral and Llama."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        arch: build_tiny_checkpoint(root / arch, arch, seed=0)
        for arch in ("mimo_v2_flash", "qwen3_moe", "mixtral", "llama")
    }


@pytest.fixture
def make_trainer() -> Callable[..., TorchTrainer]:
    """``make_trainer(path, *, algorithm=..., trainer kwargs...)`` -> a CPU TorchTrainer."""

    def make(
        path: Path,
        *,
        algorithm: AlgorithmConfig | None = None,
        model_dtype: str = "auto",
        trainer_kwargs: dict[str, Any] | None = None,
        **cfg: Any,
    ) -> TorchTrainer:
        cfg.setdefault("lr", 1e-3)
        return TorchTrainer(
            TrainerConfig(**cfg),
            ModelConfig(path=str(path), dtype=model_dtype),
            algorithm or AlgorithmConfig(),
            device="cpu",
            **(trainer_kwargs or {}),
        )

    return make


def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def make_samples(
    model: torch.nn.Module,
    n: int,
    *,
    seed: int = 0,
    prompt_len: tuple[int, int] = (2, 7),
    response_len: tuple[int, int] = (2, 9),
    rollout_noise: float = 0.05,
    teacher_shift: float = 0.5,
    routes: bool = True,
    domains: tuple[str, ...] = ("math", "code"),
) -> list[ScoredSample]:
    """n ScoredSamples whose rollout log-probs (and routes) come from ``model``.

    rollout log-probs = the model's + N(0, rollout_noise) (an engine that is close, not equal);
    teacher log-probs = the model's - |N(0, teacher_shift)|; advantages ~ N(0, 1).
    """
    rng = np.random.default_rng(seed)
    r3 = RoutingReplay(model, replay=False)
    out = []
    try:
        for i in range(n):
            P = int(rng.integers(*prompt_len))
            T = int(rng.integers(*response_len))
            tokens = rng.integers(3, 259, P + T)
            with r3.capture() as cap:
                logits = model(input_ids=torch.from_numpy(tokens)[None], use_cache=False).logits[0]
            logp_all = torch.log_softmax(logits[:-1].float(), -1)
            logp_all = logp_all.gather(1, torch.from_numpy(tokens[1:])[:, None])[:, 0].numpy()
            logp_T = logp_all[P - 1 :]
            routes_SLk = cap.routes_NLk()[:-1] if (routes and r3.is_moe) else None
            domain = domains[i % len(domains)]
            prompt = Prompt(
                prompt_id=f"p{seed}-{i}", source="src", domain=domain, input_ids_P=tokens[:P]
            )
            sample = RolloutSample(
                sample_id=f"s{seed}-{i}",
                prompt=prompt,
                response_ids_T=tokens[P:],
                logp_rollout_T=logp_T + rollout_noise * rng.normal(size=T),
                versions_T=np.zeros(T, dtype=np.int32),
                finish_reason="stop",
                routes_SLk=routes_SLk,
            )
            out.append(
                ScoredSample(
                    sample=sample,
                    reward=float(rng.random() > 0.5),
                    advantage=float(rng.normal()),
                    logp_teacher_T=logp_T - np.abs(teacher_shift * rng.normal(size=T)),
                    teacher="t-" + domain,
                )
            )
    finally:
        r3.remove()
    return out


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter's gradient (zeros where None)."""
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
