"""The engine's sample order: seeded per epoch, sharded across ranks, resumable by micro-step count."""

from __future__ import annotations

import itertools

from sslkit.engine.sampler import EpochSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_epochs_are_permutations_and_differ():
    s = EpochSampler(10, micro_batch_size=2, seed=1)
    keys = _take(s, 20)
    e0, e1 = [i for i, e in keys if e == 0], [i for i, e in keys if e == 1]
    assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10)) and e0 != e1


def test_ranks_split_one_permutation():
    one = _take(EpochSampler(12, 2, seed=5), 12)
    r0 = _take(EpochSampler(12, 1, seed=5, rank=0, world_size=2), 6)
    r1 = _take(EpochSampler(12, 1, seed=5, rank=1, world_size=2), 6)
    # step k of two ranks x micro-batch 1 holds the same samples as step k of one rank x micro-batch 2
    assert [sorted([a, b]) for a, b in zip(r0, r1)] == [sorted(one[2 * k:2 * k + 2]) for k in range(6)]


def test_resume_continues_the_same_stream():
    full = _take(EpochSampler(9, 2, seed=3), 20)  # 4 micro-batches of 2 per epoch (one sample dropped)
    resumed = _take(EpochSampler(9, 2, seed=3, start_micro_step=5), 10)
    assert resumed == full[10:20]
    assert EpochSampler(9, 2, seed=3).epoch_of(5) == 1
