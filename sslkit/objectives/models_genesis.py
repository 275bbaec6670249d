"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021, arXiv 2004.07882): restore the original crop from a
transformed one; loss = MSE(decoder(encoder(T(x))), flip(x)), the decoder a U-Net over every encoder stage.

The transformations, their order and rates follow the authors' code (`MrGiovanni/ModelsGenesis`,
pytorch/utils.py `generate_pair` and pytorch/config.py); per sample, on a crop x in [0, 1]:
  1. flip (rate 0.4, applied to input and target): up to 3 rounds, round k happens while U < 0.4, each flips
     one random axis. (The authors draw the axis from {0, 1, 2} of a (C, X, Y, Z) array, so a third of their
     rounds flip the 1-voxel channel axis and Z never flips; here the axis is drawn from the spatial axes.)
  2. local pixel shuffling (rate 0.5): 10000 windows of 1..S//10 voxels per axis at uniform positions, each
     filled with a random permutation of the *original* window, later windows overwriting earlier ones.
  3. non-linear intensity (rate 0.9): y = B(x) for a cubic Bezier curve through (0, 0), P1, P2, (1, 1) with
     P1, P2 ~ U[0, 1]^2; with probability 1/2 the curve is traversed backwards (x = X(s) -> Y(1 - s)),
     which inverts the intensities.
  4. painting (rate 0.9), then inner cutout with probability 0.2 (`1 - outpaint_rate`), else outer cutout:
     inner: up to 5 boxes (each further box while U < 0.95) of S//6..S//3 per axis, 3 voxels from the border,
     filled with U(0, 1) noise; outer: U(0, 1) noise everywhere except 1 + up to 4 boxes of S - (3S//7..4S//7)
     per axis that keep the image.
Every step is a standalone function of explicit random inputs (`draw_*` makes them from a torch.Generator, or
torch's global RNG on the batch device when none is given, so the engine's checkpointed RNG replays them).

Authors' pre-training (pytorch/config.py, infinite_generator_3D.py): LUNA16 chest CT at its native spacing,
HU clipped -1000..1000 -> [0, 1], 64 x 64 x 32 crops (32 per scan, 100 voxels in from the X/Y borders and 30
from the Z ends, mostly lung), batch 6, SGD lr 1 momentum 0.9 no weight decay, StepLR x0.5 every 40 epochs,
early stop after 50 epochs without validation gain; a 3-D U-Net with a sigmoid output.
Restoration here: `recon.SkipDecoder`, a U-Net decoder over all the encoder's stages (sigmoid output by default),
as the authors' U-Net; pretrain_configs/demo_models_genesis.yaml gives what the optimizer settings do to the encoder.

    obj = ModelsGenesis(encoder)
    out = obj({"image": x}, encoder)   # x (B, C, *roi) in [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput
from sslkit.objectives.recon import SkipDecoder, stage_stride
from sslkit.objectives.registry import register_objective

OUTPUTS = ("sigmoid", "linear")


@dataclass(frozen=True)
class GenesisRates:
    """The authors' defaults (pytorch/config.py): nonlinear_rate 0.9, local_rate 0.5, paint_rate 0.9,
    outpaint_rate 0.8 (so inner cutout 0.2 of the painted samples), flip_rate 0.4."""

    nonlinear: float = 0.9
    local: float = 0.5
    paint: float = 0.9
    inner: float = 0.2
    flip: float = 0.4

    def __post_init__(self):
        for name in ("nonlinear", "local", "paint", "inner", "flip"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} rate must be in [0, 1], got {v}")


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randint(lo: torch.Tensor, hi: torch.Tensor, generator, device) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive, element-wise, hi >= lo), shaped as lo."""
    u = _rand(lo.shape, generator, device)
    return (lo + (u * (hi - lo + 1)).floor()).clamp(max=hi).long()


# --------------------------------------------------------------------------------------------- flip


def draw_flips(batch: int, dims: int, rate: float, generator=None, device=None,
               rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(parity (B, dims) bool: axes flipped an odd number of times, flipped (B,) bool: at least one round).
    Round k (of `rounds`) happens while U < rate, and flips one uniformly drawn spatial axis."""
    go = (_rand((batch, rounds), generator, device) < rate).long().cumprod(1).bool()  # (B, rounds)
    axis = (_rand((batch, rounds), generator, device) * dims).floor().long().clamp(max=dims - 1)
    hits = F.one_hot(axis, dims) * go.unsqueeze(-1)  # (B, rounds, dims)
    return hits.sum(1) % 2 == 1, go[:, 0]


