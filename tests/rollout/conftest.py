"""Shared fixtures: tiny random checkpoints (built once per session) and reference forwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from mopd.models.tiny import build_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints: MiMo-V2-Flash student (seed 0) and teacher (seed 1), Qwen3-MoE, Llama."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {
        "mimo": build_tiny_checkpoint(root / "mimo", "mimo_v2_flash", seed=0),
        "mimo_teacher": build_tiny_checkpoint(root / "mimo_teacher", "mimo_v2_flash", seed=1),
        "qwen3_moe": build_tiny_checkpoint(root / "qwen3_moe", "qwen3_moe", seed=0),
        "llama": build_tiny_checkpoint(root / "llama", "llama", seed=0),
    }


class Reference:
    """A plain transformers forward of a checkpoint: what the engine must reproduce."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.top_k = getattr(cfg, "num_experts_per_tok", 0)

    @torch.no_grad()
    def forward(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [T, V] and router top-k ids [T, L, k] (zeros for dense layers)."""
        picked: dict[int, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(self.model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                handles.append(
                    gate.register_forward_hook(
                        lambda _m, _i, out, i=i: picked.__setitem__(i, out[2].clone())
                    )
                )
        try:
            logits = self.model(torch.tensor([tokens])).logits[0].float()
        finally:
            for h in handles:
                h.remove()
        routes = torch.zeros((len(tokens), self.num_layers, max(self.top_k, 1)), dtype=torch.int32)
        for i, idx in picked.items():
            routes[:, i] = idx.to(torch.int32)
        return logits, routes


@pytest.fixture(scope="session")
def reference(tiny_ckpts):
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = Reference(tiny_ckpts[name])
        return cache[name]

    return get


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, args: list[str], log: Path) -> Iterator[tuple[str, int]]:
    """A real ``python -m rollout.server`` subprocess on a free loopback port, healthy, with
    its output in ``log``; yields its base URL and port and stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "rollout.server", "--model-path", str(model)]
    cmd += ["--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(log.read_text()[-3000:])
            time.sleep(0.3)
        yield base, port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
