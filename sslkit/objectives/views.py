"""Objective-specific corruptions of batch views: per-sample rot90, Swin-UNETR cutout, shared corrupted views.

All randomness comes from torch's global RNG on the batch's device (the engine checkpoints its state), so a
resumed run draws the same corruptions.

Shared views. Objectives that read the same corrupted inputs ask the ForwardContext for the same view name,
so the corruption is drawn once and the encoder runs once per corrupted input:

    spec = CorruptionSpec.from_view_name("rot_cutout")
    v = ctx.view("rot_cutout", lambda b: make_corrupted_views(b, spec))
    feats = ctx.features(feature_key("rot_cutout", "view1"), v["view1"])

View names: "plain" (the batch views as they are), "rot" (rotated), "cutout" (cut out), "rot_cutout"
(rotated, then cut out: the Swin-UNETR pre-training input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VIEW_NAMES = ("plain", "rot", "cutout", "rot_cutout")
FILLS = ("noise", "swap", "both")


# --------------------------------------------------------------------------------------------- rotation


def rotate_batch(x: torch.Tensor, k: torch.Tensor, plane: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """Rotate each sample by k_i * 90 degrees in one plane of spatial axes.

    x: (B, C, *S); k: (B,) long in {0, 1, 2, 3}; plane: two spatial axes counted in x's dims (negative allowed).
    The two axes of the plane must be equal in size so that the rotated samples stack.
    Returns (B, C, *S).
    """
    a, b = plane
    if x.shape[a] != x.shape[b]:
        raise ValueError(f"rotation plane {plane} has unequal sizes {x.shape[a]} and {x.shape[b]}")
    out = torch.empty_like(x)
    for r in range(4):
        sel = (k == r).nonzero(as_tuple=True)[0]
        if sel.numel():
            out[sel] = torch.rot90(x[sel], r, dims=(a, b))
    return out


def random_rotation(x: torch.Tensor, plane: tuple[int, int] = (-2, -1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated x, labels k (B,) long): k_i ~ U{0,1,2,3} per sample from the global RNG on x's device."""
    k = torch.randint(0, 4, (x.shape[0],), device=x.device)
    return rotate_batch(x, k, plane), k


# --------------------------------------------------------------------------------------------- cutout


def _randint(lo: int, hi: int, device) -> int:
    """Integer in [lo, hi] (inclusive) from the global RNG."""
    return int(torch.randint(lo, hi + 1, (1,), device=device).item())


def _cut_boxes(x: torch.Tensor, mask: torch.Tensor, budget: float, box_min: float, box_max: float,
               source: torch.Tensor | None) -> None:
    """Cut boxes into one sample x (C, *S) in place until `budget` voxels are cut (counted with overlaps,
    as Swin-UNETR does). Each box side is in [box_min, box_max] of its axis. Filled with Gaussian noise
    rescaled to the sample's intensity range (source None) or with the same box of `source` (C, *S).
    Box sizes and corners are drawn in chunks (one host sync per chunk, not per number)."""
    spatial = x.shape[1:]
    d = len(spatial)
    lo = torch.tensor([max(1, int(round(box_min * s))) for s in spatial], dtype=torch.float64)
    hi = torch.tensor([max(int(l), int(box_max * s)) for l, s in zip(lo.tolist(), spatial)], dtype=torch.float64)
    extent = torch.tensor(spatial, dtype=torch.float64)
    if source is None:
        noise = torch.randn_like(x)
        noise = (noise - noise.min()) / (noise.max() - noise.min() + 1e-8)  # Swin-UNETR: noise -> [0, 1]
        source = x.min() + noise * (x.max() - x.min())
    done = 0.0
    while done < budget:
        u = torch.rand(2, 32, d, device=x.device, dtype=torch.float64).cpu()  # 32 boxes per chunk
        size = (lo + u[0] * (hi - lo + 1)).floor().clamp(max=hi)  # (32, d) in [lo, hi]
        start = (u[1] * (extent - size + 1)).floor()
        for sz, st in zip(size.long().tolist(), start.long().tolist()):
            if done >= budget:
                break
            box = (slice(None),) + tuple(slice(a, a + z) for a, z in zip(st, sz))
            x[box] = source[box]
            mask[box] = True
            done += math.prod(sz)


