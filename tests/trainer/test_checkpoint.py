"""Checkpoints are atomic (an interrupted save never loads) and exact (a resumed run equals
the uninterrupted one)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mopd.packing import pack_micro_batches
from tests.trainer.conftest import load_hf, make_samples, max_diff, params
from trainer import checkpoint as ckpt

# ------------------------------------------------------------------ the directory protocol


def test_commit_is_atomic_and_marked(tmp_path):
    final = ckpt.checkpoint_dir(tmp_path, 3)
    with ckpt.atomic_dir(final, meta={"step": 3}) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 10)
        assert not final.exists() and not ckpt.is_committed(tmp)
    assert ckpt.is_committed(final) and (final / "weights.bin").read_bytes() == b"x" * 10
    assert ckpt.read_marker(final)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]  # no temp left behind
    # Re-saving the same step replaces it as a whole.
    with ckpt.atomic_dir(final, meta={"step": 3, "again": True}) as tmp:
        (tmp / "other.bin").write_bytes(b"y")
    assert sorted(p.name for p in final.iterdir()) == ["COMMITTED", "other.bin"]


def test_failure_inside_the_writer_leaves_the_previous_checkpoint(tmp_path):
    good = ckpt.checkpoint_dir(tmp_path, 1)
    with ckpt.atomic_dir(good) as tmp:
        (tmp / "a").write_text("1")
    with (
        pytest.raises(OSError, match="disk full"),
        ckpt.atomic_dir(ckpt.checkpoint_dir(tmp_path, 2)) as tmp,
    ):
        (tmp / "a").write_text("half")
        raise OSError("disk full")
    assert not ckpt.checkpoint_dir(tmp_path, 2).exists()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == [good.name]


def test_killed_writer_leaves_nothing_loadable(tmp_path):
    good = ckpt.checkpoint_dir(tmp_path, 1)
    with ckpt.atomic_dir(good) as tmp:
        (tmp / "a").write_text("1")
    # A process killed mid-save (no exception handler runs): os._exit inside the writer.
    code = textwrap.dedent(
        f"""
        import os
        from trainer import checkpoint as ckpt
        with ckpt.atomic_dir(ckpt.checkpoint_dir({str(tmp_path)!r}, 2)) as tmp:
            (tmp / "a").write_text("half")
            os._exit(9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 9
    leftovers = [p for p in tmp_path.iterdir() if p != good]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".step_00000002.tmp-")
    with pytest.raises(ValueError, match="no COMMITTED marker"):
        ckpt.require_committed(leftovers[0])
    assert ckpt.latest_checkpoint(tmp_path) == good
    # A directory with the final name but no marker (e.g. copied by hand) is refused too.
    fake = ckpt.checkpoint_dir(tmp_path, 5)
    fake.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="interrupted"):
        ckpt.require_committed(fake)


# ------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def steps(tiny_models):
    """Three steps of micro-batches (different samples each), two micro-batches per step."""
    hf = load_hf(tiny_models["mimo_v2_flash"])
    out = []
    for s in range(3):
        (mbs,) = pack_micro_batches(make_samples(hf, 5, seed=20 + s), micro_batch_tokens=40)
        out.append(mbs)
    return out


CFG = dict(lr=2e-2, lr_schedule="cosine", warmup_steps=1, steps=4, weight_decay=0.1)


def _step(trainer, mbs):
    m = trainer.forward_backward(mbs)
    m |= trainer.optim_step()
    return m


def test_resume_is_exact(tiny_models, make_trainer, steps, tmp_path):
    path = tiny_models["mimo_v2_flash"]
    straight = make_trainer(path, **CFG)
    for mbs in steps[:2]:
        _step(straight, mbs)

    first = make_trainer(path, **CFG)
    for mbs in steps[:2]:
        _step(first, mbs)
    saved = first.save(ckpt.checkpoint_dir(tmp_path, first.version))
    assert ckpt.latest_checkpoint(tmp_path) == saved
    assert json.loads((saved / "trainer_state.json").read_text())["version"] == 2
    rng_after_save = (torch.rand(3), np.random.rand(), random.random())
    m_straight = _step(straight, steps[2])

    resumed = make_trainer(path, **CFG)
    torch.manual_seed(123)  # scramble the RNGs: load must restore them
    resumed.load(saved)
    assert resumed.version == 2
    assert torch.equal(torch.rand(3), rng_after_save[0])
    assert np.random.rand() == rng_after_save[1] and random.random() == rng_after_save[2]
    m_resumed = _step(resumed, steps[2])

    assert m_resumed["loss"] == pytest.approx(m_straight["loss"], abs=1e-7)
    assert m_resumed["lr"] == m_straight["lr"] and m_resumed["version"] == 3
    assert max_diff(params(resumed.model), params(straight.model)) <= 1e-7
    # The weights moved during the step, so the comparison is not vacuous.
    assert max_diff(params(resumed.model), params(first.model)) > 1e-4


def test_failed_save_is_never_loaded(tiny_models, make_trainer, steps, tmp_path, monkeypatch):
    path = tiny_models["mimo_v2_flash"]
    trainer = make_trainer(path, **CFG)
    good = trainer.save(ckpt.checkpoint_dir(tmp_path, 0))
    trainer.forward_backward(steps[0])
    trainer.optim_step()

    import trainer.torch_backend as backend

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError("simulated crash while writing the optimizer state")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(backend.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save(ckpt.checkpoint_dir(tmp_path, 1))
    monkeypatch.undo()
    assert not ckpt.checkpoint_dir(tmp_path, 1).exists()
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert ckpt.latest_checkpoint(tmp_path) == good
    fresh = make_trainer(path, **CFG)
    fresh.load(ckpt.latest_checkpoint(tmp_path))
    assert fresh.version == 0
    with pytest.raises(FileNotFoundError):
        fresh.load(ckpt.checkpoint_dir(tmp_path, 1))
