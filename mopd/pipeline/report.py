"""The pipeline's report: the results table of held-out accuracy, results.json and the plot.

After the last stage the pipeline reads the held-out accuracies back from the stages' MLflow
runs (every attempt of a resumed stage, nested under the pipeline's parent run) and builds one
table: per domain, the SFT student, each teacher on its own domain, the MOPD student, and MOPD
minus the best teacher. It is printed and written to the pipeline's folder (``results.md``,
``results.json``), logged to the parent run as ``result/...`` metrics and artifacts, with
``mopd_progress.png`` (per-domain accuracy and teacher log-ratio over the MOPD steps). Every
stage evaluates on the same held-out prompts, so the columns compare like with like.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mopd.config.pipeline import PipelineConfig, Plan
from mopd.tracking import MLflowTracker

if TYPE_CHECKING:
    from mopd.pipeline.runner import StageResult

__all__ = ["PLOT_PNG", "RESULTS_JSON", "RESULTS_MD", "format_table", "plot_mopd", "write_results"]

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PLOT_PNG = "mopd_progress.png"

History = dict[str, list[tuple[int, float]]]
"""Metric key -> (step, value) pairs of one stage, sorted by step."""
Rows = dict[str, dict[str, float | None]]
"""Model (sft, teacher-<domain>, mopd) -> domain -> held-out accuracy (None: no number)."""


def _stage_histories(client: Any, experiment_id: str, parent_id: str, run_name: str) -> History:
    """Metric histories of a stage, over every MLflow run it had (a resumed stage has one
    run per attempt), sorted by step; a later attempt wins at the same step."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
        f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time ASC"],
    )
    merged: dict[str, dict[int, float]] = {}
    for run in runs:
        for key in run.data.metrics:
            if not key.startswith(("eval/accuracy/", "teacher_log_ratio/")):
                continue
            for m in client.get_metric_history(run.info.run_id, key):
                merged.setdefault(key, {})[int(m.step)] = float(m.value)
    return {k: sorted(v.items()) for k, v in merged.items()}


def _final(hist: History, domain: str) -> float | None:
    series = hist.get(f"eval/accuracy/{domain}")
    return series[-1][1] if series else None


def _first(hist: History, domain: str) -> float | None:
    series = hist.get(f"eval/accuracy/{domain}")
    return series[0][1] if series and series[0][0] == 0 else None


