"""The scheduler benchmark runs on tiny flags and its numbers obey the invariants it reports."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scheduler.py"

TINY = [
    "--slots", "16", "-G", "4", "--prompts-per-step", "4", "--mu", "3", "--sigma", "1",
    "--max-tokens", "64", "--train-ticks", "20", "--sync-ticks", "5", "--steps", "12",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scheduler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scheduler"] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_scheduler", None)


def _numbers(out: dict) -> dict:
    return {p: {k: v for k, v in r.items() if k != "wall_s"} for p, r in out["results"].items()}


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_tiny_run_obeys_the_invariants(bench, tmp_path, capsys, staleness):
    path = tmp_path / "result.json"
    out = bench.main([*TINY, "--max-staleness", str(staleness), "--json", str(path)])
    assert json.loads(path.read_text()) == out
    table = capsys.readouterr().out
    assert all(p in table for p in ("batch-sync", "fine-grained", "partial"))

    res = out["results"]
    for r in res.values():
        assert r["steps"] == 12
        assert 0 < r["useful_utilisation"] <= r["utilisation"] <= 1
        parts = ("trained", "aborted", "stale", "pending")
        assert sum(r[f"{p}_tokens"] for p in parts) == r["generated_tokens"]
        assert r["staleness_max"] <= staleness
        assert r["partial_share"] <= 0.5
        assert r["samples_per_1k_ticks"] == pytest.approx(1000 * r["trained_samples"] / r["ticks"])

    sync, fine, part = res["batch-sync"], res["fine-grained"], res["partial"]
    assert sync["trained_samples"] == 12 * 16 and sync["staleness_max"] == 0
    assert sync["aborted_tokens"] == sync["stale_tokens"] == sync["pending_tokens"] == 0
    assert fine["partial_share"] == 0 and fine["aborted_tokens"] > 0
    assert part["aborted_tokens"] == 0
    if staleness > 0:  # with 0 no partial sample is ever admissible
        assert part["partial_share"] > 0 and part["spanning_groups"] > 0
    # Rollout that keeps pulling work keeps the slots busier than a batch that waits for its
    # longest response; with a staleness budget of at least one version it also trains more
    # samples per tick (with 0, whatever is generated during training cannot be trained).
    for r in (fine, part):
        assert r["utilisation"] > sync["utilisation"]
        if staleness > 0:
            assert r["samples_per_1k_ticks"] > sync["samples_per_1k_ticks"]
        else:
            assert r["stale_tokens"] > 0


def test_batch_sync_matches_the_closed_form(bench):
    # sigma 0: every response is round(e^mu) = 10 tokens and the 16 slots hold a whole step,
    # so a step is 10 ticks of rollout + 20 of training + 5 of sync (none after the last).
    flags = [
        *TINY, "--mu", str(math.log(10)), "--sigma", "0", "--steps", "3",
        "--policies", "batch-sync",
    ]  # fmt: skip
    r = bench.main(flags)["results"]["batch-sync"]
    assert r["ticks"] == 3 * (10 + 20 + 5) - 5
    assert r["trained_tokens"] == r["generated_tokens"] == 3 * 16 * 10
    assert r["utilisation"] == pytest.approx(3 * 16 * 10 / (16 * 100))
    assert r["mean_trained_length"] == 10


def test_group_refill_leaves_slots_idle(bench):
    # driver.rollout_until's hand-out: a group's finished samples free slots that stay idle
    # until its longest response ends.
    flags = [*TINY, "--policies", "fine-grained", "partial"]
    slot, group = bench.main(flags)["results"], bench.main([*flags, "--refill", "group"])["results"]
    for policy in ("fine-grained", "partial"):
        assert group[policy]["utilisation"] < slot[policy]["utilisation"]


def test_same_seed_same_numbers(bench):
    flags = [*TINY, "--policies", "fine-grained", "partial"]
    assert _numbers(bench.main(flags)) == _numbers(bench.main(flags))
    assert _numbers(bench.main(flags)) != _numbers(bench.main([*flags, "--seed", "1"]))


def test_rejects_an_inflight_budget_below_one_step(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--max-inflight-groups", "3"])
    assert "--max-inflight-groups=3 < --prompts-per-step=4" in capsys.readouterr().err
