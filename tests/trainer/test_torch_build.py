"""build_trainer picks the backend lazily; TrainerActor only forwards the protocol calls.

The actor class is exercised in-process (it is a plain class that Ray wraps): starting a local
Ray cluster here takes ~20 s on two busy cores, more than the forwarding is worth testing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mopd.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from mopd.packing import build_micro_batch
from tests.trainer.conftest import load_hf, make_samples
from trainer.actor import TrainerActor
from trainer.base import Trainer
from trainer.build import BACKENDS, build_trainer
from trainer.export import read_export_version
from trainer.torch_backend import TorchTrainer


def test_build_torch_trainer(tiny_models):
    trainer = build_trainer(
        TrainerConfig(backend="torch"),
        ModelConfig(path=str(tiny_models["llama"])),
        AlgorithmConfig(loss="sft"),
        device="cpu",
        seed=1,
    )
    assert isinstance(trainer, TorchTrainer) and isinstance(trainer, Trainer)
    assert BACKENDS["megatron"] == ("trainer.megatron.backend", "MegatronTrainer")


def test_unknown_backend_is_named():
    with pytest.raises(
        ValueError, match=r"trainer\.backend='jax'; accepted values: torch, megatron"
    ):
        build_trainer(TrainerConfig(backend="jax"), ModelConfig(path="x"), AlgorithmConfig())


def test_importing_the_factory_imports_no_backend():
    code = (
        "import sys, trainer.build, trainer.actor\n"
        "heavy = [m for m in sys.modules if m.startswith(('megatron', 'trainer.megatron', "
        "'trainer.torch_backend', 'transformers'))]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_actor_forwards_the_protocol(tiny_models, tmp_path):
    path = tiny_models["mimo_v2_flash"]
    actor = TrainerActor(
        TrainerConfig(lr=1e-2), ModelConfig(path=str(path)), AlgorithmConfig(), device="cpu"
    )
    mb = build_micro_batch(make_samples(load_hf(path), 3, seed=40))
    assert actor.version() == 0
    metrics = actor.forward_backward([mb])
    assert metrics["num_samples"] == 3
    assert actor.optim_step()["version"] == 1 and actor.version() == 1
    saved = actor.save(tmp_path / "ckpt")
    out = actor.export_weights(tmp_path / "export", actor.version())
    assert read_export_version(out) == 1
    actor.forward_backward([mb])
    actor.optim_step()
    actor.load(saved)
    assert actor.version() == 1
