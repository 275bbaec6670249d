"""Multi-crop sampling: VoCo's base crops on a grid + random crops + overlap targets (Wu, Zhuang, Chen, CVPR 2024),
DINO / iBOT's global and local random resized crops (`crop_boxes`, `resized_crops`) and SMIT / iBOT token masks
(`token_masks`).

Pure numpy, so the dataset can build VoCo items deterministically from its per-item generator
(`numpy.random.default_rng([seed, epoch, index, stream])`):

    base, rand = voco_windows(volume.shape[1:], roi=(64, 64, 64), grid=3, n_random=2, rng=rng)
    item = {"voco_base": cut_windows(volume, base, roi),        # (G, C, *roi), G = grid * grid
            "voco_random": cut_windows(volume, rand, roi),      # (R, C, *roi)
            "voco_targets": overlap_targets(rand, base, roi)}   # (R, G) float32, rows sum to 1

Geometry (as the authors' code, `Luffy03/VoCo` utils/data_utils.py and `Large-Scale-Medical`
Self-supervised/utils/voco_trans.py): a region of grid x grid crops in the axial (X, Y) plane and one crop deep in
Z is placed in the volume; the base crops tile it without overlap; random crops of the same size lie anywhere in
the region (in 3-D they span the region's full depth, so only X and Y vary). A random crop's target for base crop
g is the fraction of its volume inside g.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_sizes(roi: int | Sequence[int], dims: int) -> np.ndarray:
    sizes = np.array([int(roi)] * dims if np.isscalar(roi) else [int(r) for r in roi], dtype=np.int64)
    if sizes.shape != (dims,) or (sizes < 1).any():
        raise ValueError(f"roi {roi!r} must be one positive size or {dims} of them")
    return sizes


def voco_region(volume_shape: Sequence[int], roi: int | Sequence[int], grid: int) -> np.ndarray:
    """Size of the VoCo region: (grid * roi_x, grid * roi_y[, roi_z]). Base crops tile the axial plane only."""
    dims = len(volume_shape)
    if dims not in (2, 3):
        raise ValueError(f"volume_shape must be (X, Y) or (X, Y, Z), got {tuple(volume_shape)}")
    if int(grid) < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    region = _as_sizes(roi, dims).copy()
    region[:2] *= int(grid)
    return region


def voco_windows(volume_shape: Sequence[int], roi: int | Sequence[int], grid: int, n_random: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Start corners of the base and random crops of one VoCo sample.

    volume_shape: spatial shape (X, Y, Z) or (X, Y); roi: crop size (one int or one per axis); grid: n of the
    n x n base grid; n_random: R random crops; rng: the item's numpy generator (all randomness comes from it).

    The region (`voco_region`) starts at a uniform corner in [0, max(0, S - region)] per axis; where the volume is
    smaller than the region it starts at 0 and reaches past the volume's end (the cut is zero-padded, as
    sslkit's crops are). Base crop (i, j) starts at region + (i * roi_x, j * roi_y[, 0]), i over X, j over Y
    (the authors' order). Random crops start at region + U{0 .. region - roi} per axis (Z: 0 in 3-D).

    Returns (base (grid*grid, dims) int64, rand (n_random, dims) int64); every crop has size roi.
    """
    dims = len(volume_shape)
    sizes = _as_sizes(roi, dims)
    region = voco_region(volume_shape, sizes, grid)
    if int(n_random) < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    slack = np.maximum(0, np.asarray(volume_shape, dtype=np.int64) - region)
    origin = np.array([rng.integers(0, s + 1) for s in slack], dtype=np.int64)  # region corner
    ii, jj = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # i over X (outer), j over Y
    base = np.zeros((grid * grid, dims), dtype=np.int64)
    base[:, 0], base[:, 1] = ii.ravel() * sizes[0], jj.ravel() * sizes[1]
    room = region - sizes  # random-crop freedom inside the region, per axis (0 along Z)
    rand = np.stack([rng.integers(0, r + 1, size=int(n_random)) for r in room], axis=1).astype(np.int64)
    return base + origin, rand + origin


def overlap_targets(rand_starts: np.ndarray, base_starts: np.ndarray, roi: int | Sequence[int]) -> np.ndarray:
    """Fraction of each random crop's volume that lies in each base crop, from box intersections.

    target[r, g] = prod_axes max(0, min(r_a + s_a, g_a + s_a) - max(r_a, g_a)) / prod_axes s_a, s = roi.
    rand_starts (R, dims), base_starts (G, dims) -> (R, G) float32. Rows sum to 1 for random crops inside the
    region the base crops tile (the authors' position labels, computed there from the X-Y overlap areas).
    """
    rand_starts = np.asarray(rand_starts, dtype=np.int64)
    base_starts = np.asarray(base_starts, dtype=np.int64)
    sizes = _as_sizes(roi, rand_starts.shape[1])
    lo = np.maximum(rand_starts[:, None, :], base_starts[None, :, :])  # (R, G, dims)
    hi = np.minimum(rand_starts[:, None, :], base_starts[None, :, :]) + sizes
    inter = np.clip(hi - lo, 0, None).prod(axis=-1)  # (R, G) voxels in common
    return (inter / float(sizes.prod())).astype(np.float32)


