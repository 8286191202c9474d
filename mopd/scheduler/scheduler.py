"""The data scheduler: which prompt group goes out next, and which samples may train now.

Pure bookkeeping, no Ray and no Redis: the driver owns one ``DataScheduler`` and wraps it.
The unit of work is a prompt group (G samples of one prompt), never a micro-batch:

    next_groups(n)            -> PromptGroup x <= n       (rollout workers pull as they free up)
    complete_group(samples, rewards) -> ScoredSample x G   (or [] when dropped for no signal)
    select_batch(candidates, version) -> what trains now, what waits, what is too stale

Choosing the source of a new group, in this order:

1. re-dispatches: groups that were in flight at a restart (``load_state_dict``) or were handed
   back with ``requeue`` (a worker died, a request was aborted); they keep their ids, so
   samples that reached the training stream before a crash are de-duplicated there.
2. replacements owed to sources whose groups dynamic sampling dropped, highest priority
   first; they do not count toward the source's share, so each source keeps its weight's
   share of groups that carry a learning signal.
3. a fresh draw. A source has work ready while its share of fresh draws is below its weight's
   share (``fresh_s < w_s / sum(w) * (total + 1)``, at least one source always is); among those
   the highest priority wins and ties are broken by a weighted draw from the seeded RNG. So
   weights fix the long-run mix exactly and priority decides who goes first.

Prompts longer than the source's ``max_prompt_tokens`` are skipped and counted. The
source's temperature and response limit travel on the ``Prompt`` (None: rollout default).

Back-pressure: at most ``max_inflight_groups`` groups are handed out and not yet consumed
by the trainer (rolling out, or accepted and waiting in the training stream). Samples leave
through ``select_batch`` (trained or too stale) or ``mark_consumed``.

Partial rollouts and staleness (algorithms.md): ``on_weight_update`` records the new policy
version and names the in-flight groups that now span two versions; ``admit`` applies
``mopd.algo.staleness.admissible`` with ``max_staleness``; ``select_batch`` drops samples
that are too stale (staleness only grows) and caps partial (multi-version) samples at
``max_partial_fraction`` of the batch; the rest wait for a later step.

``state_dict`` / ``load_state_dict`` hold the source cursors, the RNG, the per-prompt
pass-rate history, the groups in flight (re-dispatched after a restart), the samples still
awaiting training and every counter, all JSON-serialisable: a resumed run hands out exactly
the groups the uninterrupted run would have.

Shape suffixes: G samples of a group, T response tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mopd.algo.advantages import ESTIMATORS, group_advantages
from mopd.algo.staleness import admissible, max_staleness_problem, sample_staleness
from mopd.config.schema import DataSourceConfig, SchedulerConfig
from mopd.scheduler.sources import PromptSource, build_source, derive_seed
from mopd.scheduler.tokenize import Tokenize
from mopd.types import Prompt, RolloutSample, ScoredSample

__all__ = ["BatchSelection", "DataScheduler", "PromptGroup", "SchedulerError", "is_partial"]

STATE_FORMAT = 1
# Prompts a source may skip in a row (too long / empty) before the config is called hopeless.
_MAX_CONSECUTIVE_SKIPS = 1000


class SchedulerError(ValueError):
    """Misuse of the scheduler (unknown group, wrong group size, mismatched checkpoint)."""


@dataclass(frozen=True)
class PromptGroup:
    """G samples to draw for one prompt: the unit of work handed to a rollout worker.

    Produced by: ``DataScheduler.next_groups``. Consumed by: a rollout worker, which samples
    ``group_size`` responses of ``prompt`` and hands them, with their rewards, back through
    ``DataScheduler.complete_group``.
    """

    prompt: Prompt
    """The prompt (its ``prompt_id`` is the group id)."""
    group_size: int
    """Samples to draw (G)."""
    version: int
    """Policy version when the group was handed out."""
    item_key: str
    """Stable identity of the prompt in its source (pass-rate history key)."""

    @property
    def group_id(self) -> str:
        return self.prompt.prompt_id

    def sample_ids(self) -> list[str]:
        """The ids the group's samples should carry: ``{group_id}#{i}``."""
        return [f"{self.prompt.prompt_id}#{i}" for i in range(self.group_size)]


