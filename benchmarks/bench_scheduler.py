"""Rollout-slot utilisation of the data scheduler under three policies, in simulated time.

A discrete-event simulation of a rollout engine and a trainer drives the real
``mopd.scheduler.DataScheduler`` (a reasoning-gym ``chain_sum`` source, a byte tokenizer):
groups are handed out by ``next_groups``, finished groups go through ``complete_group`` as
``RolloutSample`` records whose ``versions_T`` come from the simulated timeline, aborted
groups go back through ``requeue``, and every optimizer step takes its batch from
``select_batch`` (staleness admission, partial cap); the staleness of trained samples is read
back from ``DataScheduler.metrics``. Only the engine and the trainer are simulated.

The simulated machine, one tick = one decoding step:

- engine: ``--slots`` sequences decode at once (continuous batching); each running sequence
  emits one token per tick, a freed slot takes the next queued sequence in the same tick.
  Prefill is free. A group is G sequences queued together.
- responses: lengths log-normal(``--mu``, ``--sigma``) rounded and clipped to
  ``[1, --max-tokens]``, drawn per (sample id, attempt), so every policy sees the same
  first-attempt workload and a re-dispatched group samples new lengths.
- trainer: an optimizer step takes ``--train-ticks`` on ``prompts_per_step x G`` samples;
  the weight sync that follows takes ``--sync-ticks``, during which no slot decodes.

Policies (the run's modes, mopd/run/driver.py and mopd/run/producer.py):

- ``batch-sync``: hand out a step's groups at once, wait for the longest response, train, sync.
  Rollout idles during training and sync (``scheduler.mode=sync``).
- ``fine-grained``: a freed slot pulls new work at once; training runs while rollout
  continues, a step trains once ``prompts_per_step x G`` samples are admissible (bounded by
  ``--max-staleness``); at each weight update the groups still generating are aborted and
  handed out again, their tokens wasted (``mode=async``, ``partial_rollout=false``).
- ``partial``: the same, but sequences in flight at an update keep their tokens and continue
  under the new version (``partial_rollout=true``); ``select_batch`` caps partial samples at
  ``--max-partial-fraction`` of a batch and drops samples staler than ``--max-staleness``.

``--refill group`` replaces the async hand-out by the one ``driver.rollout_until`` has today:
at most ``slots // G`` groups rolling, a new group only once a whole group is done, so the
slots its finished samples free stay idle until its longest response ends.

Every generated token is accounted for exactly once: trained, aborted (discarded at a weight
update), stale (dropped by ``select_batch``) or pending (generated but not yet trained when
the last step ends). Utilisation = generated tokens / (slots x ticks), i.e. busy slot-ticks
over all slot-ticks; "useful" counts trained tokens only. The run ends when the last
optimizer step finishes.

    python benchmarks/bench_scheduler.py [--slots 128] [--steps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mopd.config.schema import DataSourceConfig, SchedulerConfig
from mopd.scheduler.scheduler import DataScheduler, PromptGroup
from mopd.scheduler.sources import derive_seed
from mopd.types import RolloutSample, ScoredSample

POLICIES = ("batch-sync", "fine-grained", "partial")
_INF = math.inf


def _tokenize(text: str) -> list[int]:
    return list(text.encode())  # prompt length does not matter here: prefill is free


@dataclass(eq=False)
class _Seq:
    """One response on the simulated engine."""

    group_id: str
    sample_id: str
    length: int
    reward: float
    done: int = 0
    """Tokens generated before the current decoding segment."""
    resume: int = -1
    """Tick the current decoding segment started (-1: queued or paused)."""
    seg_version: int = 0
    """Policy version that decodes the current segment."""
    versions: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def generated(self, now: int) -> int:
        return self.done + (now - self.resume if self.resume >= 0 else 0)


@dataclass(eq=False)
class _GroupRun:
    group: PromptGroup
    seqs: list[_Seq]
    finished: list[tuple[_Seq, RolloutSample]] = field(default_factory=list)


@dataclass
class Tally:
    """Token and sample counters of one simulated run."""

    ticks: int = 0
    trained_tokens: int = 0
    aborted_tokens: int = 0
    stale_tokens: int = 0
    pending_tokens: int = 0
    trained_samples: int = 0
    partial_samples: int = 0
    steps: int = 0
    aborted_groups: int = 0
    stale_samples: int = 0
    empty_selections: int = 0
    """Steps where select_batch chose nothing although enough samples were admissible."""
    spanning_groups: int = 0
    """Groups in flight across a weight update that continued under the new version."""

    @property
    def generated_tokens(self) -> int:
        return self.trained_tokens + self.aborted_tokens + self.stale_tokens + self.pending_tokens


class Simulation:
    """The engine, the trainer and the real DataScheduler for one policy (see module doc)."""

    def __init__(self, policy: str, args: argparse.Namespace) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}; accepted: {', '.join(POLICIES)}")
        self.policy = policy
        self.args = args
        self.asynchronous = policy != "batch-sync"
        self.partial = policy == "partial"
        source = DataSourceConfig(
            name="chain_sum",
            domain="math",
            generator="chain_sum",
            generator_args={"format": "compact"},
            group_size=args.group_size,
            max_response_tokens=args.max_tokens,
            dynamic_sampling=False,  # every group trains: the benchmark is about time, not signal
        )
        config = SchedulerConfig(
            mode="async" if self.asynchronous else "sync",
            prompts_per_step=args.prompts_per_step,
            max_staleness=args.max_staleness,
            partial_rollout=self.partial,
            max_partial_fraction=args.max_partial_fraction,
            max_inflight_groups=args.max_inflight_groups,
        )
        self.sched = DataScheduler([source], config, tokenize=_tokenize, seed=args.seed)
        self.want = args.prompts_per_step * args.group_size
        self.now = 0
        self.engine_version = 0
        self.trainer_version = 0
        self.paused = False
        self.queue: deque[_Seq] = deque()
        self.running: dict[int, _Seq] = {}
        self.heap: list[tuple[int, int, _Seq]] = []  # (finish tick, serial, seq)
        self.serial = 0
        self.groups: dict[str, _GroupRun] = {}
        self.attempts: dict[str, int] = {}
        self.candidates: list[ScoredSample] = []  # completed, waiting for the trainer
        self.admit_cache: dict[str, tuple[int, bool]] = {}
        self.dirty = True  # candidates or version changed since the trainer last looked
        self.trainer = "idle"  # idle | train | sync
        self.trainer_until = _INF
        self.tally = Tally()
        self.busy_slot_ticks = 0
        self.trained_lengths: list[int] = []

    # ------------------------------------------------------------------ engine

    def _dispatch(self, group: PromptGroup) -> None:
        attempt = self.attempts.get(group.group_id, 0)
        self.attempts[group.group_id] = attempt + 1
        seqs = []
        for sid in group.sample_ids():
            rng = np.random.default_rng(derive_seed(self.args.seed, sid, attempt))
            raw = rng.lognormal(self.args.mu, self.args.sigma)
            length = int(min(max(round(raw), 1), self.args.max_tokens))
            seqs.append(_Seq(group.group_id, sid, length, float(rng.random() < 0.5)))
        self.groups[group.group_id] = _GroupRun(group, seqs)
        self.queue.extend(seqs)

    def _start(self, seq: _Seq) -> None:
        seq.resume, seq.seg_version = self.now, self.engine_version
        self.serial += 1
        self.running[self.serial] = seq
        heapq.heappush(self.heap, (self.now + seq.length - seq.done, self.serial, seq))

    def _close_segment(self, seq: _Seq) -> None:
        n = self.now - seq.resume
        if n > 0:
            seq.versions.append(seq.seg_version)
            seq.counts.append(n)
            seq.done += n
        seq.resume = -1

    def _fill(self) -> None:
        """Freed slots pull work: queued sequences first, then (async) new groups."""
        if self.paused:
            return
        if self.asynchronous:
            width = max(1, self.args.slots // self.args.group_size)
            while (
                len(self.groups) < width
                if self.args.refill == "group"
                else len(self.queue) < self.args.slots - len(self.running)
            ):
                got = self.sched.next_groups(1)
                if not got:
                    break  # back-pressure: max_inflight_groups reached
                self._dispatch(got[0])
        while self.queue and len(self.running) < self.args.slots:
            self._start(self.queue.popleft())

    def _finish_next(self) -> None:
        _, serial, seq = heapq.heappop(self.heap)
        del self.running[serial]
        self._close_segment(seq)
        run = self.groups[seq.group_id]
        sample = RolloutSample(
            sample_id=seq.sample_id,
            prompt=run.group.prompt,
            response_ids_T=np.zeros(seq.length, dtype=np.int32),
            logp_rollout_T=np.zeros(seq.length, dtype=np.float32),
            versions_T=np.repeat(np.asarray(seq.versions, np.int32), seq.counts),
            finish_reason="length" if seq.length == self.args.max_tokens else "stop",
        )
        run.finished.append((seq, sample))
        if len(run.finished) == len(run.seqs):
            del self.groups[seq.group_id]
            by_id = {s.sample_id: (q, s) for q, s in run.finished}
            ordered = [by_id[sid] for sid in run.group.sample_ids()]
            scored = self.sched.complete_group(
                [s for _, s in ordered], [q.reward for q, _ in ordered]
            )
            if len(scored) != len(ordered):
                raise AssertionError("dynamic sampling is off: every group must be accepted")
            self.candidates.extend(scored)
            self.dirty = True

    def _abort_all(self) -> None:
        """Weight update without partial rollout: every group not yet complete is aborted and
        handed back (its finished samples go too: the group is redone as a whole)."""
        for gid, run in self.groups.items():
            self.tally.aborted_tokens += sum(q.generated(self.now) for q in run.seqs)
            self.tally.aborted_groups += 1
            self.sched.requeue(gid)
        self.groups.clear()
        self.running.clear()
        self.heap.clear()
        self.queue.clear()

    def _pause(self) -> None:
        for seq in self.running.values():
            self._close_segment(seq)
        self.heap.clear()
        self.paused = True

    def _resume(self) -> None:
        self.paused = False
        running, self.running = list(self.running.values()), {}
        for seq in running:
            self._start(seq)

    # ------------------------------------------------------------------ trainer

    def _admit(self, s: ScoredSample) -> bool:
        sid = s.sample.sample_id
        hit = self.admit_cache.get(sid)
        if hit is None or hit[0] != self.trainer_version:
            hit = (self.trainer_version, self.sched.admit(s, self.trainer_version))
            self.admit_cache[sid] = hit
        return hit[1]

    def _drop(self, samples: list[ScoredSample]) -> None:
        for s in samples:
            self.tally.stale_tokens += int(s.sample.response_ids_T.shape[0])
            self.admit_cache.pop(s.sample.sample_id, None)
        self.tally.stale_samples += len(samples)

    def _try_train(self) -> None:
        """The driver's ``train_step``/``_collect``: sync mode trains on what the step's
        rollout produced; async mode waits for ``want`` admissible samples, dropping those
        that became too stale on the way."""
        if self.trainer != "idle" or not self.dirty:
            return
        self.dirty = False
        if self.asynchronous:
            fresh = [c for c in self.candidates if self._admit(c)]
            if len(fresh) < len(self.candidates):
                stale = [c for c in self.candidates if not self._admit(c)]
                sel = self.sched.select_batch(stale, self.trainer_version, max_samples=0)
                self._drop(list(sel.dropped_stale))
                self.candidates = fresh
            if len(fresh) < self.want:
                return
        elif self.groups or self.queue or len(self.candidates) < self.want:
            return
        sel = self.sched.select_batch(self.candidates, self.trainer_version, max_samples=self.want)
        self._drop(list(sel.dropped_stale))
        self.candidates = list(sel.waiting)
        if not sel.batch:
            # Every admissible sample is partial and max_partial_fraction admits none of them
            # without a full one beside it (the driver raises here); wait for full samples.
            self.tally.empty_selections += 1
            return
        for s in sel.batch:
            n = int(s.sample.response_ids_T.shape[0])
            self.tally.trained_tokens += n
            self.trained_lengths.append(n)
            self.admit_cache.pop(s.sample.sample_id, None)
        self.tally.trained_samples += len(sel.batch)
        self.tally.partial_samples += sel.num_partial
        self.trainer, self.trainer_until = "train", self.now + self.args.train_ticks

    def _trainer_event(self) -> None:
        if self.trainer == "train":
            self.trainer_version += 1
            self.tally.steps += 1
            if self.tally.steps == self.args.steps:
                return
            if self.asynchronous and not self.partial:
                self._abort_all()  # the driver's abort_all before sync_weights
            else:
                self._pause()
            self.paused = True
            self.trainer, self.trainer_until = "sync", self.now + self.args.sync_ticks
        else:  # sync done: the engine serves the new weights
            self.engine_version = self.trainer_version
            spanning = self.sched.on_weight_update(self.trainer_version)
            if self.partial:
                self.tally.spanning_groups += len(spanning)
            self._resume()
            self.trainer, self.trainer_until = "idle", _INF
            self.dirty = True
            if not self.asynchronous:
                for group in self.sched.next_groups(self.args.prompts_per_step):
                    self._dispatch(group)

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        if not self.asynchronous:
            groups = self.sched.next_groups(self.args.prompts_per_step)
            for group in groups:
                self._dispatch(group)
        while self.tally.steps < self.args.steps:
            self._try_train()
            self._fill()
            t_finish = self.heap[0][0] if self.heap else _INF
            t = min(t_finish, self.trainer_until)
            if t == _INF:
                raise RuntimeError(
                    f"{self.policy}: nothing can happen at tick {self.now} (trainer waits for "
                    f"{self.want} samples, {len(self.candidates)} admissible, none in flight): "
                    "raise --max-inflight-groups"
                )
            if not self.paused:  # every running sequence decodes one token per tick
                self.busy_slot_ticks += len(self.running) * (int(t) - self.now)
            self.now = int(t)
            if t_finish <= self.trainer_until:  # a response ending now finishes before an update
                self._finish_next()
            else:
                self._trainer_event()
        return self._report()

    def _report(self) -> dict[str, Any]:
        tally = self.tally
        tally.ticks = self.now
        tally.pending_tokens = sum(
            q.generated(self.now) for run in self.groups.values() for q in run.seqs
        ) + sum(int(c.sample.response_ids_T.shape[0]) for c in self.candidates)
        metrics = self.sched.metrics()
        hist = {
            int(k.rsplit("/", 1)[1]): int(v)
            for k, v in metrics.items()
            if k.startswith("scheduler/staleness/")
        }
        n_hist = sum(hist.values())
        if n_hist != tally.trained_samples:
            raise AssertionError(f"staleness histogram has {n_hist} of {tally.trained_samples}")
        if tally.generated_tokens != self.busy_slot_ticks:  # each token is counted exactly once
            raise AssertionError(
                f"{self.policy}: {tally.generated_tokens} tokens accounted for, "
                f"{self.busy_slot_ticks} decoded"
            )
        slot_ticks = self.args.slots * tally.ticks
        return {
            "policy": self.policy,
            "ticks": tally.ticks,
            "steps": tally.steps,
            "utilisation": tally.generated_tokens / slot_ticks,
            "useful_utilisation": tally.trained_tokens / slot_ticks,
            "generated_tokens": tally.generated_tokens,
            "trained_tokens": tally.trained_tokens,
            "aborted_tokens": tally.aborted_tokens,
            "stale_tokens": tally.stale_tokens,
            "pending_tokens": tally.pending_tokens,
            "trained_samples": tally.trained_samples,
            "samples_per_1k_ticks": 1000 * tally.trained_samples / tally.ticks,
            "mean_batch": tally.trained_samples / tally.steps,
            "mean_trained_length": float(np.mean(self.trained_lengths)),
            "staleness_mean": sum(k * n for k, n in hist.items()) / n_hist,
            "staleness_max": max(hist),
            "staleness_hist": {str(k): n for k, n in sorted(hist.items())},
            "partial_share": tally.partial_samples / tally.trained_samples,
            "aborted_groups": tally.aborted_groups,
            "stale_samples": tally.stale_samples,
            "spanning_groups": tally.spanning_groups,
            "empty_selections": tally.empty_selections,
        }


# ---------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=128, help="sequences the engine decodes at once")
    p.add_argument("--group-size", "-G", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="groups per optimizer step")
    p.add_argument("--mu", type=float, default=6.0, help="log-normal mu of response lengths")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma")
    p.add_argument("--max-tokens", type=int, default=4096, help="response length cap")
    p.add_argument("--train-ticks", type=int, default=400, help="ticks of one optimizer step")
    p.add_argument("--sync-ticks", type=int, default=50, help="ticks of one weight sync")
    p.add_argument("--max-staleness", type=int, default=1, help="scheduler.max_staleness")
    p.add_argument(
        "--max-partial-fraction", type=float, default=0.5, help="scheduler.max_partial_fraction"
    )
    p.add_argument(
        "--max-inflight-groups",
        type=int,
        default=None,
        help="scheduler.max_inflight_groups (default: 2 x (slots / G + prompts-per-step))",
    )
    p.add_argument(
        "--refill",
        choices=("slot", "group"),
        default="slot",
        help="async hand-out: slot = a freed slot pulls work at once; group = at most\n"
        "slots / G groups rolling, a new one only when a whole group is done\n"
        "(what driver.rollout_until does today)",
    )
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--json", type=Path, default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    if args.max_inflight_groups is None:
        # Rolling groups straggle behind their longest response, so keeping every slot busy
        # takes about twice slots / G of them; trained-but-waiting groups add a step or two.
        args.max_inflight_groups = 2 * (-(-args.slots // args.group_size) + args.prompts_per_step)
    positive = ("slots", "group_size", "prompts_per_step", "max_tokens", "steps")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("train_ticks", "sync_ticks", "max_staleness"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.sigma < 0:
        p.error("--sigma must be >= 0")
    if not 0 <= args.max_partial_fraction <= 1:
        p.error("--max-partial-fraction must be in [0, 1]")
    if args.max_inflight_groups < args.prompts_per_step:
        p.error(
            f"--max-inflight-groups={args.max_inflight_groups} < --prompts-per-step="
            f"{args.prompts_per_step}: a step could never gather its groups; raise it"
        )
    return args


def format_table(results: list[dict[str, Any]]) -> str:
    cols = [
        ("policy", "{}", "policy"),
        ("util", "{:.3f}", "utilisation"),
        ("useful", "{:.3f}", "useful_utilisation"),
        ("trained tok", "{:,}", "trained_tokens"),
        ("aborted tok", "{:,}", "aborted_tokens"),
        ("stale tok", "{:,}", "stale_tokens"),
        ("samples/1k ticks", "{:.1f}", "samples_per_1k_ticks"),
        ("batch", "{:.1f}", "mean_batch"),
        ("trained len", "{:.0f}", "mean_trained_length"),
        ("stale mean", "{:.2f}", "staleness_mean"),
        ("stale max", "{}", "staleness_max"),
        ("partial", "{:.3f}", "partial_share"),
        ("ticks", "{:,}", "ticks"),
    ]
    rows = [[fmt.format(r[key]) for _, fmt, key in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(cols)]
    lines = [" | ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = []
    for policy in args.policies:
        t0 = time.perf_counter()
        result = Simulation(policy, args).run()
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
    shown = ("slots", "group_size", "prompts_per_step", "mu", "sigma", "max_tokens")
    shown += ("train_ticks", "sync_ticks", "max_staleness", "max_partial_fraction")
    shown += ("max_inflight_groups", "refill", "steps", "seed")
    print(" ".join(f"{k}={getattr(args, k)}" for k in shown))
    print(format_table(results))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"config": config, "results": {r["policy"]: r for r in results}}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
