"""``mopd pipeline``: the shipped pipeline configs validate, bad ones name the field, and a
shortened quick start (tiny model, a few steps per stage, tiny eval sets) runs SFT -> two
teachers (one by RL, one by SFT) -> MOPD to the end with its artifacts: the results table,
the plot, the registered teachers, the MOPD model and the nested MLflow runs; ``--resume``
after the end retrains nothing and gives the same table, and resumes an interrupted stage
from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mopd.catalog import registries
from mopd.cli import main
from mopd.config import ConfigError
from mopd.config.pipeline import is_pipeline_config, load_pipeline, stage_run_config, to_yaml
from mopd.pipeline import run_pipeline
from mopd.run import trained_log

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PIPELINES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if is_pipeline_config(p))

pytestmark = pytest.mark.timeout(600)


def test_quickstart_is_a_pipeline_config():
    assert QUICKSTART in PIPELINES


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipeline_validates(path: Path):
    plan = load_pipeline(path, registries=registries())
    domains = {s.domain for s in plan.base_run.data.sources}
    assert {t.domain for t in plan.config.stages.teachers} == domains
    mopd = stage_run_config(plan, "mopd", {})
    assert mopd.algorithm.loss == "mopd" and mopd.trainer.routing_replay
    assert {d for t in mopd.teachers for d in t.domains} == domains


def test_stage_run_configs_follow_the_pipeline():
    plan = load_pipeline(QUICKSTART, ["pipeline.output_dir=out", "pipeline.seed=5"])
    sft = stage_run_config(plan, "sft", {"init": "init-model"})
    assert sft.algorithm.loss == "sft" and sft.model.path == "init-model"
    assert all(s.group_size == 1 and not s.dynamic_sampling for s in sft.data.sources)
    assert sft.run.output_dir == "out/sft" and sft.run.seed == 5
    teacher = stage_run_config(plan, "teacher-spelling", {"sft": "models:/x/1"})
    assert [s.domain for s in teacher.data.sources] == ["spelling"]
    assert teacher.model.path == "models:/x/1"
    assert teacher.tracking.register_model == "quickstart-teacher-spelling"
    mopd = stage_run_config(plan, "mopd", {"teacher-arithmetic": "models:/t/2"})
    assert mopd.model.path == "out/sft/model"
    assert {t.name: t.model for t in mopd.teachers} == {
        "teacher-arithmetic": "models:/t/2",
        "teacher-spelling": "out/teacher-spelling/model",
    }
    # Every stage shares one tracking store, so the stages nest under one parent run.
    assert len({r.tracking.tracking_uri for r in (sft, teacher, mopd)}) == 1


def test_resolved_pipeline_config_loads_again(tmp_path: Path):
    plan = load_pipeline(QUICKSTART, ["stages.mopd.overrides.trainer.steps=7"])
    path = tmp_path / "pipeline.yaml"
    path.write_text(to_yaml(plan))
    again = load_pipeline(path)
    assert again.base_run == plan.base_run
    for section in ("pipeline", "init", "stages"):
        assert getattr(again.config, section) == getattr(plan.config, section)
    for stage in ("sft", "teacher-arithmetic", "mopd"):
        assert stage_run_config(again, stage, {}) == stage_run_config(plan, stage, {})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["stages.teachers.0.method=ppo"], "stages.teachers[0].method: bad value 'ppo'"),
        (["stages.teachers.1.domain=arithmetic"], "stages.teachers[1].domain"),
        (["stages.sft.overrides.trainer.lrr=1"], "stages.sft.overrides.trainer.lrr"),
        (["base.run.name=x"], "base.run.name: set per stage by the pipeline"),
        (["base.model.path=m"], "base.model.path: set per stage by the pipeline"),
        (["base.trainer.stepz=3"], "base.trainer.stepz"),
        (
            ["stages.mopd.overrides.algorithm.eps_low=3"],
            "stages.mopd (run quickstart-mopd): algorithm.eps_low",
        ),
        (["init.tiny.arch=gpt9"], "init.tiny.arch: bad value 'gpt9'"),
        (["init.tokenizer=bpe"], "init.tokenizer: bad value 'bpe'"),
        (["init.tokenizer_samples=0"], "init.tokenizer_samples: 0 must be >= 1"),
        (["base.tracking.enabled=false"], "base.tracking.enabled"),
        (["stages.teachers=[]"], "stages.teachers: no teacher for domain(s)"),
    ],
)
def test_bad_pipeline_names_the_field(overrides: list[str], needle: str):
    with pytest.raises(ConfigError) as info:
        load_pipeline(QUICKSTART, overrides)
    assert any(needle in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["init.tiny.config.hiden_size=32"], "init.tiny.config.hiden_size: not a field of the"),
        (["init.tiny.config.num_hidden_layers=-2"], "init.tiny.config.num_hidden_layers: -2 must"),
        (["init.tiny.config.num_attention_heads=3"], "init.tiny.config: no mimo_v2_flash model"),
        (["init.tiny.config.hidden_size=130"], "init.tiny.config: no mimo_v2_flash model"),
        (["init.tiny.config.num_hidden_layers=5"], "init.tiny.config: no mimo_v2_flash model"),
        (["init.tiny.config.vocab_size=300"], "init.tiny.config.vocab_size: with init.tokenizer"),
        (["pipeline.name=my pipeline"], "pipeline.name: bad name 'my pipeline'"),
        (["stages.mopd.model=models:/mopd/latest"], "stages.mopd.model: 'models:/mopd/latest'"),
        (["stages.teachers.0.register_as=a/b"], "stages.teachers[0].register_as: bad name"),
        (["base.data.sources.0.foo=1"], "base.data.sources[0].foo: unknown key"),
        (["stages.sft.overrides.trainer=[1]"], "stages.sft.overrides.trainer: a section"),
        (["stages.teachers.0.serving.top_k=4"], "stages.teachers[0].serving.top_k: unknown key"),
        (["base.scheduler.redis_url='redis://h:0/0'"], "scheduler.redis_url: port 0 out of range"),
    ],
)
def test_bad_pipeline_fields_are_refused_at_validation(overrides: list[str], needle: str):
    with pytest.raises(ConfigError) as info:
        load_pipeline(QUICKSTART, overrides, registries())
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_pipeline_refuses_before_creating_its_mlflow_store(tmp_path: Path, capsys):
    out = tmp_path / "p"
    for bad in ("init.tiny.config.num_attention_heads=3", "base.data.sources.0.reward=nope"):
        rc = main(["pipeline", str(QUICKSTART), f"pipeline.output_dir={out}", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "invalid config" in err and "Traceback" not in err
        assert not out.exists()  # no MLflow store, no stage folder, no tiny model


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


SHORT = [
    # tiny default model (hidden 64, 4 layers) instead of the quick start's
    "init.tiny.config={}",
    "base.rollout.max_running_requests=32",
    "base.data.sources.0.num_eval_prompts=4",
    "base.data.sources.1.num_eval_prompts=4",
    "base.data.sources.0.group_size=4",
    "base.data.sources.1.group_size=4",
    "base.data.sources.0.dynamic_sampling=false",
    "base.data.sources.1.dynamic_sampling=false",
    "stages.sft.overrides.trainer.steps=3",
    "stages.sft.overrides.scheduler.prompts_per_step=16",
    # one teacher by RL (GRPO-style, R3; the quick start's method), one by SFT: both methods run
    "stages.teachers.0.method=rl",
    "stages.teachers.1.method=sft",
    "stages.teachers.0.overrides={trainer: {steps: 2, lr: 1e-4, min_lr: 1e-5}, scheduler: {prompts_per_step: 4}}",
    "stages.teachers.1.overrides.trainer.steps=2",
    "stages.teachers.1.overrides.scheduler.prompts_per_step=16",
    "stages.mopd.overrides.trainer.steps=2",
    "stages.mopd.overrides.run.eval_every=1",
    "stages.mopd.overrides.scheduler.prompts_per_step=4",
    "stages.mopd.overrides.trainer.checkpoint_every=1",
]


def test_short_pipeline_runs_to_the_end_and_resumes(tmp_path: Path, capsys):
    out = tmp_path / "qs"
    plan = load_pipeline(QUICKSTART, [*SHORT, f"pipeline.output_dir={out}"])
    report = run_pipeline(plan)

    # The table: printed, written, and complete for every model that has a number.
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table.strip() in printed
    assert "| SFT student |" in table and "| MOPD student |" in table
    assert "| teacher: arithmetic |" in table and "| MOPD - best teacher |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["domains"] == ["arithmetic", "spelling"]
    acc = saved["accuracy"]
    for model in ("sft", "teacher-arithmetic", "teacher-spelling", "mopd"):
        assert model in acc
    for d in ("arithmetic", "spelling"):
        assert 0.0 <= acc["sft"][d] <= 1.0 and 0.0 <= acc["mopd"][d] <= 1.0
        assert acc[f"teacher-{d}"][d] is not None
        assert saved["mopd_minus_best_teacher"][d] == pytest.approx(
            acc["mopd"][d] - acc[f"teacher-{d}"][d]
        )
    assert acc["teacher-arithmetic"]["spelling"] is None  # a teacher is rated on its domain

    # The student's tokenizer was learned from the sources' texts: one id per character.
    init_tok = json.loads((out / "init" / "tokenizer.json").read_text())
    vocab = init_tok["model"]["vocab"]
    assert not init_tok["model"]["merges"] and 4 + 13 < len(vocab) < 100  # bytes: 259
    assert set("0123456789+-=") <= set(vocab) and "rev:" not in vocab
    init_cfg = json.loads((out / "init" / "config.json").read_text())
    assert init_cfg["vocab_size"] == len(vocab)

    # The plot, the MOPD model, the registered teachers.
    width, height = _png_size(out / "mopd_progress.png")
    assert width > 400 and height > 200
    assert (out / "mopd" / "model" / "config.json").is_file()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for d in ("arithmetic", "spelling"):
        uri = saved["models"][f"teacher-{d}"]
        assert uri.startswith(f"models:/quickstart-teacher-{d}/")
        (version,) = client.search_model_versions(f"name='quickstart-teacher-{d}'")
        assert uri.endswith(f"/{version.version}")
    # MOPD was served those registered teachers.
    mopd_cfg = (out / "mopd" / "resolved_config.yaml").read_text()
    assert "models:/quickstart-teacher-arithmetic/1" in mopd_cfg

    # One parent run with a child run per stage; the table is on the parent.
    exp = client.get_experiment_by_name("mopd-quickstart")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "quickstart"]
    children = {
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert children == {
        "quickstart-sft",
        "quickstart-teacher-arithmetic",
        "quickstart-teacher-spelling",
        "quickstart-mopd",
    }
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["result/mopd/spelling"] == pytest.approx(acc["mopd"]["spelling"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", "mopd_progress.png"} <= artifacts
    # eval_every=1: accuracy at steps 0, 1 and 2 of the MOPD run.
    (mopd_run,) = [r for r in runs if r.info.run_name == "quickstart-mopd"]
    steps = [
        m.step for m in client.get_metric_history(mopd_run.info.run_id, "eval/accuracy/spelling")
    ]
    assert sorted(steps) == [0, 1, 2]

    # Without --resume the pipeline refuses to overwrite; with it, nothing is retrained.
    with pytest.raises(Exception, match="--resume"):
        run_pipeline(plan)
    again = run_pipeline(plan, resume=True)
    assert set(again["stage_status"].values()) == {"done"}
    assert again["accuracy"] == report["accuracy"]
    assert (out / "results.md").read_text() == table

    # An interrupted stage resumes from its checkpoint: drop the MOPD stage's exported model,
    # as if it had died after its last checkpoint; it resumes there and only exports.
    shutil.rmtree(out / "mopd" / "model")
    resumed = run_pipeline(plan, resume=True)
    assert resumed["stage_status"]["mopd"] == "resumed"
    assert resumed["stage_status"]["sft"] == "done"
    assert (out / "mopd" / "model" / "config.json").is_file()
    assert [r["step"] for r in trained_log(out / "mopd")] == [1, 2]


def test_same_seed_same_table_and_weights(tmp_path: Path):
    """A fixed seed reproduces the run: the same table and the same MOPD weights up to float
    rounding (requests carry their own sampling seeds, so the engine's batching does not
    change the samples)."""
    from safetensors.torch import load_file

    reports, weights = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        plan = load_pipeline(QUICKSTART, [*SHORT, f"pipeline.output_dir={out}"])
        reports.append(run_pipeline(plan))
        (shard,) = (out / "mopd" / "model").glob("*.safetensors")
        weights.append(load_file(str(shard)))
    assert reports[0]["accuracy"] == reports[1]["accuracy"]
    assert weights[0].keys() == weights[1].keys()
    # Same samples, same order, same updates; the rollout log-probs (in the importance
    # weights) are float sums whose order follows what the engine batched together, so the
    # weights agree to float rounding, not bit for bit.
    diff = max((v - weights[1][k]).abs().max().item() for k, v in weights[0].items())
    assert diff < 1e-4
