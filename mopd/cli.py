"""The ``mopd`` command line: validate configs and run jobs.

mopd validate CONFIG [key=value ...]   print the resolved config, or every problem
mopd train CONFIG [key=value ...]      validate, write the resolved config, run
mopd pipeline CONFIG [key=value ...]   SFT -> domain teachers -> MOPD, with a results table
mopd config-docs [SECTION]             every config field with its type, default and meaning
mopd --version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mopd import __version__

EXIT_CONFIG_ERROR = 2
EXIT_RUN_ERROR = 1

_OVERRIDES_HELP = (
    "config overrides in OmegaConf dot-list syntax, e.g. trainer.lr=1e-5 "
    "'rollout.sampling.stop=[\"</s>\"]' teachers.0.timeout_s=60"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mopd",
        description="Post-train MoE language models with RL and Multi-Teacher On-Policy "
        "Distillation (MOPD).",
    )
    parser.add_argument("--version", action="version", version=f"mopd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check a run config and print it resolved",
        description="Load CONFIG, apply the overrides, check every field, and print the "
        "resolved config. Exits 2 and lists every problem if the config is invalid.",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "train",
        help="run SFT, teacher RL or MOPD as configured",
        description="Validate CONFIG with the overrides, write the resolved config to "
        "run.output_dir, and run the job (algorithm.loss selects SFT, RL or MOPD).",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--parent-run-id",
        default=None,
        help="MLflow run id to nest this run under (what `mopd pipeline` passes its stages)",
    )
    p.set_defaults(func=_cmd_train)

    from mopd.submit import add_submit_parser  # imports Ray only when the command runs

    add_submit_parser(sub)

    from mopd.pipeline import add_pipeline_parser

    add_pipeline_parser(sub)

    p = sub.add_parser(
        "tiny-checkpoints",
        help="write tiny random checkpoints (quick starts and tests; no hub access)",
        description="Write tiny random Hugging Face checkpoints DIR/NAME (one per NAME, seeds "
        "SEED, SEED+1, ...) of a small MoE architecture, with a byte-level tokenizer shared by "
        "all of them, so they can serve as student and teachers of a quick run.",
    )
    p.add_argument("dir", help="folder to write the checkpoints into")
    p.add_argument("names", nargs="+", help="checkpoint names, e.g. sft teacher-math")
    p.add_argument(
        "--arch",
        default="mimo_v2_flash",
        help="mimo_v2_flash (default), qwen3_moe, mixtral or llama",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first checkpoint")
    p.set_defaults(func=_cmd_tiny_checkpoints)

    p = sub.add_parser(
        "config-docs",
        help="list every config field with its type, default and meaning",
        description="Print the documented config schema, optionally one section only.",
    )
    p.add_argument("section", nargs="?", help="a top-level section such as trainer or teachers")
    p.set_defaults(func=_cmd_config_docs)
    return parser


def _load(args: argparse.Namespace):
    from mopd.catalog import registries
    from mopd.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides, registries())
    except ConfigError as e:
        print(f"mopd {args.command}: {e}", file=sys.stderr)
        return None


def _cmd_validate(args: argparse.Namespace) -> int:
    from mopd.config import to_yaml
    from mopd.pipeline import cmd_validate_pipeline, is_pipeline_config

    if is_pipeline_config(args.config):
        return cmd_validate_pipeline(args.config, args.overrides)
    run = _load(args)
    if run is None:
        return EXIT_CONFIG_ERROR
    print(to_yaml(run), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mopd.config import ConfigError
    from mopd.run import RunError, train
    from mopd.run.logs import configure_logging

    run = _load(args)
    if run is None:
        return EXIT_CONFIG_ERROR
    configure_logging()
    try:
        train(run, resume=args.resume, parent_run_id=args.parent_run_id)
    except ConfigError as e:  # what only the run's own checks see (a missing model folder)
        print(f"mopd train: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (RunError, FileNotFoundError) as e:
        print(f"mopd train: {e}", file=sys.stderr)
        return EXIT_RUN_ERROR
    return 0


def _cmd_tiny_checkpoints(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mopd.models.tiny import ARCHS, build_tiny_checkpoint

    if args.arch not in ARCHS:
        print(
            f"mopd tiny-checkpoints: unknown --arch {args.arch!r}; accepted: {', '.join(ARCHS)}",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    for i, name in enumerate(args.names):
        path = build_tiny_checkpoint(Path(args.dir) / name, args.arch, seed=args.seed + i)
        print(path)
    return 0


def _cmd_config_docs(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from mopd.config.docs import describe
    from mopd.config.schema import RunConfig

    sections = [f.name for f in fields(RunConfig)]
    if args.section is not None and args.section not in sections:
        print(
            f"mopd config-docs: unknown section {args.section!r}; sections: {', '.join(sections)}",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    for line in describe():
        key = line.strip().split(" ", 1)[0].split(".", 1)[0].split("[", 1)[0].rstrip(":")
        if args.section is None or key == args.section:
            print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG_ERROR
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
