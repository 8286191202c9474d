"""The GPU benchmark's CPU smoke mode runs end to end (so the script the GPU run uses works)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "megatron.core", reason="needs the [megatron] extra: pip install -e '.[megatron]'"
)
torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_megatron_gpu.py"


def test_tiny_cpu_run_reports_throughput_and_mfu(tmp_path, monkeypatch):
    # --device cpu hides GPUs from this process: keep that to this test.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = importlib.util.spec_from_file_location("bench_megatron_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    result = bench.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--json", str(out)]
    )
    assert out.is_file()
    assert result["tokens_per_step"] == 32 * 4 and result["tokens_per_s"] > 0
    assert result["routing_replay"] and 0 < result["mfu"] < 1
    # Random routes replayed: Megatron's own top-2 of 8 experts agrees about 2/8 of the time.
    assert 0.1 < result["last_step"]["route_agreement"] < 0.45
    assert all(math.isfinite(v) for v in result["last_step"].values())
    # FLOP accounting: 3 x forward, matmuls = 2 x tokens x active parameters.
    from trainer.megatron.model import layout_from_hf

    layout = layout_from_hf(bench.TINY)
    fwd = bench.forward_flops(layout, [32] * 4)
    assert fwd["matmul"] == 2 * 128 * result["active_params_per_token"]
    assert result["train_tflop_per_step"] * 1e12 == 3 * fwd["total"]
