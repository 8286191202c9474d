"""Exported weights load with ``from_pretrained`` and reproduce the trainer's logits; the
same-host tensor handoff carries the same tensors under the same names."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mopd.packing import build_micro_batch
from tests.trainer.conftest import load_hf, make_samples
from trainer import checkpoint as ckpt
from trainer.export import (
    INDEX_FILE,
    VERSION_FILE,
    checkpoint_state_dict,
    export_hf_checkpoint,
    read_export_version,
    serialize_named_tensors,
)


def _trained(make_trainer, path, **cfg):
    """A trainer whose weights moved away from the source checkpoint (one step)."""
    trainer = make_trainer(path, lr=5e-2, **cfg)
    mb = build_micro_batch(make_samples(load_hf(path), 3, seed=30))
    trainer.forward_backward([mb])
    trainer.optim_step()
    return trainer


def _saved_keys(directory):
    index = json.loads((directory / INDEX_FILE).read_text())
    return set(index["weight_map"]), index


@pytest.mark.parametrize("arch", ["mimo_v2_flash", "mixtral"])
def test_export_round_trip(tiny_models, make_trainer, tmp_path, arch):
    source = tiny_models[arch]
    trainer = _trained(make_trainer, source)
    trainer.export_max_shard_size = 60_000  # force several shards
    out = trainer.export_weights(tmp_path / "v1", trainer.version)

    assert ckpt.is_committed(out) and read_export_version(out) == 1
    assert json.loads((out / VERSION_FILE).read_text()) == {"version": 1}
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    keys, index = _saved_keys(out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert set(index["weight_map"].values()) == set(shards)
    # Checkpoint naming: exactly the tensor names of the source checkpoint (for Mixtral the
    # fused expert tensors are split back into per-expert w1/w2/w3).
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())

    reloaded = load_hf(out)
    tokens = torch.arange(3, 40)[None]
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(input_ids=tokens).logits
        theirs = reloaded(input_ids=tokens).logits
        source_logits = load_hf(source)(input_ids=tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, source_logits, atol=1e-3)  # the step changed the weights


def test_bf16_export_keeps_fp32_routers(tiny_models, make_trainer, tmp_path):
    trainer = make_trainer(tiny_models["mimo_v2_flash"], model_dtype="bfloat16")
    out = trainer.export_weights(tmp_path / "bf16", 0)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    dtypes = {}
    for shard in out.glob("model-*.safetensors"):
        dtypes |= {k: v.dtype for k, v in load_file(str(shard)).items()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["model.layers.1.self_attn.q_proj.weight"] == torch.bfloat16


def test_export_failure_keeps_the_previous_export(tiny_models, make_trainer, tmp_path):
    trainer = make_trainer(tiny_models["llama"])
    out = trainer.export_weights(tmp_path / "current", 0)
    with pytest.raises(ValueError, match="version"):
        export_hf_checkpoint(trainer.model, tmp_path / "current", -1)
    with pytest.raises(FileNotFoundError, match="source checkpoint"):
        export_hf_checkpoint(trainer.model, tmp_path / "current", 2, source_dir=tmp_path / "nope")
    assert read_export_version(out) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["current"]


def test_handoff_tensors_match_the_export(tiny_models, make_trainer, tmp_path):
    trainer = _trained(make_trainer, tiny_models["mixtral"])
    out = trainer.export_weights(tmp_path / "disk", 1)
    on_disk = {}
    for shard in out.glob("model-*.safetensors"):
        on_disk |= load_file(str(shard))
    named = dict(trainer.handoff_weights("checkpoint"))
    assert named.keys() == on_disk.keys()
    assert all(torch.equal(named[k], on_disk[k]) for k in named)
    # Private copies: the handoff never aliases a live parameter.
    live = {p.data_ptr() for p in trainer.model.parameters()}
    assert not any(t.data_ptr() in live for t in named.values())

    # Module naming loads straight into a fresh model.
    fresh = load_hf(tiny_models["mixtral"])
    fresh.load_state_dict(dict(trainer.handoff_weights("state_dict")))
    with torch.no_grad():
        for (n, a), b in zip(fresh.named_parameters(), trainer.model.parameters()):
            assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="naming"):
        trainer.handoff_weights("hub")


def test_serialized_handoff_crosses_processes(tiny_models, make_trainer, tmp_path):
    """The payloads of /update_weights_from_tensor, decoded by two other processes (two
    servers of one sync), three times: later syncs rewrite the same buffers in place."""
    trainer = make_trainer(tiny_models["llama"])
    strategy = torch.multiprocessing.get_sharing_strategy()
    if strategy != "file_system":
        named = checkpoint_state_dict(trainer.model)
        with pytest.raises(ValueError, match="file_system"):
            serialize_named_tensors(list(named.items()))  # refused, with the fix in the message
    code = textwrap.dedent(
        """
        import pickle, sys, torch
        from safetensors.torch import save_file
        named = pickle.loads(open(sys.argv[1], "rb").read())
        save_file({n: t.clone() for n, t in named}, sys.argv[2])
        """
    )
    try:
        for sync in range(3):
            named = {k: v.clone() for k, v in checkpoint_state_dict(trainer.model).items()}
            # One payload per receiver; the trainer keeps the tensors alive.
            payloads = trainer.serialized_weights("checkpoint", receivers=2)
            for i, payload in enumerate(payloads):
                (tmp_path / f"payload{i}.bin").write_bytes(payload)
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        code,
                        str(tmp_path / f"payload{i}.bin"),
                        str(tmp_path / f"got{i}.safetensors"),
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i in range(2)
            ]
            for proc in procs:
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
            for i in range(2):
                got = load_file(str(tmp_path / f"got{i}.safetensors"))
                assert got.keys() == named.keys()
                assert all(torch.equal(got[k], named[k]) for k in named), (sync, i)
            with torch.no_grad():  # the trainer moves on: the next sync must carry it
                for p in trainer.model.parameters():
                    p.add_(1.0)
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
