"""Load a run config: YAML file + ``key=value`` overrides -> a validated ``RunConfig``.

Order: the dataclass defaults, then the YAML file, then the command-line overrides
(OmegaConf dot-list syntax, list items by index: ``teachers.0.timeout_s=30``), then
interpolation, then the cross-field checks of ``mopd.config.validate``. Every problem
becomes a ``ConfigError`` whose lines name the field, the bad value and the fix, so
that ``mopd validate`` can print them and exit non-zero before anything starts.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass, make_dataclass
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

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
from mopd.config.validate import MAX_VALUE_CHARS, Registries, clip, short, validate
from mopd.io import write_text_atomic

RESOLVED_CONFIG_NAME = "resolved_config.yaml"


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this (1 MiB) is refused unread: no run config is that big."""
MAX_PROBLEMS = 40
"""Problems listed in one error at most (the rest are counted)."""
MAX_PROBLEM_CHARS = 600
"""One problem's text at most; longer ones are cut with an ellipsis."""


class ConfigError(ValueError):
    """A run config that cannot be used; ``problems`` holds one message per problem.

    The message is bounded: at most ``MAX_PROBLEMS`` problems of ``MAX_PROBLEM_CHARS``
    characters each, so a file of garbage never comes back as a garbage-sized message."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = [clip(str(p), MAX_PROBLEM_CHARS) for p in problems]
        self.source = clip(source, MAX_VALUE_CHARS) if source else source
        where = f" in {self.source}" if self.source else ""
        shown = self.problems[:MAX_PROBLEMS]
        lines = "\n".join(f"  - {p}" for p in shown)
        if len(self.problems) > len(shown):
            lines += f"\n  - ... and {len(self.problems) - len(shown)} more problem(s)"
        super().__init__(f"invalid config{where} ({len(self.problems)} problem(s)):\n{lines}")


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    registries: Registries | None = None,
) -> RunConfig:
    """Load, override, resolve and validate a run config.

    Args:
        path: YAML file, or None for the defaults alone.
        overrides: ``key=value`` strings in OmegaConf dot-list syntax.
        registries: the reward and generator names to check references against
            (``mopd.catalog.registries()``); None leaves those two checks out.

    Returns:
        The validated ``RunConfig`` (plain dataclasses; treat it as read-only).

    Raises:
        ConfigError: with every problem found, each naming the field and the fix. Nothing
            else: any input, however broken, becomes a ConfigError.
    """
    source = str(path) if path is not None else None
    cfg = _merge(path, overrides, source)
    run = to_object(cfg, source)
    assert isinstance(run, RunConfig)
    problems = validate(run, registries)
    if problems:
        raise ConfigError(problems, source)
    return run


def to_object(cfg: DictConfig, source: str | None, prefix: str = "") -> Any:
    """``OmegaConf.to_object`` with every failure as a ConfigError naming the field."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = prefix + _key(e)
        raise ConfigError(
            [f"{key}: required field has no value; set it in the file or with {key}=..."],
            source,
        ) from None
    except InterpolationResolutionError as e:
        raise ConfigError(
            [f"{prefix}{_key(e)}: cannot resolve interpolation: {_first_line(e)}"], source
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError([prefix + _describe(e)], source) from None
    except Exception as e:  # e.g. a resolver that raised: name it, never a traceback
        raise ConfigError(
            [f"{prefix or '<config>'}: cannot resolve: {_error(e)}"], source
        ) from None


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
        tree = read_tree(Path(path))
        problems = shape_problems(tree, RunConfig)
        if problems:
            raise ConfigError(problems, source)
        try:
            cfg = OmegaConf.merge(cfg, tree)
        except OmegaConfBaseException as e:
            raise ConfigError([_describe(e)], source) from None
        except Exception as e:
            raise ConfigError(
                [f"cannot merge the file onto the schema: {_error(e)}"], source
            ) from None
    problems = []
    for item in overrides:
        try:
            apply_override(cfg, item, RunConfig)
        except BadOverride as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems, source)
    assert isinstance(cfg, DictConfig)
    return cfg


