"""The three-stage post-training pipeline of the MiMo-V2-Flash report, as one command.

``mopd pipeline CONFIG [key=value ...] [--resume]`` runs, one after another:

    init      the initial checkpoint: an existing model, or a tiny random MiMo-V2-Flash-style
              model built by the pipeline, with a character tokenizer learned from the
              sources' training texts (``init.tokenizer: data``) or a byte-level one
    sft       stage 1: the student learns the reference answers of every domain (a mixture)
    teachers  stage 2: one teacher per domain, trained from the SFT student on that domain
              only, by RL with the domain's outcome reward (GRPO-style, R3 on) or by SFT;
              each is registered in the MLflow model registry
    mopd      stage 3: the SFT student learns from all teachers at once (MOPD: per-domain
              teacher routing, reverse-KL teacher term plus alpha x ORM advantage, R3 on)

Each stage is one ``mopd.run.train`` run (it starts and stops its own Ray, servers and
Redis) in ``<pipeline.output_dir>/<stage>``, with its own MLflow run nested under one parent
run of the pipeline, all in one tracking store. A stage's run config is the pipeline's
``base`` run config, then the stage's ``overrides``, then what the pipeline decides for that
stage (name, output folder, seed, input model, loss, the domain's sources, the teacher table).

A stage is done when its ``run.output_dir/model`` exists: ``--resume`` skips done stages and
resumes the interrupted one from its last checkpoint. Any stage can be skipped by naming an
existing model (``stages.sft.model``, ``stages.teachers[i].model``, ``stages.mopd.model``,
a folder or a ``models:/name/version`` URI).

At the end the pipeline reads the held-out accuracies back from the stages' MLflow runs and
writes, to its output folder and to the parent MLflow run: the results table (per domain:
SFT student, each teacher on its own domain, MOPD student, MOPD minus the best teacher) as
metrics, ``results.md`` and ``results.json``, and ``mopd_progress.png`` (per-domain accuracy
and teacher log-ratio over the MOPD steps). Every stage evaluates on the same held-out
prompts (they derive from the pipeline seed and the source names), so the columns compare
like with like.

Three parts, one concern each:

    mopd.config.pipeline    the schema: the pipeline config, its validation, each stage's
                            run config (``load_pipeline``, ``stage_run_config``, ``to_yaml``)
    mopd.pipeline.runner    the runner: the parent MLflow run, the stages in order, resume
                            (``run_pipeline``)
    mopd.pipeline.report    the report: the results table, results.json and the plot
                            (``write_results``)

and ``mopd.pipeline.command``, the ``mopd pipeline`` command line.
"""

from mopd.config.pipeline import (
    PipelineConfig,
    Plan,
    is_pipeline_config,
    load_pipeline,
    stage_names,
    stage_run_config,
    to_yaml,
)
from mopd.pipeline.command import add_pipeline_parser, cmd_pipeline, cmd_validate_pipeline
from mopd.pipeline.report import format_table, plot_mopd, write_results
from mopd.pipeline.runner import PipelineError, StageResult, run_pipeline

__all__ = [
    "PipelineConfig",
    "PipelineError",
    "Plan",
    "StageResult",
    "add_pipeline_parser",
    "cmd_pipeline",
    "cmd_validate_pipeline",
    "format_table",
    "is_pipeline_config",
    "load_pipeline",
    "plot_mopd",
    "run_pipeline",
    "stage_names",
    "stage_run_config",
    "to_yaml",
    "write_results",
]
