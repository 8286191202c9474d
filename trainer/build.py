"""``build_trainer``: the one factory that turns ``TrainerConfig.backend`` into a trainer.

Backends are imported lazily, so choosing ``torch`` never imports megatron-core and choosing
``megatron`` never pays for what it does not use:

    torch     trainer.torch_backend.TorchTrainer       (transformers model; CPU, GPU, FSDP2)
    megatron  trainer.megatron.backend.MegatronTrainer (Megatron-core; TP/EP/PP/DP)

Both receive the same three config slices and return an object satisfying
``trainer.base.Trainer``.
"""

from __future__ import annotations

import importlib
from typing import Any

from mopd.config.schema import TRAINER_BACKENDS, AlgorithmConfig, ModelConfig, TrainerConfig
from trainer.base import Trainer

__all__ = ["BACKENDS", "build_trainer"]

# backend name -> (module path, class name), imported only when chosen.
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("trainer.torch_backend", "TorchTrainer"),
    "megatron": ("trainer.megatron.backend", "MegatronTrainer"),
}


def build_trainer(
    trainer_cfg: TrainerConfig,
    model_cfg: ModelConfig,
    algorithm_cfg: AlgorithmConfig,
    **kwargs: Any,
) -> Trainer:
    """Build the trainer ``trainer_cfg.backend`` names; ``kwargs`` go to its constructor
    (e.g. ``device``, ``seed``, ``gradient_checkpointing`` for the torch backend)."""
    backend = trainer_cfg.backend
    if backend not in BACKENDS:
        raise ValueError(
            f"trainer.backend={backend!r}; accepted values: {', '.join(TRAINER_BACKENDS)}"
        )
    module_name, class_name = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = (
            " (install the [megatron] extra: pip install 'mopd[megatron]')"
            if backend == "megatron"
            else ""
        )
        raise ImportError(
            f"trainer.backend={backend!r} could not be imported from {module_name}: {exc}{extra}"
        ) from exc
    cls = getattr(module, class_name)
    trainer = cls(trainer_cfg, model_cfg, algorithm_cfg, **kwargs)
    if not isinstance(trainer, Trainer):
        raise TypeError(f"{module_name}.{class_name} does not implement trainer.base.Trainer")
    return trainer
