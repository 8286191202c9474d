"""A teacher-RL run and a MOPD run whose data source is the code-repair environment: trajectories with tools
in sandboxes, rewards set by the environment, observation tokens masked out of the loss."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

from envs.agentic import TASKS_DIR
from mopd.config import load_config
from mopd.models.tiny import build_tiny_checkpoint
from mopd.run import train, trained_sample_ids

pytestmark = pytest.mark.timeout(900)


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mopd-sandbox-*")}


@pytest.mark.parametrize("loss", ["rl", "mopd"])
def test_run_on_the_code_repair_environment(tmp_path: Path, loss: str):
    # The agent prompt (tool specs) is ~1k byte-level tokens: a longer context than the default.
    student = build_tiny_checkpoint(
        tmp_path / "student", "mimo_v2_flash", seed=0, max_position_embeddings=4096
    )
    out = tmp_path / "run"
    cfg = {
        "run": {"name": "agentic", "output_dir": str(out), "seed": 3},
        "model": {"path": str(student), "dtype": "float32"},
        "rollout": {"max_running_requests": 8, "sampling": {"max_new_tokens": 8}},
        "data": {
            "sources": [
                {
                    "name": "repair",
                    "domain": "code",
                    "kind": "jsonl",
                    "path": str(TASKS_DIR / "code_repair.jsonl"),
                    "reward": "agentic",
                    "group_size": 2,
                    "max_prompt_tokens": 4096,
                    "dynamic_sampling": False,
                }
            ]
        },
        "agent": {"pool_size": 4, "max_turns": 2, "max_tokens_per_turn": 8},
        "algorithm": {"loss": loss},
        "scheduler": {"prompts_per_step": 2, "max_inflight_groups": 4},
        "trainer": {"steps": 2, "lr": 1e-4, "checkpoint_every": 2, "micro_batch_tokens": 4096},
        "cluster": {"num_cpus": 2},
        "tracking": {"enabled": False},
    }
    if loss == "mopd":  # the student itself as the code teacher: the log-ratio starts at 0
        cfg["teachers"] = [{"name": "code-teacher", "model": str(student), "domains": ["code"]}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sandboxes_before = _sandbox_dirs()
    metrics = train(load_config(path))
    # The run closed its Toolbox: no sandbox it made is left in the temporary directory.
    assert _sandbox_dirs() - sandboxes_before == set()
    ids = trained_sample_ids(out)
    assert len(ids) == 2 * 2 * 2 and len(set(ids)) == len(ids)
    assert metrics["agent/trajectories"] >= 8 and metrics["agent/turns"] >= 8
    assert metrics["rollout/reward/code"] == 0.0  # a random model repairs nothing
    if loss == "mopd":
        # The teacher scored every generated token (tool output carries no loss): the same
        # weights as the rollout, so the log-ratio is ~0 on the trained tokens.
        assert abs(metrics["teacher_log_ratio/code"]) < 0.05
