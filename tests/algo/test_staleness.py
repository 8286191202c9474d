"""Partial-rollout staleness and admission (algorithms.md, "Partial rollouts and staleness")."""

from __future__ import annotations

import pytest
import torch

from mopd.algo.staleness import admissible, sample_staleness


def ref_staleness(current: int, versions: list[list[int]], mask: list[list[bool]]) -> list[int]:
    out = []
    for row_v, row_m in zip(versions, mask):
        generated = [v for v, m in zip(row_v, row_m) if m]
        out.append(current - min(generated) if generated else 0)
    return out


def test_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    versions = torch.randint(3, 11, (6, 9), generator=gen)
    mask = torch.rand(6, 9, generator=gen) > 0.3
    mask[2] = False
    versions[~mask] = 99  # prompt/padding versions are never read
    out = sample_staleness(10, versions, mask)
    assert out.dtype == torch.int64
    assert out.tolist() == ref_staleness(10, versions.tolist(), mask.tolist())
    ok = admissible(10, versions, mask.float(), max_staleness=4)
    assert ok.tolist() == [s <= 4 for s in out.tolist()]


def test_single_sample_and_inclusive_bound() -> None:
    versions = torch.tensor([5, 6, 7])
    assert int(sample_staleness(8, versions)) == 3
    assert admissible(8, versions, None, max_staleness=3) is True
    assert admissible(8, versions, None, max_staleness=2) is False
    assert admissible(7, torch.tensor([7, 7]), None, 0) is True


def test_errors() -> None:
    with pytest.raises(ValueError, match="token from the future"):
        sample_staleness(4, torch.tensor([[3, 5]]))
    # a future version under the mask is ignored
    assert sample_staleness(4, torch.tensor([[3, 5]]), torch.tensor([[1, 0]])).tolist() == [1]
    with pytest.raises(ValueError, match="max_staleness=-1"):
        admissible(4, torch.tensor([4]), None, max_staleness=-1)
    with pytest.raises(ValueError, match="integer"):
        sample_staleness(4, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="mask has shape"):
        sample_staleness(4, torch.tensor([[1, 2]]), torch.ones(2, 2))