def read_tree(path: Path) -> dict[str, Any]:
    """A YAML file of sections as plain python (interpolations kept as strings).

    Raises:
        ConfigError: the file is missing, unreadable, too large, not UTF-8, not YAML, or
            not a mapping at the top level.
    """
    source = str(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}; pass the path of a YAML file"], source)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                [
                    f"the file holds {size} bytes, more than any config ({MAX_CONFIG_BYTES}); "
                    "pass the YAML run config"
                ],
                source,
            )
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"cannot read the file: {e.strerror or e}"], source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [
                f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the file "
                "as UTF-8"
            ],
            source,
        ) from None
    try:
        loaded = OmegaConf.load(io.StringIO(text))
        tree = OmegaConf.to_container(loaded, resolve=False)
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {_yaml_error(e)}"], source) from None
    except Exception as e:  # alias bombs, keys OmegaConf cannot hold, ...
        raise ConfigError([f"not a valid YAML config: {_error(e)}"], source) from None
    if not isinstance(tree, dict):
        raise ConfigError(
            ["the top level must be a mapping of sections (run:, model:, ...), not a list"],
            source,
        )
    return tree


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or _first_line(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{clip(str(problem), MAX_VALUE_CHARS)}{where}"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {clip(_first_line(e), MAX_VALUE_CHARS)}"


# ------------------------------------------------------------------ shapes
# What OmegaConf cannot say well: a list where a section belongs (or the reverse), an
# unknown key inside a list item. The file (and every override's value) is checked against
# the schema's types first, so each such problem names its full path.
Nested = Mapping[tuple[type, str], type]
"""(dataclass, field) -> the schema of a free-form ``dict`` field (the pipeline's ``base``)."""

_MAX_NODES = 20_000


def shape_problems(
    tree: Any, cls: type, prefix: str = "", nested: Nested | None = None
) -> list[str]:
    """Every place where ``tree`` (plain python) does not have the shape of dataclass
    ``cls``: unknown keys, mappings, lists and scalars in each other's place."""
    problems: list[str] = []
    budget = [_MAX_NODES]
    _shape(tree, cls, prefix, nested or {}, problems, budget)
    return problems


def _join(prefix: str, key: object) -> str:
    key = clip(str(key), 80)
    return f"{prefix}.{key}" if prefix else key


def _shape(
    value: Any, hint: Any, key: str, nested: Nested, problems: list[str], budget: list[int]
) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        if budget[0] == -1:
            problems.append(f"{key or '<root>'}: the config is too large or too deeply nested")
        return
    name = key or "<root>"
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: its target is checked when it resolves
    optional, hint = _strip_optional(hint)
    if value is None:
        if not optional and hint is not Any:
            what = "a section" if is_dataclass(hint) else _type_name(hint)
            problems.append(f"{name}: null is not allowed here; give {what} or remove the key")
        return
    origin = get_origin(hint)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            problems.append(
                f"{name}: a section, so a mapping of its fields ({', '.join(_field_names(hint))}), "
                f"not {_kind(value)}"
            )
            return
        hints = _hints(hint)
        for k, v in value.items():
            sub = _join(key, k)
            if not isinstance(k, str) or k not in hints:
                problems.append(_unknown(sub, str(k), list(hints)))
                continue
            field_hint = hints[k]
            for (owner, field_name), schema in nested.items():
                if field_name == k and isinstance(hint, type) and issubclass(hint, owner):
                    field_hint = schema
            _shape(v, field_hint, sub, nested, problems, budget)
    elif origin is list:
        if not isinstance(value, list):
            problems.append(
                f"{name}: a list, not {_kind(value)}; write [..] or one '- ' item per line"
            )
            return
        (item_hint,) = get_args(hint) or (Any,)
        for i, item in enumerate(value):
            _shape(item, item_hint, f"{key}[{i}]", nested, problems, budget)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{name}: a mapping (key: value), not {_kind(value)}")
            return
        _, item_hint = get_args(hint) or (str, Any)
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(f"{_join(key, k)}: keys here are names (strings), not {_kind(k)}")
                continue
            _shape(v, item_hint, _join(key, k), nested, problems, budget)
    elif hint is not Any and isinstance(value, dict | list):
        problems.append(f"{name}: expected {_type_name(hint)}, not {_kind(value)}")


def _strip_optional(hint: Any) -> tuple[bool, Any]:
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        return optional, args[0] if len(args) == 1 else Any
    return False, hint


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in fields(cls)]


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {short(value, 60)}"


