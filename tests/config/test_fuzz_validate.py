"""Property test of ``mopd validate`` (issue 20): mutated versions of every shipped config
(wrong types, deleted keys, unknown keys, out-of-range values, junk bytes, non-UTF-8 text,
broken overrides), run in-process through the CLI's ``main``.

For every case: exit status 0 or 2, never an exception; on 2 a message that starts with
``mopd validate: invalid config in <file>``, names a field or the file, and is bounded.
Mutations known to be invalid must give 2 and name the mutated field. Hypothesis runs
derandomized (the same cases on every run) with about 300 cases in all.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mopd.cli import main
from mopd.config.load import MAX_PROBLEM_CHARS, MAX_PROBLEMS

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TREES = {p.name: yaml.safe_load(p.read_text()) for p in CONFIGS}
MAX_MESSAGE = MAX_PROBLEMS * (MAX_PROBLEM_CHARS + 8) + 1000

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 65536, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", " ", "a b", "{x}", "${nope}", "${run.name}", "models:/x/latest", "???"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def run_validate(path: Path, overrides: list[str] = ()) -> tuple[int, str]:
    """``mopd validate`` in this process: (exit status, stderr). Any exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["validate", str(path), *overrides])
    text = err.getvalue()
    assert rc in (0, 2), (rc, text[:2000])
    if rc == 2:
        assert text.startswith(f"mopd validate: invalid config in {path}"), text[:500]
        assert len(text) <= MAX_MESSAGE, len(text)
        assert "Traceback" not in text
        body = text.split("\n", 1)[1]
        assert body.startswith("  - ") and len(body.strip()) > 4, text[:500]
    return rc, text


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a YAML tree (mapping keys and list indices)."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((*prefix, k))
            out += paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.append((*prefix, i))
            out += paths(v, (*prefix, i))
    return out


def display(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parent_of(tree: Any, path: tuple) -> Any:
    node = tree
    for part in path[:-1]:
        node = node[part]
    return node


def write(tmp: str, name: str, data: bytes) -> Path:
    path = Path(tmp) / name
    path.write_bytes(data)
    return path


def dump(tree: Any) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True).encode()


def copy(tree: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(tree))


FREE_FORM = ("server_args", "generator_args", "config", "overrides", "serving", "base")
"""Sections whose keys are free (or checked against another schema than their parent's)."""


def sections(tree: Any) -> list[tuple]:
    """Paths of the mappings that are schema sections (unknown keys are refused there)."""
    return [
        p
        for p in paths(tree)
        if isinstance(parent_of(tree, p)[p[-1]], dict)
        and not any(part in FREE_FORM or str(part).startswith("tool_max") for part in p)
    ]


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_mutated_configs_never_crash_and_name_the_field(data):
    name = data.draw(st.sampled_from(sorted(TREES)))
    tree = copy(TREES[name])
    pipeline = "stages" in tree
    kind = data.draw(st.sampled_from(["set", "set", "delete", "unknown", "section", "required"]))
    known_bad = None  # a fragment the message must hold: the mutation is surely invalid
    if kind in ("set", "delete"):
        where = data.draw(st.sampled_from(paths(tree)))
        parent = parent_of(tree, where)
        if kind == "set":
            parent[where[-1]] = data.draw(VALUES)
        else:
            del parent[where[-1]]
    elif kind == "unknown":
        where = data.draw(st.sampled_from(sections(tree)))
        parent_of(tree, where)[where[-1]]["zz_not_a_key"] = 1
        known_bad = f"{display(where)}.zz_not_a_key: unknown key"
    elif kind == "section":
        where = (
            data.draw(st.sampled_from(sorted(k for k, v in tree.items() if isinstance(v, dict)))),
        )
        tree[where[0]] = data.draw(st.sampled_from([[1, 2], 3, "text", True]))
        known_bad = f"{display(where)}: a "  # a section / a mapping, not ...
    elif pipeline:  # "required": the pipeline sets model.path itself; drop a teacher's domain
        del tree["stages"]["teachers"][0]["domain"]
        known_bad = "stages.teachers[0].domain"
    else:
        del tree["model"]["path"]
        known_bad = "model.path: required field has no value"
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, name, dump(tree))
        rc, err = run_validate(path)
    if known_bad is not None:
        assert rc == 2 and known_bad in err, (known_bad, err[:1000])


@settings(FUZZ, max_examples=60)
@given(
    name=st.sampled_from(sorted(TREES)),
    junk=st.binary(min_size=1, max_size=200),
    where=st.floats(min_value=0, max_value=1),
    how=st.sampled_from(["insert", "replace", "truncate", "latin1"]),
)
def test_junk_bytes_and_non_utf8_never_crash(name, junk, where, how):
    data = (REPO / "configs" / name).read_bytes()
    cut = int(where * len(data))
    if how == "insert":
        data = data[:cut] + junk + data[cut:]
    elif how == "replace":
        data = junk
    elif how == "truncate":
        data = data[:cut]
    else:  # a non-ASCII character written as latin-1: not UTF-8
        data = data[:cut] + b"\xe9" + data[cut:]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, name, data)
        rc, err = run_validate(path)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert rc == 2 and "not UTF-8 text" in err, err[:500]


def override_keys(tree: Any) -> list[str]:
    return [".".join(str(p) for p in path) for path in paths(tree)]


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_bad_overrides_never_crash_and_name_the_override(data):
    name = data.draw(st.sampled_from(sorted(TREES)))
    keys = override_keys(TREES[name])
    key = data.draw(st.sampled_from(keys) | st.sampled_from(["nope", "trainer.nope", "run.name.x"]))
    value = data.draw(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
        | st.sampled_from(
            ["[1,", "{a:", "[1, 2]", "{a: 1}", "null", "-1", "1e999", "'x", "${", "]"]
        )
    )
    broken = value in ("[1,", "{a:")
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, name, (REPO / "configs" / name).read_bytes())
        rc, err = run_validate(path, [f"{key}={value}"])
    if broken or key in ("nope", "trainer.nope"):
        assert rc == 2 and f"override '{key}=" in err, err[:1000]
