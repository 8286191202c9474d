"""mopd vs Hugging Face TRL on the same on-policy distillation job, side by side in one run.

The job (issue 14): a random MiMo-V2-Flash student (hidden 64, 7 layers, 8 experts top-2) and
a teacher (hidden 128) saved as HF checkpoints with one character tokenizer (77 ids), 256
prompts ``AB+CD=`` with their sums as answers, one sample per prompt, up to 16 new tokens at
temperature 1, lr 1e-4, fp32, 2 torch threads, 30 optimizer steps; steps 5-30 are measured.
tokens/s = (prompt + completion tokens of the measured steps) / the wall time from the end of
step 4 to the end of step 30.

- TRL: ``trl.DistillationTrainer`` (reverse KL over the full vocabulary, always on-policy, one
  process), run by ``benchmarks/trl_distill.py`` in the Python that has TRL (``--trl-python``;
  e.g. ``python3 -m venv .trl && .trl/bin/pip install -c constraints.txt trl==1.16.0``).
- mopd: ``mopd train`` with MOPD at alpha 0 (the teacher term only), one domain, one teacher,
  everything embedded (engine servers, PyTorch trainer, Redis, local MLflow), sync mode
  (strictly on-policy), for each ``--teacher-kl`` mode. Step times come from the run's MLflow
  metrics (their timestamps: everything between two steps is counted).

Runs alternate (TRL, mopd topk, mopd sampled, ...) for ``--repeats`` rounds; the table shows the
range over repeats and the ratio of the medians. The JSON (``--json``) records the machine,
the commit, the command and every run's per-step figures and teacher log-ratio curve.

    python benchmarks/bench_vs_trl.py --trl-python .trl/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHARS = string.digits + string.ascii_letters + " +-=*/().,?"  # 73 characters + 4 specials = 77 ids

SIZES = {
    # name: (student overrides, teacher overrides)
    "small": ({"hidden_size": 64}, {"hidden_size": 128}),
    "large": (
        {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128},
        {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256},
    ),
}
LAYERS = dict(
    num_hidden_layers=7,
    layer_types=["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]
    + ["sliding_attention"] * 2,
    mlp_layer_types=["dense"] + ["sparse"] * 6,
    n_routed_experts=8,
    num_experts_per_tok=2,
)  # fmt: skip


def write_job(work: Path, size: str, seed: int = 0) -> dict[str, Path]:
    """Student and teacher checkpoints (one tokenizer) and the prompts file, in ``work``."""
    from mopd.models.tiny import build_tiny_checkpoint

    student_kw, teacher_kw = SIZES[size]
    paths = {"student": work / f"{size}-student", "teacher": work / f"{size}-teacher"}
    texts = [CHARS]
    build_tiny_checkpoint(
        paths["student"], seed=seed, tokenizer_texts=texts, **LAYERS, **student_kw
    )
    build_tiny_checkpoint(
        paths["teacher"], seed=seed + 1, tokenizer_texts=texts, **LAYERS, **teacher_kw
    )
    import random

    rng = random.Random(seed)
    paths["prompts"] = work / "prompts.jsonl"
    with open(paths["prompts"], "w") as f:
        for _ in range(256):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return paths


def num_params(path: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def measured(steps: list[tuple[float, float]], start: int) -> dict[str, float]:
    """tokens/s and mean step time over steps ``start``..end from (end time, tokens) pairs
    (step 1 first): the wall time from the end of step ``start - 1`` to the last step."""
    ends = [t for t, _ in steps]
    window = steps[start - 1 :]
    wall = ends[-1] - ends[start - 2]
    tokens = sum(n for _, n in window)
    return {"tokens_per_s": tokens / wall, "step_s": wall / len(window), "tokens": tokens}


def run_trl(args, paths: dict[str, Path], per_step: int, out_dir: Path) -> dict:
    out = out_dir / f"trl-{per_step}.json"
    cmd = [
        args.trl_python, str(ROOT / "benchmarks" / "trl_distill.py"),
        "--student", str(paths["student"]), "--teacher", str(paths["teacher"]),
        "--prompts", str(paths["prompts"]), "--per-step", str(per_step),
        "--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens),
        "--lr", str(args.lr), "--threads", str(args.threads), "--out", str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(args), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    data = json.loads(out.read_text())
    steps = [(s["end_s"], s["tokens"]) for s in data["steps"]]
    return {"process_wall_s": wall, **measured(steps, args.measure_from)}


def mopd_config(
    args, paths: dict[str, Path], per_step: int, kl: str, out_dir: Path, name: str
) -> Path:
    cfg = {
        "run": {"name": name, "seed": 0, "output_dir": str(out_dir / name)},
        "model": {"path": str(paths["student"]), "dtype": "float32"},
        "rollout": {
            "backend": "embedded", "num_servers": args.servers, "max_running_requests": max(64, per_step),
            "return_routed_experts": True, "weight_sync": args.weight_sync,
            "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        },
        "teachers": [{
            "name": "teacher", "model": str(paths["teacher"]), "domains": ["arithmetic"],
            "num_servers": args.servers,
            "top_logprobs": 16 if kl == "topk" else 0,
        }],
        "data": {"sources": [{
            "name": "sums", "domain": "arithmetic", "kind": "jsonl", "path": str(paths["prompts"]),
            "reward": "exact_match", "group_size": 1, "num_eval_prompts": 0,
        }]},
        "algorithm": {"loss": "mopd", "alpha": 0.0, "teacher_kl": kl},
        "scheduler": {"mode": "sync", "prompts_per_step": per_step, "max_inflight_groups": max(16, per_step)},
        "trainer": {
            "backend": "torch", "steps": args.steps, "lr": args.lr, "warmup_steps": 0,
            "micro_batch_tokens": 8192, "routing_replay": True, "dtype": "float32",
            "checkpoint_every": args.steps,
        },
        "tracking": {"experiment": "bench-vs-trl"},
        "cluster": {"num_cpus": args.threads},
    }  # fmt: skip
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_mopd(
    args, paths: dict[str, Path], per_step: int, kl: str, out_dir: Path, root: Path = ROOT
) -> dict:
    """One ``mopd train`` run of the code at ``root`` (this checkout, or ``--baseline-root``)."""
    import shutil

    # One folder per run and code: MLflow caches its store per tracking URI, so a folder
    # reused within this process would be read from the cached (deleted) database.
    name = f"{'mopd' if root == ROOT else 'base'}-{per_step}-{kl}"
    cfg = mopd_config(args, paths, per_step, kl, out_dir, name)
    run_dir = out_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "mopd.cli", "train", str(cfg)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(args, root), stdout=subprocess.DEVNULL, cwd=root,
                   stderr=subprocess.DEVNULL if not args.verbose else None)  # fmt: skip
    wall = time.perf_counter() - t0
    history = _mlflow_history(run_dir)
    prompt_tokens = _prompt_tokens(paths, run_dir)
    steps = []
    for step in range(1, args.steps + 1):
        ts = history["time/step_s"][step][0]
        completion = history["rollout/response_length/arithmetic"][step][1] * per_step
        steps.append((ts, prompt_tokens * per_step + completion))
    out = {"process_wall_s": wall, **measured(steps, args.measure_from)}
    ratio = history.get("teacher_log_ratio", {})
    out["teacher_log_ratio"] = [ratio[s][1] for s in sorted(ratio)]
    phases = {k: v for k, v in history.items() if k.startswith("time/")}
    out["phase_s"] = {
        k: statistics.mean(v[s][1] for s in range(args.measure_from, args.steps + 1) if s in v)
        for k, v in phases.items()
    }
    return out


def _prompt_tokens(paths: dict[str, Path], run_dir: Path) -> int:
    """Tokens of one prompt as the run feeds it (all prompts ``AB+CD=`` have the same length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paths["student"]))
    return len(tok("12+34=")["input_ids"])


