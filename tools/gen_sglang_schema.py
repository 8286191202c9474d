"""Regenerate ``mopd/inference/sglang_schema.py`` from an unpacked SGLang wheel.

SGLang cannot be installed on the project's CPU machines, so the field and flag names the
client and launcher rely on are read from SGLang's source with ``ast`` (nothing is imported)
and checked in. To move to a new SGLang version:

    pip download --no-deps sglang==X.Y.Z -d DIR && unzip DIR/sglang-*.whl -d DIR/src
    python tools/gen_sglang_schema.py DIR/src > mopd/inference/sglang_schema.py
    ruff format mopd/inference/sglang_schema.py
    pytest tests/inference tests/rollout/test_launcher.py

and read the diff: a removed field or flag the client emits fails the schema tests.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# io_struct request classes sent as JSON bodies by the client, by route.
_ROUTE_BODIES = {
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/abort_request": "AbortReq",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/get_weights_by_name": "GetWeightsByNameReqInput",
    "/open_session": "OpenSessionReqInput",
    "/close_session": "CloseSessionReqInput",
}


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _fields(cls: ast.ClassDef) -> list[str]:
    return [
        s.target.id
        for s in cls.body
        if isinstance(s, ast.AnnAssign)
        and isinstance(s.target, ast.Name)
        and not s.target.id.startswith("_")
    ]


def _req_fields(classes: dict[str, ast.ClassDef], name: str) -> list[str]:
    cls = classes[name]
    inherited: list[str] = []
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            inherited += _req_fields(classes, base.id)
    return inherited + [f for f in _fields(cls) if f not in inherited]


def _routes(path: Path) -> dict[str, list[str]]:
    routes: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            if not (isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"):
                continue
            if not dec.args or not isinstance(dec.args[0], ast.Constant):
                continue
            route = dec.args[0].value
            if dec.func.attr in ("get", "post", "put", "delete"):
                methods = {dec.func.attr.upper()}
            elif dec.func.attr == "api_route":
                kw = {k.arg: k.value for k in dec.keywords}
                methods = {e.value for e in kw["methods"].elts} if "methods" in kw else {"GET"}
            else:
                continue
            routes.setdefault(route, set()).update(methods)
    return {r: sorted(m) for r, m in sorted(routes.items())}


def _annotation_flag(stmt: ast.AnnAssign) -> tuple[list[str], str] | None:
    """(flag names, kind) for a field annotated ``A[T, "help"]`` or ``A[T, Arg(...)]``."""
    ann = stmt.annotation
    if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name)):
        return None
    if ann.value.id not in ("A", "Annotated") or not isinstance(ann.slice, ast.Tuple):
        return None
    inner, *meta = ann.slice.elts
    arg = next((m for m in meta if isinstance(m, ast.Call) and _name(m.func) == "Arg"), None)
    if arg is None and not any(
        isinstance(m, ast.Constant) and isinstance(m.value, str) for m in meta
    ):
        return None
    kw = {k.arg: k.value for k in arg.keywords} if arg is not None else {}
    if "no_cli" in kw and isinstance(kw["no_cli"], ast.Constant) and kw["no_cli"].value:
        return None
    name = stmt.target.id
    cli = kw["cli_name"].value if "cli_name" in kw else "--" + name.replace("_", "-")
    aliases = [e.value for e in kw["aliases"].elts] if "aliases" in kw else []
    inner_src = ast.unparse(inner)
    nargs = kw["nargs"].value if isinstance(kw.get("nargs"), ast.Constant) else None
    if "action" in kw:
        kind = "action"
    elif nargs in ("*", "+"):
        kind = "list"
    elif inner_src in ("bool", "Optional[bool]"):
        kind = "bool"
    elif inner_src.startswith(("List[", "list[", "Optional[List[", "Optional[list[")) and (
        "type_parser" not in kw
    ):
        kind = "list"
    else:
        kind = "value"
    return [cli, *aliases], kind


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")


def _flags(root: Path) -> dict[str, str]:
    server_args = root / "sglang/srt/server_args.py"
    tree = ast.parse(server_args.read_text())
    namespaces: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in node.targets
        ):
            namespaces = [e.id for e in node.value.elts]
    flags: dict[str, str] = {}
    field_classes: dict[str, ast.ClassDef] = {}
    for path in sorted((root / "sglang/srt/arg_groups/fields").glob("*.py")):
        field_classes.update(_classes(path))
    field_classes["ServerArgs"] = _classes(server_args)["ServerArgs"]
    for cls_name in [*namespaces, "ServerArgs"]:
        for stmt in field_classes[cls_name].body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                found = _annotation_flag(stmt)
                if found:
                    names, kind = found
                    flags.update(dict.fromkeys(names, kind))
    # Flags registered by hand in ServerArgs.add_cli_args.
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            kw = {k.arg: k.value for k in node.keywords}
            action = kw.get("action")
            is_bool = isinstance(action, ast.Constant) and action.value == "store_true"
            kind = "bool" if is_bool else ("action" if action is not None else "value")
            flags.update(dict.fromkeys(names, kind))
    return dict(sorted(flags.items()))


def _version(root: Path) -> str:
    for line in (root / "sglang/_version.py").read_text().splitlines():
        if line.startswith("__version__ ="):
            return line.split("=")[-1].strip().strip("'\"")
    raise SystemExit("no sglang/_version.py: pass the root of an unpacked sglang wheel")


def _set(items: list[str]) -> str:
    return "frozenset(\n    {\n" + "".join(f"        {i!r},\n" for i in sorted(items)) + "    }\n)"


def main(root: Path) -> str:
    io = _classes(root / "sglang/srt/managers/io_struct.py")
    api = _classes(root / "sglang/api/v1/api_types.py")
    version = _version(root)
    out = [
        f"# Generated by tools/gen_sglang_schema.py from SGLang {version}; do not edit.",
        f'"""Names read from SGLang {version}\'s source (generated; do not edit by hand).',
        "",
        "Tests hold every field the client emits and every flag the launcher emits to these",
        "sets. To regenerate (for another SGLang version), from an unpacked SGLang wheel:",
        "",
        "    pip download --no-deps sglang==X.Y.Z -d DIR && unzip DIR/sglang-*.whl -d DIR/src",
        "    python tools/gen_sglang_schema.py DIR/src > mopd/inference/sglang_schema.py",
        "    ruff format mopd/inference/sglang_schema.py",
        '"""',
        "",
        f"SGLANG_VERSION = {version!r}",
        "",
        "# srt/managers/io_struct.py GenerateReqInput: the /generate body FastAPI parses.",
        f"GENERATE_REQ_INPUT_FIELDS = {_set(_fields(io['GenerateReqInput']))}",
        "",
        "# api/v1/api_types.py GenerateRequest: the JSON contract checked before parsing",
        "# (unknown keys ignored there, so the dataclass above is the superset that matters).",
        f"GENERATE_CONTRACT_FIELDS = {_set(_fields(api['GenerateRequest']))}",
        "",
        "# api/v1/api_types.py SamplingParams: unknown keys are rejected with HTTP 400.",
        f"SAMPLING_PARAMS_FIELDS = {_set(_fields(api['SamplingParams']))}",
        "",
        "# api/v1/api_types.py GenerateMetaInfo, plus keys tokenizer_manager.py adds on request",
        "# (routed_experts with return_routed_experts).",
        "META_INFO_FIELDS = "
        + _set([*_fields(api["GenerateMetaInfo"]), "routed_experts", "num_retractions"]),
        "",
        f"GENERATE_RESPONSE_FIELDS = {_set(_fields(api['GenerateResponse']))}",
        "",
        "# srt/managers/io_struct.py SessionParams: GenerateReqInput.session_params.",
        f"SESSION_PARAMS_FIELDS = {_set(_fields(io['SessionParams']))}",
        "",
        "# JSON body fields per admin route (srt/managers/io_struct.py, BaseReq fields included).",
        "ROUTE_BODY_FIELDS = {",
    ]
    for route, cls in _ROUTE_BODIES.items():
        out.append(f"    {route!r}: {_set(_req_fields(io, cls))},".replace("\n", "\n    "))
    out += ["}", "", "# srt/entrypoints/http_server.py: route -> HTTP methods.", "HTTP_ROUTES = {"]
    for route, methods in _routes(root / "sglang/srt/entrypoints/http_server.py").items():
        out.append(f"    {route!r}: {tuple(methods)!r},")
    out += [
        "}",
        "",
        "# `python -m sglang.launch_server` flags (srt/server_args.py, srt/arg_groups/fields/):",
        "# flag -> 'bool' (store_true, no value), 'value', 'list' (nargs='+') or 'action'.",
        "SERVER_FLAGS = {",
    ]
    for flag, kind in _flags(root).items():
        out.append(f"    {flag!r}: {kind!r},")
    out.append("}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.stdout.write(main(Path(sys.argv[1])))
