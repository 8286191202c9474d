"""Load a run config: YAML file + ``key=value`` overrides -> a validated ``RunConfig``.

Order: the dataclass defaults, then the YAML file, then the command-line overrides
(OmegaConf dot-list syntax, list items by index: ``teachers.0.timeout_s=30``), then
interpolation, then the cross-field checks of ``mopd.config.validate``. Every problem
becomes a ``ConfigError`` whose lines name the field, the bad value and the fix, so
that ``mopd validate`` can print them and exit non-zero before anything starts.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from mopd.config.schema import RunConfig
from mopd.config.validate import validate
from mopd.io import write_text_atomic

RESOLVED_CONFIG_NAME = "resolved_config.yaml"


class ConfigError(ValueError):
    """A run config that cannot be used; ``problems`` holds one message per problem."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config{where} ({len(self.problems)} problem(s)):\n{lines}")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override, resolve and validate a run config.

    Args:
        path: YAML file, or None for the defaults alone.
        overrides: ``key=value`` strings in OmegaConf dot-list syntax.

    Returns:
        The validated ``RunConfig`` (plain dataclasses; treat it as read-only).

    Raises:
        ConfigError: with every problem found, each naming the field and the fix.
    """
    source = str(path) if path is not None else None
    cfg = _merge(path, overrides, source)
    try:
        run = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(
            [f"{_key(e)}: required field has no value; set it in the file or with {_key(e)}=..."],
            source,
        ) from None
    except InterpolationResolutionError as e:
        raise ConfigError(
            [f"{_key(e)}: cannot resolve interpolation: {_first_line(e)}"], source
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError([_describe(e)], source) from None
    assert isinstance(run, RunConfig)
    problems = validate(run)
    if problems:
        raise ConfigError(problems, source)
    return run


def to_yaml(run: RunConfig) -> str:
    """The resolved config as YAML (what every run writes next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run), resolve=True)


def save_resolved(run: RunConfig, output_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved config to ``output_dir`` (default: run.output_dir) atomically."""
    out = Path(output_dir if output_dir is not None else run.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / RESOLVED_CONFIG_NAME, to_yaml(run))


def _merge(
    path: str | os.PathLike | None, overrides: Sequence[str], source: str | None
) -> DictConfig:
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        file_cfg = _read_yaml(Path(path))
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as e:
            raise ConfigError([_describe(e)], source) from None
    problems = []
    for item in overrides:
        try:
            _apply_override(cfg, item)
        except _BadOverride as e:
            problems.append(str(e))
        except OmegaConfBaseException as e:
            problems.append(f"override '{item}': {_describe(e)}")
    if problems:
        raise ConfigError(problems, source)
    assert isinstance(cfg, DictConfig)
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(
            [f"config file not found: {path}; pass the path of a YAML file"], str(path)
        )
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            ["the top level must be a mapping of sections (run:, model:, ...), not a list"],
            str(path),
        )
    return loaded


class _BadOverride(ValueError):
    pass


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, sep, _ = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _BadOverride(f"override '{item}' is not of the form key=value (e.g. trainer.lr=1e-5)")
    # OmegaConf's dot-list grammar types the value (numbers, null, [lists], {dicts}).
    parsed = OmegaConf.from_dotlist([item])
    value = OmegaConf.select(parsed, key, throw_on_missing=False)
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    OmegaConf.update(cfg, key, value, merge=True)


def _key(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or "<root>")


def _first_line(e: BaseException) -> str:
    text = getattr(e, "msg", None) or str(e)
    return str(text).splitlines()[0] if text else type(e).__name__


def _describe(e: OmegaConfBaseException) -> str:
    """Turn an OmegaConf error into 'field: problem; fix'."""
    key = _key(e)
    if isinstance(e, ConfigKeyError | ConfigAttributeError):
        bad = key.rsplit(".", 1)[-1].split("[")[0]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = _known_keys(parent)
        hint = difflib.get_close_matches(bad, known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        accepted = f" Known keys here: {', '.join(known)}." if known else ""
        return f"{key}: unknown key{suggestion}{accepted}"
    if isinstance(e, ValidationError):
        value = getattr(e, "value", None)
        expected = _expected_type(key)
        exp = f"; expected {expected}" if expected else ""
        return f"{key}: bad value {value!r} ({_first_line(e)}){exp}"
    return f"{key}: {_first_line(e)}"


def _schema_node(key: str) -> Any:
    """The dataclass (or field type) at a dotted key of RunConfig, list indices skipped."""
    node: Any = RunConfig
    if not key or key == "<root>":
        return node
    for part in key.replace("[", ".").replace("]", "").split("."):
        if not part or part.isdigit():
            continue
        if not is_dataclass(node):
            return None
        match = {f.name: f for f in fields(node)}.get(part)
        if match is None:
            return None
        node = _unwrap(match.type)
    return node


def _unwrap(tp: Any) -> Any:
    """Resolve string annotations and take the element type of list[...] fields."""
    if isinstance(tp, str):
        from mopd.config import schema

        namespace = vars(schema)
        base = tp.split("[", 1)
        if base[0] == "list" and len(base) == 2:
            return _unwrap(base[1].rstrip("]"))
        return namespace.get(tp, tp)
    return tp


def _known_keys(parent: str) -> list[str]:
    node = _schema_node(parent)
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _expected_type(key: str) -> str | None:
    parent, _, leaf = key.rpartition(".")
    node = _schema_node(parent)
    if not is_dataclass(node):
        return None
    match = {f.name: f for f in fields(node)}.get(leaf.split("[")[0])
    return str(match.type) if match is not None else None
