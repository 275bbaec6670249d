"""The engine's sample order: seeded per epoch, sharded across ranks, resumable by micro-step count."""

from __future__ import annotations

import itertools
import os

import torch

from sslkit.engine.sampler import EpochSampler, worker_init


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


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return os.getpriority(os.PRIO_PROCESS, 0)


def test_worker_init_adds_niceness_to_the_workers_only():
    parent = os.getpriority(os.PRIO_PROCESS, 0)
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=1, num_workers=1, worker_init_fn=worker_init(5))
    assert [int(b) for b in loader] == [min(parent + 5, 19)] * 2
    assert os.getpriority(os.PRIO_PROCESS, 0) == parent
    assert worker_init(0) is None
