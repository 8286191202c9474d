"""Tools a model calls during an agentic rollout, the format it calls them in, and what it sees back.

Format (Hermes / Qwen2.5, the one SGLang's ``qwen25`` and ``hermes`` tool parsers read): the
model writes one or more blocks

    <tool_call>
    {"name": "bash", "arguments": {"command": "python3 -m unittest -q"}}
    </tool_call>

anywhere in its message. ``parse_tool_calls`` returns **every** call of the message, in order
(the ``ToolManager`` runs them in that order and stops at ``finish``). ``arguments`` may also be
a JSON string holding the object (OpenAI style). A message with no ``<tool_call>`` has no calls
and no error. A message with any malformed call (bad JSON, unknown tool, missing or extra
argument, wrong type, unclosed tag) yields no calls and an ``error`` the model can act on; the
``ToolManager`` sends it back as an error observation and the rollout continues.

Tools (``TOOL_SPECS`` describes them to the model, OpenAI function style):

- ``bash(command)``: ``bash -c command`` in the sandbox, cwd ``/workspace``; stdout and stderr
  interleaved, then the exit code and any limit the command ran into, said plainly
  (``[killed: wall-time limit 5s exceeded]``, ``[output truncated at 65536 bytes ...]``).
- ``str_replace(path, old, new)``: replace the one occurrence of ``old`` in the file at
  ``path`` (relative to ``/workspace`` or under it) by ``new``. Zero or several matches leave
  the file untouched and say how many matched; paths outside the working directory are
  refused.
- ``finish(answer)``: end the episode with a final answer (``Observation.finished``).

Observations go back to the model as ``<tool_response>...</tool_response>``
(``format_observation``), the block Qwen's chat template puts in a ``tool`` turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envs.sandbox import SANDBOX_WORKDIR, ExecResult, Sandbox

__all__ = [
    "TOOL_SPECS",
    "Observation",
    "ParseResult",
    "ToolCall",
    "format_observation",
    "parse_tool_calls",
    "run_tool",
]

TOOL_SPECS: tuple[dict[str, Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": (
                f"Run a bash command in the sandbox (working directory {SANDBOX_WORKDIR}, no "
                "network, limited time, memory and output). Returns stdout and stderr "
                "interleaved and the exit code."
            ),
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string", "description": "The command."}},
                "required": ["command"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "str_replace",
            "description": (
                "Replace the single occurrence of `old` in a file by `new`. `old` must match "
                "exactly once (include surrounding lines to make it unique)."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {
                        "type": "string",
                        "description": f"File path relative to {SANDBOX_WORKDIR}.",
                    },
                    "old": {"type": "string", "description": "Exact text to replace."},
                    "new": {"type": "string", "description": "Replacement text."},
                },
                "required": ["path", "old", "new"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "finish",
            "description": "End the task with a final answer (a short summary when there is none).",
            "parameters": {
                "type": "object",
                "properties": {"answer": {"type": "string", "description": "The final answer."}},
                "required": ["answer"],
            },
        },
    },
)

_SPECS = {spec["function"]["name"]: spec["function"]["parameters"] for spec in TOOL_SPECS}
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from a model message; ``run_tool`` executes it."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParseResult:
    """``parse_tool_calls``'s answer: the calls in message order, or an error for the model
    (then ``calls`` is empty)."""

    calls: tuple[ToolCall, ...]
    error: str | None = None


@dataclass(frozen=True)
class Observation:
    """What a tool call returned, for the ``ToolManager``. ``text`` is shown to the model
    (``format_observation``); ``is_error`` marks a failed call (also a command that exited
    non-zero or hit a limit); ``finished``/``answer`` are set by ``finish`` only."""

    text: str
    is_error: bool = False
    finished: bool = False
    answer: str | None = None


def _error(message: str) -> ParseResult:
    return ParseResult(calls=(), error=message)


def _check_call(index: int, payload: Any) -> ToolCall | str:
    where = f"tool call {index + 1}"
    if not isinstance(payload, dict):
        return f'{where} must be a JSON object {{"name": ..., "arguments": {{...}}}}'
    extra_keys = set(payload) - {"name", "arguments"}
    if extra_keys:
        return f"{where} has unexpected keys {sorted(extra_keys)}; use only 'name' and 'arguments'"
    name = payload.get("name")
    if not isinstance(name, str) or name not in _SPECS:
        return f"{where} names unknown tool {name!r}; available tools: {', '.join(_SPECS)}"
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI style: the arguments object as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return f"{where} ({name}): 'arguments' is a string that is not valid JSON ({exc})"
    if not isinstance(arguments, dict):
        return f"{where} ({name}): 'arguments' must be an object, got {type(arguments).__name__}"
    params = _SPECS[name]
    missing = [p for p in params["required"] if p not in arguments]
    if missing:
        return f"{where} ({name}) is missing argument(s) {missing}; it takes {list(params['properties'])}"
    extra = [a for a in arguments if a not in params["properties"]]
    if extra:
        return f"{where} ({name}) got unexpected argument(s) {extra}; it takes {list(params['properties'])}"
    for arg, value in arguments.items():
        expected = params["properties"][arg]["type"]
        ok = isinstance(value, _JSON_TYPES[expected]) and not (
            expected != "boolean" and isinstance(value, bool)
        )
        if not ok:
            return (
                f"{where} ({name}): argument '{arg}' must be a {expected}, got "
                f"{type(value).__name__} {json.dumps(value)[:60]}"
            )
    return ToolCall(name=name, arguments=dict(arguments))


def parse_tool_calls(text: str) -> ParseResult:
    """Every ``<tool_call>{json}</tool_call>`` of a model message, validated against
    ``TOOL_SPECS``; see the module docstring for the format and the error policy."""
    blocks = _BLOCK.findall(text)
    opened, closed = text.count(_OPEN), text.count(_CLOSE)
    if opened != len(blocks) or closed != len(blocks):
        return _error(
            f"malformed tool call: {opened} '{_OPEN}' and {closed} '{_CLOSE}' tags do not pair "
            f'up; write each call as {_OPEN}{{"name": ..., "arguments": {{...}}}}{_CLOSE}'
        )
    calls = []
    for i, block in enumerate(blocks):
        try:
            payload = json.loads(block.strip())
        except json.JSONDecodeError as exc:
            return _error(
                f"tool call {i + 1} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                f'{exc.colno}); write {{"name": ..., "arguments": {{...}}}} with double-quoted '
                "strings and escaped newlines"
            )
        checked = _check_call(i, payload)
        if isinstance(checked, str):
            return _error(checked)
        calls.append(checked)
    return ParseResult(calls=tuple(calls))


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _limit_note(result: ExecResult, sandbox: Sandbox) -> str | None:
    lim = sandbox.limits
    return {
        "wall_time": f"[killed: wall-time limit {lim.wall_seconds:g}s exceeded]",
        "output": (
            f"[output truncated at {lim.max_output_bytes} bytes; the command was stopped. "
            "Print less, e.g. pipe through head or tail]"
        ),
        "cpu_time": f"[killed: cpu-time limit {lim.cpu_seconds:g}s exceeded]",
        "memory": f"[memory limit {_size(lim.memory_bytes)} reached]",
        "processes": f"[process limit {lim.max_processes} reached: fork failed]",
        "file_size": f"[file-size limit {_size(lim.max_file_bytes)} exceeded]",
        "disk": _disk_note(sandbox),
    }.get(result.limit_hit or "")


def _disk_note(sandbox: Sandbox) -> str:
    lim, usage = sandbox.limits, sandbox.last_disk_usage
    held = ""
    if usage is not None:
        least = "" if usage.complete else "at least "
        held = f" held {least}{usage.inodes} entries, {_size(usage.bytes)},"
    return (
        f"[disk limit exceeded: the working directory{held} over its limits of "
        f"{lim.max_inodes} entries (files and directories) and {_size(lim.max_disk_bytes)}; "
        "it has been emptied]"
    )


def _bash(sandbox: Sandbox, command: str) -> Observation:
    result = sandbox.run(command)
    parts = [result.output.rstrip("\n")] if result.output.strip() else []
    if result.truncated and result.limit_hit != "output":
        parts.append(f"[output truncated at {sandbox.limits.max_output_bytes} bytes]")
    note = _limit_note(result, sandbox)
    if note:
        parts.append(note)
    if result.exit_code is not None:
        parts.append(f"[exit code {result.exit_code}]")
    is_error = result.exit_code != 0 or result.limit_hit is not None
    return Observation(text="\n".join(parts), is_error=is_error)


def _str_replace(sandbox: Sandbox, path: str, old: str, new: str) -> Observation:
    if not old:
        return Observation("str_replace: 'old' is empty; give the exact text to replace", True)
    try:
        text = sandbox.read_text(path)
    except ValueError as exc:
        return Observation(f"str_replace refused: {exc}", is_error=True)
    except FileNotFoundError:
        return Observation(f"str_replace: no such file {path!r} in {SANDBOX_WORKDIR}", True)
    except IsADirectoryError:
        return Observation(f"str_replace: {path!r} is a directory, not a file", True)
    except OSError as exc:
        return Observation(f"str_replace: cannot read {path!r}: {exc.strerror}", True)
    count = text.count(old)
    if count != 1:
        how = "was not found" if count == 0 else f"matched {count} times"
        hint = (
            "check the exact text (whitespace and indentation included), e.g. with cat -A"
            if count == 0
            else "include more surrounding lines so that it matches exactly once"
        )
        return Observation(
            f"str_replace: 'old' {how} in {path}; the file is unchanged. To fix: {hint}", True
        )
    try:
        sandbox.write_text(path, text.replace(old, new, 1))
    except (ValueError, OSError) as exc:
        return Observation(f"str_replace: cannot write {path!r}: {exc}", is_error=True)
    line = text[: text.index(old)].count("\n") + 1
    return Observation(f"Replaced 1 occurrence in {path} (at line {line}).")


def run_tool(sandbox: Sandbox, call: ToolCall) -> Observation:
    """Execute one parsed call in ``sandbox``. Model mistakes (a bad path, no unique match)
    come back as error observations; a sandbox that cannot isolate the call raises
    ``SandboxUnavailable`` (an infrastructure failure the ``Toolbox`` handles)."""
    args = call.arguments
    if call.name == "bash":
        return _bash(sandbox, args["command"])
    if call.name == "str_replace":
        return _str_replace(sandbox, args["path"], args["old"], args["new"])
    if call.name == "finish":
        return Observation(text="Finished.", finished=True, answer=args["answer"])
    return Observation(f"unknown tool {call.name!r}; available: {', '.join(_SPECS)}", True)


def format_observation(obs: Observation) -> str:
    """The text appended to the conversation for one observation (inside the ``tool`` turn
    of the chat template)."""
    return f"<tool_response>\n{obs.text}\n</tool_response>"