def _mlflow_history(run_dir: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """metric -> step -> (timestamp in s, value) of the one run in ``run_dir``'s store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "bench-vs-trl"]
    [run] = client.search_runs([exp.experiment_id])
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for key in run.data.metrics:
        out[key] = {
            m.step: (m.timestamp / 1000.0, m.value)
            for m in client.get_metric_history(run.info.run_id, key)
        }
    return out


def _env(args, root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(root))  # fmt: skip
    return env


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return (
        format(lo, fmt) if lo == hi or len(values) == 1 else f"{format(lo, fmt)}-{format(hi, fmt)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--trl-python",
        default=os.environ.get("TRL_PYTHON", sys.executable),
        help="a Python with trl installed (default: $TRL_PYTHON or this one)",
    )
    p.add_argument("--prompts", type=int, nargs="+", default=[8, 64], help="prompts per step")
    p.add_argument("--sizes", nargs="+", default=["small"], choices=sorted(SIZES))
    p.add_argument(
        "--teacher-kl", nargs="+", default=["topk", "sampled"], choices=["topk", "sampled"]
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--measure-from", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-sync", default="tensor", choices=["disk", "tensor"])
    p.add_argument("--servers", type=int, default=1, help="rollout servers, and teacher servers")
    p.add_argument("--skip-trl", action="store_true", help="run mopd only (profiling)")
    p.add_argument(
        "--baseline-root",
        type=Path,
        help="another checkout of mopd (e.g. the commit before a change) to run side "
        "by side as 'base-<kl>' (its first --teacher-kl mode)",
    )
    p.add_argument("--work", help="folder for checkpoints and runs (default: a temporary one)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--verbose", action="store_true", help="show mopd's output")
    args = p.parse_args()
    if args.measure_from < 2 or args.measure_from > args.steps:
        p.error("--measure-from must be in [2, --steps]")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": _commit(),
              "machine": _machine(), "job": vars(args) | {"work": None}, "rows": []}  # fmt: skip
    for size in args.sizes:
        paths = write_job(work / size, size)
        params = {k: num_params(paths[k]) for k in ("student", "teacher")}
        results: dict[tuple[int, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for per_step in args.prompts:
                systems = ([] if args.skip_trl else ["trl"]) + [
                    f"mopd-{kl}" for kl in args.teacher_kl
                ]
                if args.baseline_root:
                    systems.append(f"base-{args.teacher_kl[0]}")
                for system in systems:
                    out_dir = work / size / f"r{repeat}"
                    out_dir.mkdir(parents=True, exist_ok=True)
                    if system == "trl":
                        r = run_trl(args, paths, per_step, out_dir)
                    elif system.startswith("base-"):
                        r = run_mopd(args, paths, per_step, system.split("-", 1)[1], out_dir,
                                     root=args.baseline_root.resolve())  # fmt: skip
                    else:
                        r = run_mopd(args, paths, per_step, system.split("-", 1)[1], out_dir)
                    results.setdefault((per_step, system), []).append(r)
                    print(f"[{size} r{repeat}] {system:13s} prompts={per_step:3d} "
                          f"{r['tokens_per_s']:8.0f} tok/s  step {r['step_s']:.3f} s  "
                          f"process {r['process_wall_s']:.1f} s", flush=True)  # fmt: skip
        for per_step in args.prompts:
            row = {"size": size, "params": params, "prompts_per_step": per_step, "systems": {}}
            for (n, system), runs in results.items():
                if n == per_step:
                    row["systems"][system] = runs
            record["rows"].append(row)
    record["machine"]["load_avg_end"] = os.getloadavg()

    print(
        "\n| size | prompts/step | system | tokens/s | step s | process s | mopd / TRL (medians) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in record["rows"]:
        trl = row["systems"].get("trl")
        base = statistics.median(r["tokens_per_s"] for r in trl) if trl else None
        for system, runs in row["systems"].items():
            tps = [r["tokens_per_s"] for r in runs]
            ratio = f"{statistics.median(tps) / base:.2f}" if base and system != "trl" else ""
            print(f"| {row['size']} ({row['params']['student'] / 1e6:.2f}M / {row['params']['teacher'] / 1e6:.2f}M) "
                  f"| {row['prompts_per_step']} | {system} | {_range(tps, ',.0f')} "
                  f"| {_range([r['step_s'] for r in runs], '.3f')} "
                  f"| {_range([r['process_wall_s'] for r in runs], '.0f')} | {ratio} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