def _histories(
    plan: Plan, results: Sequence[StageResult], parent: MLflowTracker
) -> dict[str, History]:
    """Stage id -> its metric history (empty when MLflow has no experiment or parent run)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=plan.tracking_uri, registry_uri=plan.tracking_uri)
    exp = client.get_experiment_by_name(plan.base_run.tracking.experiment)
    return {
        r.stage: _stage_histories(
            client, exp.experiment_id, parent.run_id, f"{plan.config.pipeline.name}-{r.stage}"
        )
        if exp is not None and parent.run_id
        else {}
        for r in results
    }


def _table(
    cfg: PipelineConfig, domains: list[str], hist: dict[str, History]
) -> tuple[Rows, dict[str, float | None], dict[str, float | None]]:
    """The accuracy rows, the best teacher of each domain and MOPD minus that teacher."""
    rows: Rows = {}
    # The SFT student: its own stage's final eval, or (stage skipped) the MOPD stage's
    # step-0 eval, which evaluates the same model on the same prompts.
    rows["sft"] = {
        d: _final(hist["sft"], d) if _final(hist["sft"], d) is not None else _first(hist["mopd"], d)
        for d in domains
    }
    for t in cfg.stages.teachers:
        stage = f"teacher-{t.domain}"
        rows[stage] = {d: (_final(hist[stage], d) if d == t.domain else None) for d in domains}
    rows["mopd"] = {d: _final(hist["mopd"], d) for d in domains}
    best = {
        d: max(
            (
                rows[f"teacher-{t.domain}"][d]
                for t in cfg.stages.teachers
                if t.domain == d and rows[f"teacher-{t.domain}"][d] is not None
            ),
            default=None,
        )
        for d in domains
    }
    delta = {
        d: rows["mopd"][d] - best[d]
        if rows["mopd"][d] is not None and best[d] is not None
        else None
        for d in domains
    }
    return rows, best, delta


def write_results(plan: Plan, results: Sequence[StageResult], parent: MLflowTracker) -> dict:
    """Build the results table from the stages' MLflow runs; print it, write results.md,
    results.json and the MOPD plot, and log them (and the table as metrics) to the parent."""
    out = plan.output_dir
    domains = list(dict.fromkeys(s.domain for s in plan.base_run.data.sources))
    hist = _histories(plan, results, parent)
    rows, best, delta = _table(plan.config, domains, hist)
    report = {
        "domains": domains,
        "accuracy": rows,
        "best_teacher": best,
        "mopd_minus_best_teacher": delta,
        "models": {r.stage: r.model for r in results},
        "stage_status": {r.stage: r.status for r in results},
    }
    table = format_table(report)
    print("\n" + table, flush=True)
    (out / RESULTS_MD).write_text(table + "\n")
    (out / RESULTS_JSON).write_text(json.dumps(report, indent=1) + "\n")
    metrics = {
        f"result/{model}/{d}": v
        for model, row in rows.items()
        for d, v in row.items()
        if v is not None
    }
    metrics |= {f"result/mopd_minus_best_teacher/{d}": v for d, v in delta.items() if v is not None}
    parent.log_metrics(metrics, step=0)
    parent.log_artifact(out / RESULTS_MD)
    parent.log_artifact(out / RESULTS_JSON)
    plot = plot_mopd(hist.get("mopd", {}), domains, rows, out / PLOT_PNG)
    if plot is not None:
        parent.log_artifact(plot)
        report["plot"] = str(plot)
    return report


def format_table(report: dict) -> str:
    """The results as a Markdown table: one row per model, one column per domain (held-out
    greedy accuracy), then MOPD minus the best teacher of each domain."""
    domains = report["domains"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def signed(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.1f} pt"

    header = "| model | " + " | ".join(domains) + " |"
    lines = [header, "|" + "---|" * (len(domains) + 1)]
    names = {"sft": "SFT student", "mopd": "MOPD student"}
    for model, row in report["accuracy"].items():
        label = names.get(model, model.replace("teacher-", "teacher: "))
        lines.append(f"| {label} | " + " | ".join(cell(row[d]) for d in domains) + " |")
    lines.append(
        "| MOPD - best teacher | "
        + " | ".join(signed(report["mopd_minus_best_teacher"][d]) for d in domains)
        + " |"
    )
    return "\n".join(lines)


def plot_mopd(
    hist: History,
    domains: Sequence[str],
    rows: Rows,
    path: Path,
) -> Path | None:
    """Per-domain held-out accuracy (with the teachers' and the SFT student's as dashed
    lines) and teacher log-ratio over the MOPD steps; None if the MOPD stage logged nothing."""
    if not hist:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, d in enumerate(domains):
        color = f"C{i}"
        series = hist.get(f"eval/accuracy/{d}", [])
        if series:
            acc_ax.plot(*zip(*series), marker="o", color=color, label=f"{d}: MOPD student")
        teacher = rows.get(f"teacher-{d}", {}).get(d)
        if teacher is not None:
            acc_ax.axhline(teacher, color=color, linestyle="--", label=f"{d}: teacher")
        ratio = hist.get(f"teacher_log_ratio/{d}", [])
        if ratio:
            kl_ax.plot(*zip(*ratio), color=color, label=d)
    acc_ax.set(xlabel="MOPD step", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02))
    acc_ax.set_title("accuracy per domain")
    acc_ax.legend(fontsize=8)
    kl_ax.set(xlabel="MOPD step", ylabel="mean log p_teacher - log p_student")
    kl_ax.set_title("teacher log-ratio per domain (-> 0: student matches)")
    kl_ax.axhline(0.0, color="grey", linewidth=0.5)
    kl_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
