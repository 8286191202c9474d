"""The launcher: SGLang command lines held to SGLang's flags, and real processes started/stopped."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from mopd.inference.client import EngineClient
from mopd.inference.sglang_schema import SERVER_FLAGS, SGLANG_VERSION
from rollout.launcher import (
    LaunchSpec,
    ServerProcess,
    ServerStartError,
    SpeculativeSpec,
    build_command,
    flags_of,
    launch_server,
    spec_from_server_args,
)

REPO = Path(__file__).resolve().parents[2]

FULL_SPEC = LaunchSpec(
    model_path="ckpt/mimo",
    backend="sglang",
    tokenizer_path="ckpt/tok",
    host="10.0.0.5",
    port=30001,
    dtype="bfloat16",
    context_length=32768,
    random_seed=7,
    enable_return_routed_experts=True,
    tp_size=8,
    ep_size=8,
    dp_size=2,
    mem_fraction_static=0.8,
    max_running_requests=256,
    quantization="fp8",
    speculative=SpeculativeSpec("NEXTN", num_steps=3, eagle_topk=1, num_draft_tokens=4),
    weight_version="0",
    enable_memory_saver=True,
    trust_remote_code=True,
    log_level="info",
    extra_args={
        "chunked_prefill_size": 8192,
        "--disable-radix-cache": True,
        "cuda_graph_bs_decode": [1, 2],
    },
)

# The flags the launcher emits for its own fields: adding one means checking it in SGLang.
LAUNCHER_FLAGS = {
    "--model-path", "--tokenizer-path", "--host", "--port", "--dtype", "--context-length",
    "--random-seed", "--enable-return-routed-experts", "--tp-size", "--ep-size", "--dp-size",
    "--mem-fraction-static", "--max-running-requests", "--quantization", "--weight-version",
    "--enable-memory-saver", "--trust-remote-code", "--log-level", "--speculative-algorithm",
    "--speculative-num-steps", "--speculative-eagle-topk", "--speculative-num-draft-tokens",
    "--speculative-draft-model-path",
}  # fmt: skip


def sglang_parser() -> argparse.ArgumentParser:
    """An argparse parser with SGLang's flags and their arities, from the checked-in list."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    for flag, kind in SERVER_FLAGS.items():
        if kind == "bool":
            parser.add_argument(flag, action="store_true")
        elif kind == "list":
            parser.add_argument(flag, nargs="+")
        else:
            parser.add_argument(flag)
    return parser


def test_every_flag_the_launcher_can_emit_is_an_sglang_flag():
    assert SGLANG_VERSION == "0.5.23"
    assert set(SERVER_FLAGS) >= LAUNCHER_FLAGS, LAUNCHER_FLAGS - set(SERVER_FLAGS)
    full = FULL_SPEC.__class__(
        **{**FULL_SPEC.__dict__, "speculative": SpeculativeSpec("EAGLE", 1, 1, 2, "draft")}
    )
    emitted = set(flags_of(build_command(full))) - {"--chunked-prefill-size",
                                                   "--disable-radix-cache", "--cuda-graph-bs-decode"}  # fmt: skip
    assert emitted == LAUNCHER_FLAGS


def test_sglang_command_line_parses_with_sglangs_flags():
    argv = build_command(FULL_SPEC)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    args = sglang_parser().parse_args(argv[3:])
    assert args.model_path == "ckpt/mimo" and args.tokenizer_path == "ckpt/tok"
    assert (args.host, args.port) == ("10.0.0.5", "30001")
    assert (args.tp_size, args.ep_size, args.dp_size) == ("8", "8", "2")
    assert args.enable_return_routed_experts and args.enable_memory_saver
    assert args.quantization == "fp8" and args.mem_fraction_static == "0.8"
    assert args.speculative_algorithm == "NEXTN" and args.speculative_num_draft_tokens == "4"
    assert args.chunked_prefill_size == "8192" and args.disable_radix_cache
    assert args.cuda_graph_bs_decode == ["1", "2"]


def test_defaults_emit_only_what_is_set():
    argv = build_command(LaunchSpec(model_path="m", port=1234))
    assert argv[1:] == ["-m", "rollout.server", "--model-path", "m", "--host", "127.0.0.1",
                        "--port", "1234"]  # fmt: skip


def test_embedded_and_sglang_differ_only_in_module():
    common = {k: v for k, v in FULL_SPEC.__dict__.items() if k != "backend"}
    embedded = build_command(LaunchSpec(**common, backend="embedded"))
    sglang = build_command(LaunchSpec(**common, backend="sglang"))
    assert embedded[2] == "rollout.server" and sglang[2] == "sglang.launch_server"
    assert embedded[3:] == sglang[3:]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tp_szie": 2}, "--tp-szie.*not a flag of SGLang 0.5.23"),
        ({"enable_return_routed_experts": "yes"}, "switch"),
    ],
)
def test_bad_extra_args_are_rejected_by_name(extra, match):
    with pytest.raises(ValueError, match=match):
        LaunchSpec(model_path="m", extra_args=extra)


def test_extra_args_may_not_repeat_spec_fields():
    with pytest.raises(ValueError, match="--tp-size"):
        build_command(LaunchSpec(model_path="m", tp_size=2, extra_args={"--tp-size": 4}))


def test_spec_from_config_server_args():
    spec = spec_from_server_args(
        "m", "sglang", {"tp_size": 4, "chunked_prefill_size": 4096}, host="0.0.0.0"
    )
    assert spec.tp_size == 4 and spec.extra_args == {"chunked_prefill_size": 4096}
    assert "--chunked-prefill-size" in build_command(spec)
    with pytest.raises(ValueError, match="speculative algorithm"):
        SpeculativeSpec("MEDUSA")


def standin_spec(**kwargs) -> LaunchSpec:
    return LaunchSpec(
        model_path=kwargs.pop("model_path", "standin"),
        module="tests.inference.sglang_standin",
        cwd=str(REPO),
        **kwargs,
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_wait_and_stop_a_real_server(tmp_path):
    log = tmp_path / "server.log"
    server = launch_server(standin_spec(weight_version="9"), startup_timeout_s=60, log_path=log)
    try:
        assert server.alive() and server.port > 0

        async def version():
            async with EngineClient(server.url) as client:
                return await client.weight_version()

        assert asyncio.run(version()) == "9"
        assert "'--weight-version', '9'" in log.read_text()
    finally:
        code = server.stop(grace_s=10)
    assert code is not None and not server.alive()
    assert _gone(server.pid)


def test_startup_failure_reports_the_log_tail(tmp_path):
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: cannot load"):
        launch_server(standin_spec(model_path="crash"), 60, log_path=tmp_path / "x.log")


def test_startup_timeout_stops_the_process(tmp_path):
    server = ServerProcess(standin_spec(), log_path=tmp_path / "x.log")
    with pytest.raises(ServerStartError, match="not healthy after"):
        server.wait_healthy(timeout_s=0.01)
    assert not server.alive()


def test_stop_escalates_to_sigkill(tmp_path):
    server = launch_server(
        standin_spec(extra_argv=("--ignore-sigterm",)), 60, log_path=tmp_path / "x.log"
    )
    t0 = time.monotonic()
    code = server.stop(grace_s=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - t0 < 10 and _gone(server.pid)