def cutout(x: torch.Tensor, max_fraction: float = 0.3, box_min: float = 0.05, box_max: float = 0.25,
           fill: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """Swin-UNETR cutout: per sample, cut u * max_fraction of the voxels (u ~ U(0, 1)) in boxes whose sides are
    box_min..box_max of each axis.

    fill: "noise" (Gaussian noise rescaled to the sample's intensity range), "swap" (the same boxes of another
    sample of the batch), "both" (noise boxes, then - as Swin-UNETR's aug_rand - a second round of boxes taken
    from a random other sample when the batch has one).
    x: (B, C, *S). Returns (x_cut (B, C, *S), mask (B, 1, *S) bool, True where any box covered the voxel).
    """
    if fill not in FILLS:
        raise ValueError(f"fill '{fill}' is not one of {', '.join(FILLS)}")
    if not 0.0 <= max_fraction <= 1.0 or not 0.0 < box_min <= box_max <= 1.0:
        raise ValueError(f"need 0 <= max_fraction <= 1 and 0 < box_min <= box_max <= 1, got "
                         f"{max_fraction}, {box_min}, {box_max}")
    bsz = x.shape[0]
    n_vox = x[0, 0].numel()
    out = x.detach().clone()
    mask = torch.zeros((bsz, 1) + tuple(x.shape[2:]), dtype=torch.bool, device=x.device)
    for i in range(bsz):
        if fill in ("noise", "both") or bsz == 1:
            budget = float(torch.rand((), device=x.device)) * max_fraction * n_vox
            _cut_boxes(out[i], mask[i], budget, box_min, box_max, None)
        if fill in ("swap", "both") and bsz > 1:
            j = (i + _randint(1, bsz - 1, x.device)) % bsz  # a random other sample
            budget = float(torch.rand((), device=x.device)) * max_fraction * n_vox
            _cut_boxes(out[i], mask[i], budget, box_min, box_max, x[j].detach())
    return out, mask


# --------------------------------------------------------------------------------------------- shared views


@dataclass(frozen=True)
class CorruptionSpec:
    """What a corrupted view does: rotate (plane as two spatial axes, 0-based among spatial axes), cutout
    (max_fraction, box_min, box_max, fill), and which batch keys it corrupts."""

    rotate: bool = False
    cutout: bool = False
    plane: tuple[int, int] = (-2, -1)
    max_fraction: float = 0.3
    box_min: float = 0.05
    box_max: float = 0.25
    fill: str = "both"
    keys: tuple[str, ...] = ("view1", "view2")

    @classmethod
    def from_view_name(cls, view: str, **options) -> "CorruptionSpec":
        if view not in VIEW_NAMES:
            raise ValueError(f"view '{view}' is not one of {', '.join(VIEW_NAMES)}")
        return cls(rotate="rot" in view, cutout="cutout" in view, **options)

    def conflicts(self, other: "CorruptionSpec", names: tuple[str, ...]) -> list[str]:
        return [n for n in names if getattr(self, n) != getattr(other, n)]


def feature_key(view: str, key: str) -> str:
    """ForwardContext feature key of batch key `key` under view `view` ("plain" shares the batch's own key)."""
    return key if view == "plain" else f"{view}:{key}"


def make_corrupted_views(batch: dict, spec: CorruptionSpec) -> dict:
    """For each key k of spec.keys: {k: input (B,C,*S), k+'_target': rotated clean (B,C,*S),
    k+'_rot': labels (B,) long (zeros without rotation), k+'_mask': cutout mask (B,1,*S) bool}, plus 'spec'.

    Rotation plane axes are spatial axes: (-2, -1) are the last two; the tensor axis is plane + 2 if >= 0.
    """
    out: dict = {"spec": spec}
    for k in spec.keys:
        x = batch[k]
        plane = tuple(p + 2 if p >= 0 else p for p in spec.plane)
        if spec.rotate:
            target, rot = random_rotation(x, plane)
        else:
            target, rot = x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if spec.cutout:
            inp, mask = cutout(target, spec.max_fraction, spec.box_min, spec.box_max, spec.fill)
        else:
            inp, mask = target, torch.zeros((x.shape[0], 1) + tuple(x.shape[2:]), dtype=torch.bool,
                                            device=x.device)
        out.update({k: inp, f"{k}_target": target, f"{k}_rot": rot, f"{k}_mask": mask})
    return out


def shared_view(ctx, view: str, spec: CorruptionSpec, check: tuple[str, ...] = ()) -> dict:
    """The corrupted view `view` from ctx (made once per micro-batch by whichever objective asks first).

    `check` names spec fields the caller depends on; if the view was made with different values (two
    objectives sharing a view with different options), raise a ValueError naming them."""
    v = ctx.view(view, lambda b: make_corrupted_views(b, spec))
    bad = v["spec"].conflicts(spec, check)
    if bad:
        raise ValueError(f"objectives sharing view '{view}' disagree on {', '.join(bad)}: set the same values "
                         f"on each")
    return v


