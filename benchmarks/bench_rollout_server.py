"""Throughput of ``python -m rollout.server`` vs plain transformers ``generate``.

Starts the embedded engine server as a subprocess on a tiny random MiMo-V2-Flash checkpoint
(or ``--model-path``), sends C concurrent ``/generate`` requests (C = 1, 8, 32, 64 by
default) and reports generated tokens per second; then runs ``model.generate`` in-process on
the same model and the same prompts as one static batch of C.

Two workloads: ``uniform`` (every request samples exactly ``--max-new-tokens`` tokens) and
``varied`` (request i samples its own length, uniform in [max/4, 2*max], as RL responses that
stop at different times). ``generate`` cannot stop rows separately, so for ``varied`` it runs
to the longest row and only each row's own tokens count; the server retires finished
requests and admits others. Each number is the best of ``--repeats`` runs: the machine is
shared, and a parallel region stalls whenever the OS deschedules one of its threads; the
medians (last three columns) show how much the runs spread. The server side needs more than
one core (the HTTP client, the server's HTTP thread and its engine thread) where ``generate``
needs one, so other load on the machine costs the server more.

    python benchmarks/bench_rollout_server.py [--model-path DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _lengths(count: int, max_new: int, varied: bool, seed: int) -> list[int]:
    if not varied:
        return [max_new] * count
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(max_new // 4, 2 * max_new + 1, (count,), generator=gen).tolist()


async def _serve_bench(base: str, prompts: list[list[int]], lengths: list[int]) -> float:
    def body(prompt: list[int], n: int) -> dict:
        params = {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True}
        return {"input_ids": prompt, "sampling_params": params}

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(client.post(f"{base}/generate", json=body(p, n)) for p, n in zip(prompts, lengths))
        )
        elapsed = time.perf_counter() - start
    tokens = sum(len(r.json()["output_ids"]) for r in results)
    return tokens / elapsed


def _generate_bench(model, prompts: list[list[int]], lengths: list[int], pad_id: int) -> float:
    max_new = max(lengths)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        pad_token_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == max_new
    return sum(lengths) / elapsed  # only each row's own tokens are useful


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: a fresh tiny MiMo-V2-Flash")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            sys.path.insert(0, str(REPO))
            from mopd.models.tiny import build_tiny_checkpoint

            model_path = str(build_tiny_checkpoint(Path(tmp) / "tiny", "mimo_v2_flash", seed=0))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        pad_id = model.config.pad_token_id or 0
        port = _free_port()
        cmd = [
            sys.executable, "-m", "rollout.server", "--model-path", model_path,
            "--port", str(port), "--dtype", "float32", "--torch-num-threads", str(args.threads),
            "--max-running-requests", str(max(args.concurrency)), "--log-level", "warning",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, env=env, cwd=REPO)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not come up")
                time.sleep(0.3)
            asyncio.run(_serve_bench(base, _prompts(2, vocab, 99), [4, 4]))  # warm-up
            rows = []
            for workload in ("uniform", "varied"):
                for conc in args.concurrency:
                    prompts = _prompts(conc, vocab, seed=conc)
                    lengths = _lengths(conc, args.max_new_tokens, workload == "varied", conc)
                    served = [
                        asyncio.run(_serve_bench(base, prompts, lengths))
                        for _ in range(args.repeats)
                    ]
                    with torch.no_grad():
                        generated = [
                            _generate_bench(model, prompts, lengths, pad_id)
                            for _ in range(args.repeats)
                        ]
                    rows.append((workload, conc, served, generated))
        finally:
            proc.terminate()
            proc.wait(30)

    print(
        f"model: {model_path}  max_new_tokens={args.max_new_tokens}  threads={args.threads}  "
        f"best (and median) of {args.repeats}"
    )
    print(
        f"{'workload':>8}  {'concurrency':>11}  {'server tok/s':>12}  {'generate tok/s':>14}"
        f"  {'ratio':>6}  {'(median':>7}  {'median':>6}  {'ratio)':>6}"
    )
    for workload, conc, served, generated in rows:
        best_s, best_g = max(served), max(generated)
        med_s, med_g = statistics.median(served), statistics.median(generated)
        print(
            f"{workload:>8}  {conc:>11}  {best_s:>12.0f}  {best_g:>14.0f}  {best_s / best_g:>6.2f}"
            f"  {med_s:>7.0f}  {med_g:>6.0f}  {med_s / med_g:>6.2f}"
        )


if __name__ == "__main__":
    main()
