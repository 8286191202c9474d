"""The parts of one MOPD step, each alone and in-process: the floor of a synchronous step.

On the job of ``bench_vs_trl.py`` (its checkpoints: run that first with ``--work DIR``, or
pass ``--student``/``--teacher``), 64 prompts per step, this times what a strictly on-policy
step cannot overlap, with no HTTP, Ray, Redis or driver in between:

- rollout: the embedded engine (``rollout.engine.Engine``) generating 64 x 16 tokens with
  log-probs and routed experts, next to transformers ``generate`` on the same prompts;
- teacher: the engine scoring the 64 sequences (prefill only, top-16 log-probs);
- train: a transformers forward + backward + AdamW step of the student on the 64 sequences.

Their sum is what a synchronous step costs at best with these model implementations; the
difference to ``time/step_s`` of a run is the platform's overhead.

    python benchmarks/bench_loop_parts.py --work /tmp/bench-vs-trl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", help="the --work folder of bench_vs_trl.py (uses its small job)")
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    student = args.student or str(Path(args.work) / "small" / "small-student")
    teacher = args.teacher or str(Path(args.work) / "small" / "small-teacher")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.engine import Engine, EngineConfig, Request, SamplingParams

    tok = AutoTokenizer.from_pretrained(student)
    prompts = [tok(f"{10 + i}+{99 - i}=")["input_ids"] for i in range(args.prompts)]
    n, k = args.prompts, args.new_tokens
    out: dict[str, float] = {}

    torch.set_num_threads(1)  # as the run's engine servers
    engine = Engine(EngineConfig(model_path=student, max_running_requests=n,
                                 enable_return_routed_experts=True))  # fmt: skip
    engine.start()
    sampling = SamplingParams(max_new_tokens=k, temperature=1.0, ignore_eos=True)
    outs: list = []

    def generate() -> None:
        reqs = [Request(input_ids=list(p), sampling=sampling, return_logprob=True,
                        return_routed_experts=True) for p in prompts]  # fmt: skip
        outs[:] = engine.generate(reqs)

    out["rollout_engine_s"] = _time(generate, args.repeats)
    engine.shutdown()

    scorer = Engine(EngineConfig(model_path=teacher, max_running_requests=n))
    scorer.start()
    sequences = [list(p) + list(o.output_ids) for p, o in zip(prompts, outs, strict=True)]

    def score() -> None:
        scorer.generate([
            Request(input_ids=s, sampling=SamplingParams(max_new_tokens=0), return_logprob=True,
                    logprob_start_len=len(p) - 1, top_logprobs_num=16)
            for s, p in zip(sequences, prompts, strict=True)
        ])  # fmt: skip

    out["teacher_score_s"] = _time(score, args.repeats)
    scorer.shutdown()

    torch.set_num_threads(2)  # as the run's trainer (cluster.num_cpus)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    ids = torch.tensor(prompts)
    model.eval()

    def hf_generate() -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=True,
                           pad_token_id=tok.pad_token_id)  # fmt: skip

    out["rollout_hf_generate_s"] = _time(hf_generate, args.repeats)
    model.train()
    full = torch.tensor(sequences)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        logits = model(full).logits
        logits.log_softmax(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    out["train_fwd_bwd_adam_s"] = _time(train, args.repeats)
    out["sync_step_floor_s"] = (
        out["rollout_engine_s"] + out["teacher_score_s"] + out["train_fwd_bwd_adam_s"]
    )
    tokens = n * (len(prompts[0]) + k)
    out["floor_tokens_per_s"] = tokens / out["sync_step_floor_s"]
    for key, value in out.items():
        print(f"{key:24s} {value:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
