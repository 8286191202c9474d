"""``TrainerActor``: a Ray actor that holds one trainer and forwards the protocol calls.

Nothing happens here but forwarding: the backend is built by ``build_trainer`` inside the
actor's process (so its device and threads belong to the actor) and every method calls the
trainer method of the same name. ``version`` is a method here because Ray calls methods, not
properties.

    actor = ray.remote(num_gpus=1)(TrainerActor).remote(trainer_cfg, model_cfg, algorithm_cfg)
    metrics = ray.get(actor.forward_backward.remote(micro_batches))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.types import MicroBatch
from trainer.build import build_trainer

__all__ = ["TrainerActor"]


class TrainerActor:
    """Forwards ``trainer.base.Trainer`` calls to the backend built from the config slices."""

    def __init__(
        self,
        trainer_cfg: TrainerConfig,
        model_cfg: ModelConfig,
        algorithm_cfg: AlgorithmConfig,
        **kwargs: Any,
    ) -> None:
        self._trainer = build_trainer(trainer_cfg, model_cfg, algorithm_cfg, **kwargs)

    def version(self) -> int:
        return self._trainer.version

    def pid(self) -> int:
        """The actor's process id (runs record it to stop or fault-test the trainer by pid)."""
        return os.getpid()

    def forward_backward(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        return self._trainer.forward_backward(micro_batches)

    def optim_step(self) -> dict[str, float]:
        return self._trainer.optim_step()

    def save(self, path: str | Path) -> Path:
        return self._trainer.save(path)

    def load(self, path: str | Path) -> None:
        self._trainer.load(path)

    def export_weights(self, path: str | Path, version: int) -> Path:
        return self._trainer.export_weights(path, version)

    def serialized_weights(self, naming: str = "checkpoint", receivers: int = 1) -> list[bytes]:
        """Same-host weight handoff (``/update_weights_from_tensor``), where the backend has it:
        one payload per receiving server. ``naming``: checkpoint (hub) names, or state_dict
        names (an embedded engine loads those without converting)."""
        if not hasattr(self._trainer, "serialized_weights"):
            raise NotImplementedError(
                f"{type(self._trainer).__name__} has no same-host tensor handoff; "
                "use rollout.weight_sync=disk"
            )
        return self._trainer.serialized_weights(naming, receivers)