@dataclass(frozen=True)
class BatchSelection:
    """What ``select_batch`` decided for a set of candidate samples."""

    batch: tuple[ScoredSample, ...]
    """Samples for the next optimizer step (in candidate order)."""
    waiting: tuple[ScoredSample, ...]
    """Admissible samples held back (partial cap or ``max_samples``); offer them again."""
    dropped_stale: tuple[ScoredSample, ...]
    """Samples staler than ``max_staleness``: they can never train."""
    num_partial: int
    """Partial (multi-version) samples in ``batch``."""
    num_partial_held: int
    """Admissible partial samples held back by the ``max_partial_fraction`` cap."""


@dataclass
class _SourceStats:
    handed_out: int = 0
    fresh: int = 0
    replacements: int = 0
    redispatched: int = 0
    requeued: int = 0
    completed: int = 0
    accepted: int = 0
    dropped_no_signal: int = 0
    skipped_too_long: int = 0
    skipped_empty: int = 0
    samples: int = 0
    reward_sum: float = 0.0
    trained: int = 0
    dropped_stale: int = 0


def _versions(sample: ScoredSample | RolloutSample) -> np.ndarray:
    rollout = sample.sample if isinstance(sample, ScoredSample) else sample
    return rollout.versions_T


def is_partial(sample: ScoredSample | RolloutSample) -> bool:
    """Whether the sample's tokens come from more than one policy version."""
    v_T = _versions(sample)
    return bool(v_T.size) and int(v_T.min()) != int(v_T.max())