def cut_windows(volume: np.ndarray, starts: np.ndarray, roi: int | Sequence[int], fill: float = 0.0) -> np.ndarray:
    """Crops of a (C, *S) array at `starts` (N, dims): (N, C, *roi), `fill` where a window leaves the volume.

    Copies only the windows (works on memory-mapped arrays)."""
    starts = np.asarray(starts, dtype=np.int64)
    spatial = np.asarray(volume.shape[1:], dtype=np.int64)
    sizes = _as_sizes(roi, len(spatial))
    out = np.full((len(starts), volume.shape[0]) + tuple(sizes.tolist()), fill, dtype=np.float32)
    for n, st in enumerate(starts):
        lo, hi = np.maximum(st, 0), np.minimum(st + sizes, spatial)
        if (hi <= lo).any():
            continue  # entirely outside: all fill
        src = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo.tolist(), hi.tolist()))
        dst = (n, slice(None)) + tuple(slice(a - s, b - s) for a, b, s in zip(lo.tolist(), hi.tolist(), st.tolist()))
        out[dst] = volume[src]
    return out


def voco_sample(volume: np.ndarray, roi: int | Sequence[int], grid: int, n_random: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One VoCo item from a (C, *S) volume: {"voco_base": (G, C, *roi), "voco_random": (R, C, *roi),
    "voco_targets": (R, G)} float32 arrays (G = grid * grid), zero-padded past the volume."""
    base, rand = voco_windows(volume.shape[1:], roi, grid, n_random, rng)
    return {"voco_base": cut_windows(volume, base, roi), "voco_random": cut_windows(volume, rand, roi),
            "voco_targets": overlap_targets(rand, base, roi)}


# ------------------------------------------------------------------------------------ DINO / iBOT multi-crop


def crop_boxes(region_shape: Sequence[int], n: int, scale: Sequence[float], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Start corners and sizes of n random boxes inside a region (DINO's random resized crop, cubic boxes).

    Each box holds a volume fraction s ~ U(scale[0], scale[1]) of the region: its edge along axis a is
    round(region_a * s ** (1 / dims)) (at least 1, at most region_a), its start uniform in [0, region_a - edge].
    Draws per box, in order: s, then one start per axis. Returns (starts (n, dims), sizes (n, dims)) int64."""
    region = np.asarray(region_shape, dtype=np.int64)
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop scale {list(scale)} must satisfy 0 < low <= high <= 1")
    starts = np.zeros((n, len(region)), dtype=np.int64)
    sizes = np.zeros((n, len(region)), dtype=np.int64)
    for k in range(n):
        side = float(rng.uniform(lo, hi)) ** (1.0 / len(region))
        sizes[k] = np.clip(np.round(region * side), 1, region)
        starts[k] = [rng.integers(0, r - s + 1) for r, s in zip(region.tolist(), sizes[k].tolist())]
    return starts, sizes


def resized_crops(region: np.ndarray, starts: np.ndarray, sizes: np.ndarray, out_size: Sequence[int]) -> np.ndarray:
    """Boxes of a (C, *R) array resampled to `out_size` (trilinear / bilinear, as torch's interpolate with
    align_corners False; a box already of that size is copied exactly): (n, C, *out_size) float32."""
    import torch
    import torch.nn.functional as F

    out_size = tuple(int(s) for s in out_size)
    mode = "trilinear" if len(out_size) == 3 else "bilinear"
    crops = []
    for st, sz in zip(starts, sizes):
        box = region[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(st.tolist(), sz.tolist()))]
        box = np.ascontiguousarray(box, dtype=np.float32)
        if tuple(box.shape[1:]) != out_size:
            box = F.interpolate(torch.from_numpy(box)[None], size=out_size, mode=mode, align_corners=False)[0].numpy()
        crops.append(box)
    return np.stack(crops)


def token_masks(grid: Sequence[int], n: int, ratio: Sequence[float], prob: float, rng: np.random.Generator
                ) -> np.ndarray:
    """n random masks over a grid of mask cells (SMIT / iBOT masked tokens): each is drawn with probability
    `prob` (else all False) and then hides ceil(r * cells) cells chosen uniformly, r ~ U(ratio[0], ratio[1]).
    Draws per mask, in order: the coin, r, a permutation of the cells (all three always drawn, so one mask's
    outcome never moves the next one's draws). Returns (n, *grid) bool."""
    grid = tuple(int(g) for g in grid)
    cells = int(np.prod(grid))
    out = np.zeros((n, cells), dtype=bool)
    for k in range(n):
        masked = rng.random() < prob
        r = float(rng.uniform(ratio[0], ratio[1]))
        order = rng.permutation(cells)
        if masked:
            out[k, order[: int(np.ceil(r * cells - 1e-9))]] = True
    return out.reshape((n,) + grid)
