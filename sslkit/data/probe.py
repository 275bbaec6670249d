"""Where the fixed probe crops go: spread over every volume and over each volume's extent, deterministically.

The monitor embeds the same probe crops every `monitor.probe_every` steps and watches how their features
spread. On a small corpus (the demo's 3 scans) eight jittered centre crops are near duplicates, and near
duplicates look collapsed whatever the encoder does. `probe_windows` spends the crops on as many distinct
places as the corpus offers:

* over volumes: round-robin, largest volume first, never giving a volume more crops than it has distinct
  windows while another volume still has room;
* inside a volume: Latin-hypercube stratification of the window start along every axis. With k crops in a
  volume each axis's range of starts [0, size - roi] is cut into k equal strata, crop j takes the centre of
  one stratum per axis (plus a seeded jitter of at most a quarter stratum), and the strata are matched
  across axes by seeded permutations, so every axis is covered evenly and no two crops share a stratum.

    >>> probe_windows([(120, 120, 90), (100, 110, 80)], roi=(48, 48, 48), n=4, seed=0)
    [(0, (...)), (0, (...)), (1, (...)), (1, (...))]

2-D runs pass a 2-axis roi: the missing trailing axes are windows of size 1, so `starts[2]` is the axial
slice and `starts[:2]` the in-plane start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Window = tuple[int, tuple[int, ...]]   # (volume index, start per spatial axis)


def _full_roi(shape: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    """roi padded with 1 for the trailing axes it does not name (2-D crops of a 3-D volume)."""
    if len(roi) > len(shape):
        raise ValueError(f"roi {tuple(roi)} has more axes than the volume shape {tuple(shape)}")
    return tuple(int(r) for r in roi) + (1,) * (len(shape) - len(roi))


def start_ranges(shape: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    """Largest window start per axis: max(0, size - roi). A volume smaller than the roi has one start (0)."""
    return tuple(max(0, int(s) - r) for s, r in zip(shape, _full_roi(shape, roi)))


def distinct_windows(shape: Sequence[int], roi: Sequence[int]) -> int:
    """How many different window starts a volume offers: prod(hi_a + 1)."""
    return math.prod(h + 1 for h in start_ranges(shape, roi))


def crops_per_volume(volume_shapes: Sequence[Sequence[int]], roi: Sequence[int], n: int) -> list[int]:
    """Split n crops over volumes: one at a time, largest volume first (ties: lower index), skipping volumes
    that have no distinct window left unless every volume is full (then duplicates are unavoidable)."""
    sizes = [math.prod(int(s) for s in shape) for shape in volume_shapes]
    order = sorted(range(len(volume_shapes)), key=lambda v: (-sizes[v], v))
    room = [distinct_windows(shape, roi) for shape in volume_shapes]
    counts = [0] * len(volume_shapes)
    while sum(counts) < n:
        open_volumes = [v for v in order if counts[v] < room[v]] or order
        for v in open_volumes:
            if sum(counts) == n:
                break
            counts[v] += 1
    return counts


def stratified_starts(hi: Sequence[int], k: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """k window starts inside [0, hi_a] per axis, one per stratum on every axis (Latin hypercube).

    Axis a, stratum j covers [j, j + 1) * (hi_a + 1) / k; the start is its centre plus a uniform jitter of at most
    a quarter stratum, rounded and clipped to [0, hi_a]. Each axis pairs crops with strata by its own permutation.
    """
    columns = []
    for h in hi:
        width = (h + 1) / k
        centres = (np.arange(k) + 0.5) * width - 0.5
        jitter = rng.uniform(-0.25, 0.25, size=k) * width
        starts = np.clip(np.rint(centres + jitter), 0, h).astype(int)
        columns.append(starts[rng.permutation(k)])
    return [tuple(int(c[j]) for c in columns) for j in range(k)]


def probe_windows(volume_shapes: Sequence[Sequence[int]], roi: Sequence[int], n: int, seed: int) -> list[Window]:
    """n probe windows spread over volumes and positions: [(volume index, starts)], grouped by volume.

    volume_shapes: spatial shape (X, Y, Z) of each volume (channels excluded); roi: crop size per axis, 3 axes,
    or 2 for slices of the last axis. Same arguments give the same windows (rng seeded by (seed, volume)).
    Starts may be 0 on an axis where the volume is smaller than the roi (the crop is then zero-padded).
    """
    if n < 0:
        raise ValueError(f"probe crop count must be >= 0, got {n}")
    if n and not volume_shapes:
        raise ValueError("probe_windows needs at least one volume")
    counts = crops_per_volume(volume_shapes, roi, n)
    windows: list[Window] = []
    for v, (shape, k) in enumerate(zip(volume_shapes, counts)):
        if k:
            rng = np.random.default_rng([int(seed), v])
            windows.extend((v, starts) for starts in stratified_starts(start_ranges(shape, roi), k, rng))
    return windows