def flip_batch(x: torch.Tensor, parity: torch.Tensor) -> torch.Tensor:
    """Flip sample i along spatial axis a where parity[i, a]: x (B, C, *S), parity (B, dims) -> (B, C, *S)."""
    out = x.clone()
    for a in range(parity.shape[1]):
        sel = parity[:, a].nonzero(as_tuple=True)[0]
        if sel.numel():
            out[sel] = out[sel].flip(a + 2)  # out[sel] is (n, C, *S): spatial axis a is dim a + 2
    return out


# --------------------------------------------------------------------------------------------- local shuffle


def shuffle_window_limit(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Largest shuffle window per axis: S // 10 (at least 1), as the authors' randint(1, S // 10)."""
    return tuple(max(1, s // 10) for s in spatial)


def draw_shuffle_blocks(batch: int, spatial: tuple[int, ...], n_blocks: int = 10000, generator=None,
                        device=None) -> dict[str, torch.Tensor]:
    """Random inputs of `local_pixel_shuffle` for `batch` samples: sizes (B, N, d) in [1, S//10], starts
    (B, N, d) in [0, S - size], keys (B, N, *limit) uniform permutation keys over each window's local grid."""
    limit = torch.tensor(shuffle_window_limit(spatial), device=device)
    extent = torch.tensor(spatial, device=device)
    shape = (batch, n_blocks, len(spatial))
    sizes = _randint(torch.ones(shape, device=device, dtype=torch.long), limit.expand(shape), generator, device)
    starts = _randint(torch.zeros_like(sizes), extent - sizes, generator, device)
    keys = _rand((batch, n_blocks) + shuffle_window_limit(spatial), generator, device)
    return {"starts": starts, "sizes": sizes, "keys": keys}


def _local_offsets(grid: tuple[int, ...], device) -> torch.Tensor:
    """Row-major local coordinates of a window grid: (prod(grid), d)."""
    axes = torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], 1)


def local_pixel_shuffle(x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor,
                        keys: torch.Tensor) -> torch.Tensor:
    """Models Genesis local pixel shuffling, vectorised; equal to the sequential loop

        out = x.clone()
        for n in range(N):   # window n: box starts[n] .. starts[n] + sizes[n]
            out[box_n] = permute(x[box_n])   # from the ORIGINAL x; later windows overwrite earlier ones

    where the permutation sends the k-th window position in raster order the value at the position with the
    k-th smallest key (keys over the window's local grid, entries outside its size ignored). All channels get
    the same permutation (the authors shuffle channel 0 of their one-channel crops).
    x (B, C, *S); starts, sizes (B, N, d) long; keys (B, N, *L) with L >= sizes -> (B, C, *S).
    """
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    n = starts.shape[1]
    grid = tuple(keys.shape[2:])
    off = _local_offsets(grid, x.device)  # (M, d)
    valid = (off[None, None] < sizes[:, :, None, :]).all(-1)  # (B, N, M)
    src_local = keys.flatten(2).masked_fill(~valid, float("inf")).argsort(-1)  # valid positions, random order
    dst_local = (~valid).to(torch.uint8).argsort(dim=-1, stable=True)  # valid positions, raster order
    n_valid = valid.sum(-1, keepdim=True)  # (B, N, 1)
    use = torch.arange(off.shape[0], device=x.device) < n_valid  # (B, N, M): pair k is a real move

    strides = torch.tensor([math.prod(spatial[i + 1:]) for i in range(len(spatial))], device=x.device)
    corner = (starts * strides).sum(-1, keepdim=True)  # (B, N, 1) linear index of each window's corner
    off_lin = (off * strides).sum(-1)  # (M,) linear offset of each local position
    dst = corner + off_lin[dst_local]  # (B, N, M) linear voxel index
    src = corner + off_lin[src_local]
    window = torch.arange(n, device=x.device).view(1, n, 1).expand_as(dst)

    flat_dst, flat_src = dst[use], src[use]  # (P,)
    sample = torch.arange(b, device=x.device).view(b, 1, 1).expand_as(dst)[use]
    win = window[use]
    v = math.prod(spatial)
    last = torch.full((b * v,), -1, dtype=torch.long, device=x.device)
    last.scatter_reduce_(0, sample * v + flat_dst, win, reduce="amax")  # last window to write each voxel
    final = win == last[sample * v + flat_dst]  # each written voxel keeps only its last window's value
    xs = x.reshape(b, c, v)
    out = xs.clone()
    s, d_, r = sample[final], flat_dst[final], flat_src[final]
    out[s, :, d_] = xs[s, :, r]
    return out.view_as(x)


# --------------------------------------------------------------------------------------------- non-linear


def bezier_points(p1: torch.Tensor, p2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic Bezier from (0, 0) through controls p1, p2 (B, 2) to (1, 1) at s = linspace(0, 1, n):
    B(s) = 3 s (1 - s)^2 p1 + 3 s^2 (1 - s) p2 + s^3 (1, 1). Returns X, Y (B, n)."""
    s = torch.linspace(0.0, 1.0, n, device=p1.device, dtype=torch.float64)
    w1, w2, w3 = 3 * s * (1 - s) ** 2, 3 * s**2 * (1 - s), s**3  # (n,)
    p1, p2 = p1.double(), p2.double()
    xs = w1 * p1[:, :1] + w2 * p2[:, :1] + w3
    ys = w1 * p1[:, 1:] + w2 * p2[:, 1:] + w3
    return xs, ys


def interp(v: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp per row: v (B, V), xp increasing (B, n), fp (B, n) -> (B, V); clamped at the ends."""
    v = torch.maximum(torch.minimum(v, xp[:, -1:]), xp[:, :1])
    hi = torch.searchsorted(xp, v, right=True).clamp(1, xp.shape[1] - 1)
    x0, x1 = xp.gather(1, hi - 1), xp.gather(1, hi)
    f0, f1 = fp.gather(1, hi - 1), fp.gather(1, hi)
    w = torch.where(x1 > x0, (v - x0) / (x1 - x0).clamp_min(1e-30), torch.zeros_like(v))
    return f0 + w * (f1 - f0)


def draw_nonlinear(batch: int, generator=None, device=None) -> dict[str, torch.Tensor]:
    """p1, p2 (B, 2) ~ U[0, 1]^2 and invert (B,) bool with probability 1/2."""
    u = _rand((batch, 5), generator, device)
    return {"p1": u[:, 0:2], "p2": u[:, 2:4], "invert": u[:, 4] < 0.5}


def nonlinear_intensity(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, invert: torch.Tensor,
                        n_points: int = 100_000) -> torch.Tensor:
    """Intensity mapping by the Bezier curve of `bezier_points`, as the authors' np.interp on n_points samples:
    x = X(s) -> Y(s), or -> Y(1 - s) where invert. x (B, C, *S) in [0, 1]; p1, p2 (B, 2); invert (B,) bool."""
    xs, ys = bezier_points(p1, p2, n_points)
    xs = xs.sort(1).values
    ys = torch.where(invert[:, None], ys.flip(1), ys.sort(1).values)
    out = interp(x.reshape(x.shape[0], -1).double(), xs, ys)
    return out.view_as(x).to(x.dtype)


# --------------------------------------------------------------------------------------------- painting


def draw_boxes(batch: int, spatial: tuple[int, ...], kind: str, generator=None, device=None,
               max_boxes: int = 5, more: float = 0.95) -> dict[str, torch.Tensor]:
    """Cutout boxes: starts, sizes (B, K, d) long and valid (B, K) bool, K = max_boxes.

    inner: box k is used while U < `more` (box 0 included), sides S//6..S//3;
    outer: box 0 always, each further box while U < `more`, sides S - (3S//7 .. 4S//7).
    Starts are uniform in [3, S - side - 3] (the authors' 3-voxel margin; narrowed on tiny axes)."""
    ext = torch.tensor(spatial, device=device)
    shape = (batch, max_boxes, len(spatial))
    if kind == "inner":
        sizes = _randint((ext // 6).clamp_min(1).expand(shape), (ext // 3).clamp_min(1).expand(shape),
                         generator, device)
    elif kind == "outer":
        sizes = ext - _randint((3 * ext // 7).expand(shape), (4 * ext // 7).expand(shape), generator, device)
    else:
        raise ValueError(f"box kind '{kind}' is not inner or outer")
    sizes = sizes.clamp(1, None).minimum(ext)
    lo = (ext - sizes).clamp(max=3)
    starts = _randint(lo, torch.maximum(lo, ext - sizes - 3), generator, device)
    cont = _rand((batch, max_boxes), generator, device) < more
    if kind == "outer":
        cont[:, 0] = True
    return {"starts": starts, "sizes": sizes, "valid": cont.long().cumprod(1).bool()}


def box_mask(spatial: tuple[int, ...], starts: torch.Tensor, sizes: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
    """Union of the valid boxes per sample: starts, sizes (B, K, d), valid (B, K) -> (B, 1, *S) bool."""
    b, k = valid.shape
    mask = valid.view([b, k] + [1] * len(spatial))
    for a, s in enumerate(spatial):
        r = torch.arange(s, device=starts.device)
        inside = (r >= starts[..., a, None]) & (r < (starts + sizes)[..., a, None])  # (B, K, s)
        shape = [b, k] + [1] * len(spatial)
        shape[2 + a] = s
        mask = mask & inside.view(shape)  # (B, K, *S) once every axis is in
    return mask.any(1, keepdim=True)


def inner_cutout(x: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Inside the boxes, noise; elsewhere x. x (B, C, *S), mask (B, 1, *S), noise broadcastable to x."""
    return torch.where(mask, noise.to(x.dtype), x)


def outer_cutout(x: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Inside the boxes, x; elsewhere noise. x (B, C, *S), mask (B, 1, *S), noise broadcastable to x."""
    return torch.where(mask, x, noise.to(x.dtype))


# --------------------------------------------------------------------------------------------- pipeline


def draw_flags(batch: int, dims: int, rates: GenesisRates, generator=None, device=None) -> dict[str, torch.Tensor]:
    """Which transformations each sample gets: flip_parity (B, dims), flip, local, nonlinear, paint, inner (B,)
    bool (inner is set only for painted samples; painted and not inner is outer cutout)."""
    parity, flipped = draw_flips(batch, dims, rates.flip, generator, device)
    u = _rand((batch, 4), generator, device)
    paint = u[:, 2] < rates.paint
    return {"flip_parity": parity, "flip": flipped, "local": u[:, 0] < rates.local,
            "nonlinear": u[:, 1] < rates.nonlinear, "paint": paint, "inner": paint & (u[:, 3] < rates.inner)}


def genesis_transform(x: torch.Tensor, rates: GenesisRates = GenesisRates(), n_blocks: int = 10000,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input, target, flags) for a batch x (B, C, *S) in [0, 1]: target = flip(x); input = paint(nonlinear(
    shuffle(target))) with per-sample draws (see the module docstring). Randomness from `generator` or, when
    None, torch's global RNG on x's device."""
    dev, b, spatial = x.device, x.shape[0], tuple(x.shape[2:])
    flags = draw_flags(b, len(spatial), rates, generator, dev)
    target = flip_batch(x, flags["flip_parity"])
    inp = target.clone()
    sel = flags["local"].nonzero(as_tuple=True)[0]
    if sel.numel():
        inp[sel] = local_pixel_shuffle(inp[sel], **draw_shuffle_blocks(sel.numel(), spatial, n_blocks, generator,
                                                                       dev))
    sel = flags["nonlinear"].nonzero(as_tuple=True)[0]
    if sel.numel():
        inp[sel] = nonlinear_intensity(inp[sel], **draw_nonlinear(sel.numel(), generator, dev))
    for kind, chosen in (("inner", flags["inner"]), ("outer", flags["paint"] & ~flags["inner"])):
        sel = chosen.nonzero(as_tuple=True)[0]
        if not sel.numel():
            continue
        mask = box_mask(spatial, **draw_boxes(sel.numel(), spatial, kind, generator, dev))
        if kind == "inner":  # one noise value per voxel, shared by the channels (authors: rand(X, Y, Z))
            noise = _rand((sel.numel(), 1) + spatial, generator, dev)
            inp[sel] = inner_cutout(inp[sel], mask, noise)
        else:
            noise = _rand((sel.numel(),) + tuple(x.shape[1:]), generator, dev)
            inp[sel] = outer_cutout(inp[sel], mask, noise)
    return inp, target, flags


@register_objective("models_genesis")
class ModelsGenesis(Objective):
    """Restore flip(x) from its Models Genesis transformation of batch[key] (B, C, *roi) in [0, 1]:
    loss = mean (decoder(encoder(T(x))) - flip(x))^2.

    Options: nonlinear_rate (0.9), local_rate (0.5), paint_rate (0.9), inner_rate (0.2 of painted; the authors'
    1 - outpaint_rate), flip_rate (0.4), shuffle_blocks (10000), output (sigmoid | linear), key ("image"),
    min_channels (16, decoder channel floor).
    Logs: input_mse (MSE of the transformed input itself: the identity's loss), and the share of the batch that
    got each transformation (flip, local, nonlinear, inner, outer).
    No embeddings for the monitor's bank: like the other restoration objectives it has no projector, and the bank
    statistics read the shared mean direction of raw pooled features as collapse (mean cosine > 0.95 from step 1).
    The monitor's probe judges the encoder instead (sslkit/monitor/probe_stats.py).
    """

    def __init__(self, encoder: nn.Module, nonlinear_rate: float = 0.9, local_rate: float = 0.5,
                 paint_rate: float = 0.9, inner_rate: float = 0.2, flip_rate: float = 0.4,
                 shuffle_blocks: int = 10000, output: str = "sigmoid", key: str = "image", min_channels: int = 16):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output '{output}' is not one of {', '.join(OUTPUTS)}")
        if shuffle_blocks < 1:
            raise ValueError(f"shuffle_blocks must be >= 1, got {shuffle_blocks}")
        self.rates = GenesisRates(nonlinear_rate, local_rate, paint_rate, inner_rate, flip_rate)
        self.shuffle_blocks = int(shuffle_blocks)
        self.output = output
        self.key = key
        stages = len(encoder.feature_channels)
        self.decoder = SkipDecoder(encoder.spatial_dims, list(encoder.feature_channels),
                                   [stage_stride(encoder, i) for i in range(stages)], encoder.in_channels, min_channels)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        if self.key not in batch:
            raise ValueError(f"models_genesis needs batch key '{self.key}'")
        x = batch[self.key]
        v = ctx.view("models_genesis", lambda b: dict(zip(
            ("input", "target", "flags"), genesis_transform(x, self.rates, self.shuffle_blocks))))
        feats = ctx.features("models_genesis:input", v["input"])  # [(B, C_i, *S/stride_i)] shallow -> deep
        rec = self.decoder(feats, tuple(x.shape[2:]))  # (B, C_in, *S)
        if self.output == "sigmoid":
            rec = torch.sigmoid(rec)
        target = v["target"].float()
        loss = F.mse_loss(rec.float(), target)
        f = v["flags"]
        logs = {"input_mse": float(F.mse_loss(v["input"].float(), target)),
                **{k: float(f[k].float().mean()) for k in ("flip", "local", "nonlinear", "inner")},
                "outer": float((f["paint"] & ~f["inner"]).float().mean())}
        return ObjectiveOutput(loss, logs)