class DataScheduler:
    """Hands out prompt groups, scores finished ones, and picks admissible training samples.

    Args:
        sources: the run's data sources (``cfg.data.sources``).
        config: the scheduler slice (``cfg.scheduler``).
        tokenize: text -> prompt token ids (``mopd.scheduler.tokenize.hf_tokenize``).
        seed: the run seed (``cfg.run.seed``).
        advantage: ORM advantage estimator (``cfg.algorithm.advantage``).
        advantage_eps: GRPO std epsilon (``cfg.algorithm.advantage_eps``).
        base_dir: folder that relative source file paths resolve against.
        history_size: prompts whose pass-rate history is kept (oldest forgotten first).
        pass_rate_window: recent groups per source behind the ``pass_rate`` metric.
        dense_signal: the loss has a per-token signal besides the rewards (MOPD's teacher
            term): groups with equal rewards are kept even under dynamic sampling.
    """

    def __init__(
        self,
        sources: Sequence[DataSourceConfig],
        config: SchedulerConfig,
        *,
        tokenize: Tokenize,
        seed: int,
        advantage: str = "grpo",
        advantage_eps: float = 1e-6,
        base_dir: str | Path | None = None,
        history_size: int = 100_000,
        pass_rate_window: int = 100,
        dense_signal: bool = False,
    ) -> None:
        if not sources:
            raise SchedulerError("no data source; add at least one to data.sources")
        if advantage not in ESTIMATORS:
            raise SchedulerError(
                f"algorithm.advantage={advantage!r}; accepted: {', '.join(ESTIMATORS)}"
            )
        self._cfg: dict[str, DataSourceConfig] = {}
        for src in sources:
            if src.name in self._cfg:
                raise SchedulerError(f"duplicate source name {src.name!r}; names must be unique")
            if not src.weight > 0 or src.group_size < 1 or src.max_prompt_tokens < 1:
                raise SchedulerError(
                    f"source {src.name!r}: weight must be > 0, group_size >= 1 and "
                    "max_prompt_tokens >= 1"
                )
            self._cfg[src.name] = src
        if config.max_inflight_groups < 1:
            raise SchedulerError("scheduler.max_inflight_groups must be >= 1")
        if not 0.0 <= config.max_partial_fraction <= 1.0:
            raise SchedulerError("scheduler.max_partial_fraction must be in [0, 1]")
        if (problem := max_staleness_problem(config.max_staleness)) is not None:
            raise SchedulerError(f"scheduler.max_staleness: {problem}")
        self.config = config
        self._names = list(self._cfg)
        self._tokenize = tokenize
        self._advantage = advantage
        self._eps = advantage_eps
        self._dense_signal = dense_signal
        self._sources: dict[str, PromptSource] = {
            name: build_source(cfg, seed=seed, base_dir=base_dir) for name, cfg in self._cfg.items()
        }
        total_weight = sum(cfg.weight for cfg in self._cfg.values())
        self._share = {name: cfg.weight / total_weight for name, cfg in self._cfg.items()}
        self._rng = np.random.default_rng(derive_seed(seed, "scheduler"))
        self._history_size = history_size
        self._window = pass_rate_window

        self._version = 0
        self._serial = dict.fromkeys(self._names, 0)
        self._owed = dict.fromkeys(self._names, 0)
        self._rolling: dict[str, PromptGroup] = {}
        self._redispatch: deque[PromptGroup] = deque()
        self._awaiting: dict[str, str] = {}  # sample id -> group id
        self._awaiting_groups: dict[str, int] = {}  # group id -> samples not yet consumed
        self._stats = {name: _SourceStats() for name in self._names}
        self._recent = {name: deque(maxlen=pass_rate_window) for name in self._names}
        self._history: OrderedDict[str, list[float]] = OrderedDict()  # key -> [groups, n, sum]
        self._staleness_hist: Counter[int] = Counter()
        self._last_batch = {"size": 0, "partial": 0}

    # ------------------------------------------------------------------ hand-out

    @property
    def version(self) -> int:
        """The policy version the scheduler last heard of (``on_weight_update``)."""
        return self._version

    @property
    def num_inflight(self) -> int:
        """Groups handed out and not yet consumed (rolling out or awaiting training)."""
        return len(self._rolling) + len(self._awaiting_groups)

    def next_groups(self, n: int) -> list[PromptGroup]:
        """Up to ``n`` prompt groups, fewer when ``max_inflight_groups`` would be exceeded."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        budget = min(n, self.config.max_inflight_groups - self.num_inflight)
        out = []
        for _ in range(max(0, budget)):
            group = self._next_group()
            self._rolling[group.group_id] = group
            self._stats[group.prompt.source].handed_out += 1
            out.append(group)
        return out

    def _next_group(self) -> PromptGroup:
        if self._redispatch:
            group = self._redispatch.popleft()
            self._stats[group.prompt.source].redispatched += 1
            return dataclasses.replace(group, version=self._version)
        owed = [name for name in self._names if self._owed[name] > 0]
        if owed:
            name = max(owed, key=lambda s: self._cfg[s].priority)  # first listed wins ties
            self._owed[name] -= 1
            self._stats[name].replacements += 1
            return self._draw(name)
        name = self._pick_fresh()
        self._stats[name].fresh += 1
        return self._draw(name)

    def _pick_fresh(self) -> str:
        total = sum(self._stats[s].fresh for s in self._names)
        ready = [s for s in self._names if self._stats[s].fresh < self._share[s] * (total + 1)]
        ready = ready or self._names  # only float round-off can leave it empty
        top = max(self._cfg[s].priority for s in ready)
        tied = [s for s in ready if self._cfg[s].priority == top]
        if len(tied) == 1:
            return tied[0]
        w = np.array([self._cfg[s].weight for s in tied], dtype=np.float64)
        return tied[int(self._rng.choice(len(tied), p=w / w.sum()))]

    def _draw(self, name: str) -> PromptGroup:
        cfg, stats = self._cfg[name], self._stats[name]
        for _ in range(_MAX_CONSECUTIVE_SKIPS):
            item = self._sources[name].next_item()
            ids = np.asarray(self._tokenize(item.text), dtype=np.int64)
            if ids.size == 0:
                stats.skipped_empty += 1
                continue
            if ids.size > cfg.max_prompt_tokens:
                stats.skipped_too_long += 1
                continue
            serial = self._serial[name]
            self._serial[name] += 1
            prompt = self._prompt(name, item, f"{name}/{serial}", ids)
            return PromptGroup(prompt, cfg.group_size, self._version, item.key)
        raise SchedulerError(
            f"source {name!r}: {_MAX_CONSECUTIVE_SKIPS} prompts in a row are empty or longer "
            f"than max_prompt_tokens={cfg.max_prompt_tokens}; raise the limit or fix the data"
        )

    def requeue(self, group_id: str) -> None:
        """Hand an in-flight group back (its worker died or its requests were aborted); it is
        re-dispatched, with the same id, before any new prompt."""
        group = self._rolling.pop(group_id, None)
        if group is None:
            raise SchedulerError(f"group {group_id!r} is not rolling out; cannot requeue it")
        self._stats[group.prompt.source].requeued += 1
        self._redispatch.append(group)

    def eval_prompts(self, source: str | None = None) -> list[Prompt]:
        """The held-out eval prompts of one source (or all), tokenised; too-long ones skipped."""
        names = self._names if source is None else [self._check_source(source)]
        out = []
        for name in names:
            cfg = self._cfg[name]
            for item in self._sources[name].eval_items():
                ids = np.asarray(self._tokenize(item.text), dtype=np.int64)
                if 0 < ids.size <= cfg.max_prompt_tokens:
                    out.append(self._prompt(name, item, f"eval/{item.key}", ids))
        return out

    def _prompt(self, name: str, item: Any, prompt_id: str, ids: np.ndarray) -> Prompt:
        """A source item as a Prompt, with the source's domain and sampling overrides."""
        cfg = self._cfg[name]
        return Prompt(
            prompt_id=prompt_id,
            source=name,
            domain=cfg.domain,
            input_ids_P=ids,
            text=item.text,
            answer=item.answer,
            metadata=item.metadata,
            max_new_tokens=cfg.max_response_tokens,
            temperature=cfg.temperature,
        )

    def _check_source(self, name: str) -> str:
        if name not in self._cfg:
            raise SchedulerError(f"unknown source {name!r}; sources: {', '.join(self._names)}")
        return name

    # ------------------------------------------------------------------ completion

    def complete_group(
        self, samples: Sequence[RolloutSample], rewards: Sequence[float]
    ) -> list[ScoredSample]:
        """Accept a finished group: G samples of one in-flight prompt and their rewards.

        Returns the ScoredSamples with group advantages (no teacher log-probs yet), or ``[]``
        when the source uses dynamic sampling and all rewards are equal (the group carries no
        learning signal; a replacement prompt is queued for the same source).
        """
        samples = list(samples)
        rewards_G = [float(r) for r in rewards]
        if not samples:
            raise SchedulerError("complete_group needs the samples of one group, got none")
        group_id = samples[0].prompt.prompt_id
        if any(s.prompt.prompt_id != group_id for s in samples):
            ids = sorted({s.prompt.prompt_id for s in samples})
            raise SchedulerError(f"complete_group got samples of several groups: {ids}")
        group = self._rolling.get(group_id)
        if group is None:
            raise SchedulerError(
                f"group {group_id!r} is not rolling out (completed twice, requeued, or "
                "handed out before a restart); drop these samples"
            )
        if len(samples) != group.group_size or len(rewards_G) != group.group_size:
            raise SchedulerError(
                f"group {group_id!r} has size {group.group_size}; got {len(samples)} samples "
                f"and {len(rewards_G)} rewards (requeue the group to redo it)"
            )
        if len({s.sample_id for s in samples}) != len(samples):
            raise SchedulerError(f"group {group_id!r}: sample ids are not unique")
        for s, r in zip(samples, rewards_G, strict=True):
            if not math.isfinite(r):
                raise SchedulerError(
                    f"sample {s.sample_id!r} has reward {r}; rewards must be finite"
                )
        del self._rolling[group_id]

        name = group.prompt.source
        stats = self._stats[name]
        stats.completed += 1
        stats.samples += len(rewards_G)
        stats.reward_sum += sum(rewards_G)
        self._recent[name].append(sum(rewards_G) / len(rewards_G))
        self._record_history(group.item_key, rewards_G)

        # Equal rewards leave the ORM advantage at zero; with a dense per-token signal (MOPD's
        # teacher term) the group still teaches, so dynamic sampling keeps it.
        no_signal = len(rewards_G) > 1 and all(r == rewards_G[0] for r in rewards_G)
        if no_signal and self._cfg[name].dynamic_sampling and not self._dense_signal:
            stats.dropped_no_signal += 1
            self._owed[name] += 1
            return []
        adv_G = group_advantages(
            torch.tensor([rewards_G], dtype=torch.float64), method=self._advantage, eps=self._eps
        )[0].tolist()
        stats.accepted += 1
        scored = [
            ScoredSample(sample=s, reward=r, advantage=a)
            for s, r, a in zip(samples, rewards_G, adv_G, strict=True)
        ]
        for s in samples:
            self._awaiting[s.sample_id] = group_id
        self._awaiting_groups[group_id] = len(samples)
        return scored

    def _record_history(self, key: str, rewards_G: list[float]) -> None:
        entry = self._history.pop(key, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += len(rewards_G)
        entry[2] += sum(rewards_G)
        self._history[key] = entry  # most recent last; the oldest is forgotten first
        while len(self._history) > self._history_size:
            self._history.popitem(last=False)

    def pass_rate(self, item_key: str) -> float | None:
        """Mean reward of every sample drawn for this prompt so far (None: never completed)."""
        entry = self._history.get(item_key)
        return None if entry is None else entry[2] / entry[1]

    # ------------------------------------------------------------------ versions, admission

    def on_weight_update(self, new_version: int) -> list[str]:
        """Record a new policy version; returns the in-flight groups that now span versions.

        With ``partial_rollout`` on they continue under the new weights (every token records
        its version); with it off the driver aborts them and calls ``requeue`` for each.
        """
        if new_version < self._version:
            raise SchedulerError(
                f"policy version went back from {self._version} to {new_version}; versions "
                "only grow (resume the scheduler state of the same checkpoint as the weights)"
            )
        self._version = new_version
        return self.spanning_groups()

    def spanning_groups(self) -> list[str]:
        """In-flight groups handed out under an older policy version than the current one."""
        return [gid for gid, g in self._rolling.items() if g.version < self._version]

    def too_stale_groups(self, current_version: int) -> list[str]:
        """In-flight groups handed out more than ``max_staleness`` versions before
        ``current_version``: none of their samples could ever train (async mode cancels and
        re-dispatches them)."""
        limit = self.config.max_staleness
        return [gid for gid, g in self._rolling.items() if current_version - g.version > limit]

    def staleness(self, sample: ScoredSample | RolloutSample, current_version: int) -> int:
        """current_version - oldest token version of the sample."""
        return int(sample_staleness(current_version, torch.from_numpy(_versions(sample))))

    def admit(self, sample: ScoredSample | RolloutSample, current_version: int) -> bool:
        """Whether the sample is fresh enough to train at ``current_version``."""
        v_T = torch.from_numpy(_versions(sample))
        return bool(admissible(current_version, v_T, None, self.config.max_staleness))

    def select_batch(
        self,
        candidates: Iterable[ScoredSample],
        current_version: int,
        max_samples: int | None = None,
    ) -> BatchSelection:
        """Split candidates into the next step's batch, those that wait, and those too stale.

        Too-stale samples are dropped (staleness only grows). Of the admissible ones at most
        ``max_samples`` go into the batch, and partial samples at most
        ``max_partial_fraction`` of it; the stalest go first, since they are nearest to being
        dropped. Batch and dropped samples count as consumed (they free in-flight slots).
        """
        cands = list(candidates)
        limit = len(cands) if max_samples is None else max_samples
        if limit < 0:
            raise ValueError(f"max_samples={max_samples} must be >= 0")
        stale_idx, full, part = [], [], []
        for i, c in enumerate(cands):
            if not self.admit(c, current_version):
                stale_idx.append(i)
            else:
                (part if is_partial(c) else full).append((self.staleness(c, current_version), i))
        full.sort(key=lambda x: -x[0])  # stable: candidate order among equals
        part.sort(key=lambda x: -x[0])

        frac = self.config.max_partial_fraction
        p = min(len(part), limit)
        while p > 0:
            f = min(len(full), limit - p)
            if p <= frac * (f + p) + 1e-9:
                break
            p -= 1
        f = min(len(full), limit - p)
        chosen = {i for _, i in full[:f]} | {i for _, i in part[:p]}

        batch = tuple(cands[i] for i in sorted(chosen))
        stale_set = set(stale_idx)
        waiting = tuple(c for i, c in enumerate(cands) if i not in chosen and i not in stale_set)
        dropped = tuple(cands[i] for i in stale_idx)
        for s in batch:
            self._staleness_hist[self.staleness(s, current_version)] += 1
            self._stats_of(s).trained += 1
        for s in dropped:
            self._stats_of(s).dropped_stale += 1
        self._last_batch = {"size": len(batch), "partial": p}
        self.mark_consumed(s.sample.sample_id for s in batch + dropped)
        return BatchSelection(
            batch=batch,
            waiting=waiting,
            dropped_stale=dropped,
            num_partial=p,
            num_partial_held=len(part) - p,
        )

    def _stats_of(self, s: ScoredSample) -> _SourceStats:
        # A sample of a source removed from the config since the checkpoint counts nowhere.
        return self._stats.get(s.sample.prompt.source, _SourceStats())

    def mark_consumed(self, sample_ids: Iterable[str]) -> None:
        """Samples that left the pipeline (trained or dropped); idempotent, unknown ids are
        ignored (a sample re-delivered after a restart may be consumed twice)."""
        for sid in sample_ids:
            group_id = self._awaiting.pop(sid, None)
            if group_id is None:
                continue
            left = self._awaiting_groups[group_id] - 1
            if left:
                self._awaiting_groups[group_id] = left
            else:
                del self._awaiting_groups[group_id]

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, float]:
        """Counters per source and per domain, pass rates, in-flight, partial share, staleness."""
        out: dict[str, float] = {
            "scheduler/version": float(self._version),
            "scheduler/inflight": float(self.num_inflight),
            "scheduler/inflight_rollout": float(len(self._rolling)),
            "scheduler/inflight_spanning": float(len(self.spanning_groups())),
            "scheduler/awaiting_train": float(len(self._awaiting)),
            "scheduler/redispatch_queue": float(len(self._redispatch)),
            "scheduler/replacements_owed": float(sum(self._owed.values())),
        }
        size, partial = self._last_batch["size"], self._last_batch["partial"]
        out["scheduler/partial_share"] = partial / size if size else 0.0
        for k, n in sorted(self._staleness_hist.items()):
            out[f"scheduler/staleness/{k}"] = float(n)
        domains: dict[str, _SourceStats] = {}
        for name in self._names:
            stats = self._stats[name]
            prefix = f"scheduler/source/{name}"
            _emit(out, prefix, stats)
            recent = self._recent[name]
            if recent:
                out[f"{prefix}/pass_rate"] = sum(recent) / len(recent)
            agg = domains.setdefault(self._cfg[name].domain, _SourceStats())
            for f in dataclasses.fields(_SourceStats):
                setattr(agg, f.name, getattr(agg, f.name) + getattr(stats, f.name))
        for domain, stats in domains.items():
            _emit(out, f"scheduler/domain/{domain}", stats)
        return out

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (JSON-serialisable)."""
        return {
            "format": STATE_FORMAT,
            "version": self._version,
            "rng": copy.deepcopy(self._rng.bit_generator.state),  # plain ints
            "sources": {name: src.state_dict() for name, src in self._sources.items()},
            "serial": dict(self._serial),
            "owed": dict(self._owed),
            # Groups rolling out at the checkpoint die with their workers: re-dispatch them
            # first, then whatever was already waiting for re-dispatch.
            "redispatch": [_group_state(g) for g in [*self._rolling.values(), *self._redispatch]],
            "awaiting": dict(self._awaiting),
            "stats": {name: dataclasses.asdict(s) for name, s in self._stats.items()},
            "recent": {name: list(d) for name, d in self._recent.items()},
            "history": [[key, *entry] for key, entry in self._history.items()],
            "staleness_hist": {str(k): n for k, n in self._staleness_hist.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict`` of a scheduler built from the same sources."""
        if state.get("format") != STATE_FORMAT:
            raise SchedulerError(
                f"scheduler state format {state.get('format')!r} is not {STATE_FORMAT}; "
                "it was written by another version of mopd"
            )
        saved, configured = set(state["sources"]), set(self._names)
        if saved != configured:
            raise SchedulerError(
                f"checkpoint has sources {sorted(saved)} but the config has "
                f"{sorted(configured)}; resume with the data.sources of the checkpoint"
            )
        for name, src_state in state["sources"].items():
            self._sources[name].load_state_dict(src_state)
        self._version = int(state["version"])
        self._rng.bit_generator.state = state["rng"]
        self._serial = {k: int(v) for k, v in state["serial"].items()}
        self._owed = {k: int(v) for k, v in state["owed"].items()}
        self._rolling = {}
        self._redispatch = deque(_group_from_state(g) for g in state["redispatch"])
        self._awaiting = dict(state["awaiting"])
        self._awaiting_groups = dict(Counter(self._awaiting.values()))
        self._stats = {name: _SourceStats(**s) for name, s in state["stats"].items()}
        self._recent = {
            name: deque(values, maxlen=self._window) for name, values in state["recent"].items()
        }
        self._history = OrderedDict((row[0], list(row[1:])) for row in state["history"])
        self._staleness_hist = Counter({int(k): int(n) for k, n in state["staleness_hist"].items()})


def _emit(out: dict[str, float], prefix: str, stats: _SourceStats) -> None:
    for f in dataclasses.fields(_SourceStats):
        out[f"{prefix}/{f.name}"] = float(getattr(stats, f.name))


def _group_state(g: PromptGroup) -> dict[str, Any]:
    p = g.prompt
    return {
        "prompt_id": p.prompt_id,
        "source": p.source,
        "domain": p.domain,
        "input_ids": p.input_ids_P.tolist(),
        "text": p.text,
        "answer": p.answer,
        "metadata": p.metadata,
        "max_new_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "group_size": g.group_size,
        "version": g.version,
        "item_key": g.item_key,
    }


def _group_from_state(d: Mapping[str, Any]) -> PromptGroup:
    prompt = Prompt(
        prompt_id=d["prompt_id"],
        source=d["source"],
        domain=d["domain"],
        input_ids_P=np.asarray(d["input_ids"], dtype=np.int64),
        text=d["text"],
        answer=d["answer"],
        metadata=d["metadata"],
        max_new_tokens=d["max_new_tokens"],
        temperature=d["temperature"],
    )
    return PromptGroup(prompt, int(d["group_size"]), int(d["version"]), d["item_key"])
