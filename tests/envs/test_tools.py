"""The tool-call parser on well-formed and malformed messages (a table of what models get
wrong), and the tools on a real sandbox: str_replace's exactly-one-match rule and path
confinement, bash observations that say which limit was hit, finish."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from envs.sandbox import Sandbox, SandboxLimits
from envs.tools import (
    TOOL_SPECS,
    Observation,
    ToolCall,
    format_observation,
    parse_tool_calls,
    run_tool,
)
from tests.envs.marks import needs_root


def _call(name: str, **arguments: object) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_parses_every_call_in_order_and_text_around_them():
    text = (
        "Let me look first.\n"
        + _call("bash", command="ls -la")
        + "\nthen edit\n"
        + _call("str_replace", path="a.py", old="x = 1", new="x = 2\n")
        + _call("finish", answer="done")
    )
    result = parse_tool_calls(text)
    assert result.error is None
    assert result.calls == (
        ToolCall("bash", {"command": "ls -la"}),
        ToolCall("str_replace", {"path": "a.py", "old": "x = 1", "new": "x = 2\n"}),
        ToolCall("finish", {"answer": "done"}),
    )


def test_no_tool_call_is_not_an_error():
    assert parse_tool_calls("The answer is 42.") == parse_tool_calls("")
    assert parse_tool_calls("plain text").calls == () and parse_tool_calls("x").error is None


def test_arguments_as_a_json_string_are_accepted():
    text = '<tool_call>{"name": "bash", "arguments": "{\\"command\\": \\"pwd\\"}"}</tool_call>'
    assert parse_tool_calls(text).calls == (ToolCall("bash", {"command": "pwd"}),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<tool_call>{'name': 'bash'}</tool_call>", "not valid JSON"),
        (
            '<tool_call>{"name": "bash", "arguments": {"command": "ls"}</tool_call>',
            "not valid JSON",
        ),
        ("<tool_call></tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "bash", "arguments": {"command": "ls"}}', "do not pair up"),
        ('{"name": "bash"}</tool_call>', "do not pair up"),
        ('<tool_call><tool_call>{"name": "finish"}</tool_call>', "do not pair up"),
        ('<tool_call>["bash", "ls"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "python", "arguments": {}}</tool_call>', "unknown tool 'python'"),
        ('<tool_call>{"arguments": {"command": "ls"}}</tool_call>', "unknown tool None"),
        ('<tool_call>{"name": "bash", "arguments": {}}</tool_call>', "missing argument"),
        ('<tool_call>{"name": "bash"}</tool_call>', "missing argument"),
        (_call("bash", command="ls", timeout=5), "unexpected argument"),
        (_call("bash", command=["ls", "-la"]), "'command' must be a string, got list"),
        (_call("str_replace", path="a", old=1, new="b"), "'old' must be a string, got int"),
        (_call("finish", answer=None), "'answer' must be a string"),
        (_call("str_replace", path="a", old="b"), "missing argument(s) ['new']"),
        ('<tool_call>{"name": "bash", "arguments": [1]}</tool_call>', "must be an object"),
        ('<tool_call>{"name": "bash", "arguments": "{oops"}</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "bash", "args": {"command": "ls"}}</tool_call>', "unexpected keys"),
        (_call("bash", command="ls") + "<tool_call>{bad}</tool_call>", "tool call 2 is not valid"),
    ],
)
def test_malformed_calls_give_an_actionable_error_and_no_calls(text, message):
    result = parse_tool_calls(text)
    assert result.calls == ()
    assert result.error is not None and message in result.error


def test_tool_specs_describe_the_three_tools():
    names = [spec["function"]["name"] for spec in TOOL_SPECS]
    assert names == ["bash", "str_replace", "finish"]
    for spec in TOOL_SPECS:
        params = spec["function"]["parameters"]
        assert spec["type"] == "function" and params["type"] == "object"
        assert set(params["required"]) == set(params["properties"])
    json.dumps(TOOL_SPECS)  # goes into the system prompt as JSON


def test_format_observation():
    assert format_observation(Observation("hi\n[exit code 0]")) == (
        "<tool_response>\nhi\n[exit code 0]\n</tool_response>"
    )


LIMITS = SandboxLimits(
    cpu_seconds=5,
    wall_seconds=2,
    max_output_bytes=1000,
    max_file_bytes=1 << 20,
    max_disk_bytes=8 << 20,
)


@pytest.fixture
def sandbox(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\ny = 1\nz = 'x = 1'\n")
    with Sandbox(src, LIMITS, base_dir=tmp_path / "sb") as sb:
        yield sb


def _run(sandbox: Sandbox, name: str, **arguments: str) -> Observation:
    return run_tool(sandbox, ToolCall(name, arguments))


@needs_root
def test_str_replace_needs_exactly_one_match(sandbox):
    original = sandbox.read_text("a.py")
    many = _run(sandbox, "str_replace", path="a.py", old="x = 1", new="x = 2")
    assert many.is_error and "matched 2 times" in many.text and "unchanged" in many.text
    none = _run(sandbox, "str_replace", path="a.py", old="w = 1", new="w = 2")
    assert none.is_error and "was not found" in none.text
    empty = _run(sandbox, "str_replace", path="a.py", old="", new="q")
    assert empty.is_error and "empty" in empty.text
    assert sandbox.read_text("a.py") == original
    one = _run(sandbox, "str_replace", path="a.py", old="x = 1\ny", new="x = 2\ny")
    assert not one.is_error and one.text == "Replaced 1 occurrence in a.py (at line 1)."
    assert sandbox.read_text("a.py") == "x = 2\ny = 1\nz = 'x = 1'\n"
    absolute = _run(sandbox, "str_replace", path="/workspace/a.py", old="y = 1", new="y = 3")
    assert not absolute.is_error and "at line 2" in absolute.text
    # the sandbox sees the edit and can still write the file (ownership kept)
    bash = _run(sandbox, "bash", command="python3 -c 'import a; print(a.x + a.y)'; echo >> a.py")
    assert bash.text == "5\n[exit code 0]" and not bash.is_error


@needs_root
def test_str_replace_refuses_paths_outside_the_workdir(sandbox, tmp_path):
    outside = tmp_path / "host.txt"
    outside.write_text("x = 1")
    _run(sandbox, "bash", command=f"ln -s {outside} link")
    for path in ("../host.txt", str(outside), "/etc/passwd", "link", "../../../../etc/passwd"):
        obs = _run(sandbox, "str_replace", path=path, old="x = 1", new="pwned")
        assert obs.is_error and "outside the working directory" in obs.text, path
    assert outside.read_text() == "x = 1"
    missing = _run(sandbox, "str_replace", path="nope.py", old="a", new="b")
    assert missing.is_error and "no such file" in missing.text
    directory = _run(sandbox, "str_replace", path=".", old="a", new="b")
    assert directory.is_error and "directory" in directory.text


@needs_root
def test_bash_observations_name_the_limit(sandbox):
    ok = _run(sandbox, "bash", command="echo hi; echo oops >&2")
    assert ok.text == "hi\noops\n[exit code 0]" and not ok.is_error
    failed = _run(sandbox, "bash", command="exit 3")
    assert failed.is_error and failed.text == "[exit code 3]"
    slow = _run(sandbox, "bash", command="echo start; sleep 30")
    assert slow.is_error and slow.text == "start\n[killed: wall-time limit 2s exceeded]"
    loud = _run(sandbox, "bash", command="yes")
    assert loud.is_error and loud.text.endswith(
        "[output truncated at 1000 bytes; the command was stopped. Print less, e.g. pipe "
        "through head or tail]"
    )
    assert len(loud.text) < 1200
    big = _run(sandbox, "bash", command="head -c 2000000 /dev/zero > f")
    assert big.is_error and "[file-size limit 1.0 MiB exceeded]" in big.text


@needs_root
def test_finish_ends_the_episode(sandbox):
    obs = _run(sandbox, "finish", answer="fixed the off-by-one")
    assert obs.finished and obs.answer == "fixed the off-by-one" and not obs.is_error


@needs_root
def test_parse_then_run_round_trip(sandbox):
    message = _call("bash", command="cat a.py | wc -l") + _call("finish", answer="3 lines")
    observations = [run_tool(sandbox, call) for call in parse_tool_calls(message).calls]
    assert observations[0].text == "3\n[exit code 0]"
    assert observations[1].finished


@needs_root
def test_a_workdir_over_the_disk_limit_is_reported_with_its_figures(tmp_path):
    limits = SandboxLimits(wall_seconds=5, cpu_seconds=5, max_inodes=100, max_disk_bytes=8 << 20)
    with Sandbox(None, limits, base_dir=tmp_path / "sb") as sb:
        flood = _run(sb, "bash", command="mkdir d && for i in $(seq 150); do : > d/f$i; done")
        after = _run(sb, "bash", command="ls | wc -l")
    assert flood.is_error
    assert re.search(r"the working directory held (at least )?1[0-5]\d entries", flood.text)
    assert "limits of 100 entries (files and directories) and 8.0 MiB" in flood.text
    assert "it has been emptied" in flood.text
    assert after.text == "0\n[exit code 0]"