def _unknown(key: str, bad: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(bad, known, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
    accepted = f"; known keys here: {', '.join(known)}" if known else ""
    return f"{key}: unknown key{suggestion}{accepted}"


# ------------------------------------------------------------------ overrides
class BadOverride(ValueError):
    """An override that cannot be applied; the message names it and the field."""


def apply_override(
    cfg: DictConfig, item: str, root: type, nested: Nested | None = None, prefix: str = ""
) -> None:
    """Apply one ``key=value`` override (OmegaConf's dot-list grammar types the value) to
    ``cfg``, whose schema is the dataclass ``root``.

    Raises:
        BadOverride: naming the override and the field, for any problem.
    """
    shown = clip(item, 80)  # the field and the value follow, each cut on its own
    key, sep, _ = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise BadOverride(f"override '{shown}' is not of the form key=value (e.g. trainer.lr=1e-5)")
    try:
        parsed = OmegaConf.from_dotlist([item])
        value = OmegaConf.select(parsed, key, throw_on_missing=False)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=False)
    except Exception as e:  # the value is not valid YAML, or the key is not a dotted path
        raise BadOverride(
            f"override '{shown}': cannot parse it ({_error(e)}); quote the value "
            "(key='[1, 2') or fix its YAML (lists [a, b], mappings {k: v})"
        ) from None
    parts = key.split(".")
    display = prefix + _display(parts)
    hint, problem = _hint_at(cfg, root, parts, nested or {})
    if problem is not None:
        raise BadOverride(f"override '{shown}': {prefix}{problem}")
    problems = shape_problems({"_": value}, _Holder.of(hint), "", nested)
    if problems:  # "_: ...", "_.key: ..." or "_[0]...": the holder's field is the key
        raise BadOverride(f"override '{shown}': {display}{problems[0][1:]}")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as e:
        raise BadOverride(f"override '{shown}': {prefix}{_describe(e)}") from None
    except Exception as e:
        raise BadOverride(f"override '{shown}': {display}: {_error(e)}") from None


def _display(parts: Sequence[str]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _hint_at(cfg: Any, root: type, parts: Sequence[str], nested: Nested) -> tuple[Any, str | None]:
    """The schema type at a dotted key, or a problem (unknown key, no such list item)."""
    hint: Any = root
    node: Any = cfg
    for i, part in enumerate(parts):
        here = _display(parts[: i + 1])
        _, hint = _strip_optional(hint)
        origin = get_origin(hint)
        if is_dataclass(hint):
            hints = _hints(hint)
            if part not in hints:
                return None, _unknown(here, part, list(hints))
            sub = hints[part]
            for (owner, field_name), schema in nested.items():
                if field_name == part and isinstance(hint, type) and issubclass(hint, owner):
                    sub = schema
            hint = sub
        elif origin is list:
            if not part.isdigit():
                return None, f"{here}: list items are numbered (e.g. {_display(parts[:i])}[0])"
            size = len(node) if isinstance(node, ListConfig) else None
            if size is not None and int(part) >= size:
                return None, (
                    f"{here}: no such item ({_display(parts[:i])} has {size}); "
                    "add the item in the file"
                )
            (hint,) = get_args(hint) or (Any,)
        elif origin is dict:
            hint = (get_args(hint) or (str, Any))[1]
        else:
            return Any, None  # inside a free-form value: OmegaConf decides
        node = _child(node, part)
    return hint, None


def _child(node: Any, part: str) -> Any:
    try:
        if isinstance(node, ListConfig):
            return node[int(part)]
        if isinstance(node, DictConfig):
            return node._get_node(part) if part in node else None
    except Exception:
        return None
    return None


class _Holder:
    """A one-field dataclass per type, to check an override's value with ``shape_problems``."""

    @staticmethod
    @cache
    def of(hint: Any) -> type:
        return make_dataclass("_Value", [("_", hint)])


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
        accepted = f"; known keys here: {', '.join(known)}" if known else ""
        return f"{key}: unknown key{suggestion}{accepted}"
    if isinstance(e, ValidationError):
        value = getattr(e, "value", None)
        expected = _expected_type(key)
        exp = f"; expected {expected}" if expected else ""
        reason = clip(_first_line(e).split(". value:", 1)[0], MAX_VALUE_CHARS)
        return f"{key}: bad value {short(value)} ({reason}){exp}"
    return f"{key}: {clip(_first_line(e), MAX_VALUE_CHARS)}"


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
