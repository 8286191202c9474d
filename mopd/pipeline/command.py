"""``mopd pipeline CONFIG [key=value ...] [--resume]`` and ``mopd validate`` of a pipeline config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mopd.catalog import registries
from mopd.config import ConfigError
from mopd.config.pipeline import load_pipeline, to_yaml
from mopd.pipeline.runner import PipelineError, run_pipeline

__all__ = ["add_pipeline_parser", "cmd_pipeline", "cmd_validate_pipeline"]

EXIT_CONFIG_ERROR = 2
EXIT_RUN_ERROR = 1

_OVERRIDES_HELP = (
    "overrides in OmegaConf dot-list syntax, e.g. pipeline.seed=1 "
    "stages.sft.overrides.trainer.steps=50 stages.teachers.0.method=sft"
)


def add_pipeline_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mopd pipeline`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "pipeline",
        help="run SFT -> domain teachers -> MOPD as one pipeline and report the results",
        description="Validate the pipeline CONFIG (every stage's run config included), then run "
        "its stages in this process: SFT of the student, one teacher per domain (RL or SFT, "
        "registered in MLflow), and MOPD of the SFT student from all teachers. Prints and logs "
        "a table of held-out accuracy per domain and a plot of the MOPD run.",
    )
    p.add_argument("config", help="YAML pipeline config (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip completed stages and resume the interrupted one from its last checkpoint",
    )
    p.set_defaults(func=cmd_pipeline)
    return p


def cmd_pipeline(args: argparse.Namespace) -> int:
    """``mopd pipeline``: load and validate the config, run it; the exit code."""
    try:
        plan = load_pipeline(args.config, args.overrides, registries())
    except ConfigError as e:
        print(f"mopd pipeline: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from mopd.run.logs import configure_logging

    configure_logging()
    try:
        run_pipeline(plan, resume=args.resume)
    except PipelineError as e:
        print(f"mopd pipeline: {e}", file=sys.stderr)
        return EXIT_RUN_ERROR
    return 0


def cmd_validate_pipeline(config: str, overrides: Sequence[str]) -> int:
    """``mopd validate`` of a pipeline config: print it resolved, or every problem."""
    try:
        plan = load_pipeline(config, overrides, registries())
    except ConfigError as e:
        print(f"mopd validate: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(to_yaml(plan), end="")
    return 0
