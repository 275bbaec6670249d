"""Models Genesis (issue 15): each transformation against a hand reference on a small volume, the authors' rates
over many draws, and an MSE restoration loss that falls on crops of the real demo head CT."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkit.errors import ConfigError
from sslkit.objectives.models_genesis import (
    GenesisRates, ModelsGenesis, box_mask, draw_boxes, draw_flags, draw_flips, draw_nonlinear, draw_shuffle_blocks,
    flip_batch, genesis_transform, inner_cutout, local_pixel_shuffle, nonlinear_intensity, outer_cutout,
    shuffle_window_limit)
from sslkit.objectives.registry import build_objective

from conftest import tiny_swin


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ non-linear


def bezier_closed_form(v: np.ndarray, p1, p2, invert: bool) -> np.ndarray:
    """y for intensities v on the cubic Bezier (0,0), p1, p2, (1,1): solve X(s) = v by bisection (X is monotone
    for controls in [0, 1]), then y = Y(s), or Y(1 - s) for the inverted curve."""
    def coord(s, a, b):
        return 3 * s * (1 - s) ** 2 * a + 3 * s**2 * (1 - s) * b + s**3

    lo, hi = np.zeros_like(v), np.ones_like(v)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = coord(mid, p1[0], p2[0]) < v
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    s = (lo + hi) / 2
    return coord(1 - s if invert else s, p1[1], p2[1])


def authors_procedure(v: np.ndarray, p1, p2, invert: bool, n: int = 100_000) -> np.ndarray:
    """The authors' recipe rewritten in numpy: Bernstein weights comb(3, i) t^(3-i) (1-t)^i on control points
    (0,0), p1, p2, (1,1) at t = linspace(0, 1, n); sort x (and y unless inverted); np.interp."""
    pts = np.array([[0.0, 0.0], p1, p2, [1.0, 1.0]])
    t = np.linspace(0.0, 1.0, n)
    w = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])  # (4, n)
    xs, ys = pts[:, 0] @ w, pts[:, 1] @ w
    xs, ys = (np.sort(xs), ys) if invert else (np.sort(xs), np.sort(ys))
    return np.interp(v, xs, ys)


def test_nonlinear_intensity_is_the_cubic_bezier():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 6, 7, generator=gen, dtype=torch.float64)
    x[0, 0, 0, 0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # both ends of the range
    d = draw_nonlinear(6, gen)
    d["invert"] = torch.tensor([False, True] * 3)
    y = nonlinear_intensity(x, **d)
    for i in range(6):
        p1, p2, inv = d["p1"][i].tolist(), d["p2"][i].tolist(), bool(d["invert"][i])
        v = x[i].numpy()
        np.testing.assert_allclose(y[i].numpy(), bezier_closed_form(v, p1, p2, inv), atol=2e-5)
        np.testing.assert_allclose(y[i].numpy(), authors_procedure(v, p1, p2, inv), atol=1e-6)
        order = np.argsort(v.ravel())
        steps = np.diff(y[i].numpy().ravel()[order])
        assert (steps <= 1e-9).all() if inv else (steps >= -1e-9).all()  # inverted curves reverse the order
    assert float(y[0, 0, 0, 0, 0]) == pytest.approx(1.0 if d["invert"][0] else 0.0)


# ------------------------------------------------------------------------------------------ local shuffle


def shuffle_reference(x: torch.Tensor, starts, sizes, keys) -> torch.Tensor:
    """The authors' loop: each window, in order, gets a permutation of the original window; later ones win."""
    out = x.clone()
    for b in range(x.shape[0]):
        for n in range(starts.shape[1]):
            st, sz = starts[b, n].tolist(), sizes[b, n].tolist()
            local = [p for p in np.ndindex(*keys.shape[2:]) if all(a < s for a, s in zip(p, sz))]  # raster order
            by_key = sorted(local, key=lambda p: float(keys[(b, n) + p]))
            for dst, src in zip(local, by_key):
                out[(b, slice(None)) + tuple(a + o for a, o in zip(st, dst))] = \
                    x[(b, slice(None)) + tuple(a + o for a, o in zip(st, src))]
    return out


@pytest.mark.parametrize("spatial", [(30, 24, 20), (40, 33)])
def test_local_pixel_shuffle_equals_the_sequential_loop(spatial):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((2, 2) + spatial, generator=gen)
    blocks = draw_shuffle_blocks(2, spatial, 150, gen)
    limit = torch.tensor(shuffle_window_limit(spatial))
    assert (blocks["sizes"] >= 1).all() and (blocks["sizes"] <= limit).all() and (blocks["sizes"] == limit).any()
    assert (blocks["starts"] >= 0).all() and (blocks["starts"] + blocks["sizes"] <= torch.tensor(spatial)).all()
    got = local_pixel_shuffle(x, **blocks)
    torch.testing.assert_close(got, shuffle_reference(x, **blocks), rtol=0, atol=0)
    covered = torch.zeros(spatial, dtype=torch.bool)
    for st, sz in zip(blocks["starts"][0].tolist(), blocks["sizes"][0].tolist()):
        covered[tuple(slice(a, a + s) for a, s in zip(st, sz))] = True
    assert torch.equal(got[0][:, ~covered], x[0][:, ~covered])  # outside every window: unchanged
    assert (got[0][:, covered] != x[0][:, covered]).float().mean() > 0.3


def test_one_shuffle_window_permutes_only_inside_itself():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 30, 30, 30, generator=gen)
    starts, sizes = torch.tensor([[[4, 10, 7]]]), torch.tensor([[[3, 2, 3]]])
    y = local_pixel_shuffle(x, starts, sizes, torch.rand(1, 1, 3, 3, 3, generator=gen))
    box = (0, 0, slice(4, 7), slice(10, 12), slice(7, 10))
    outside = torch.ones_like(x, dtype=torch.bool)
    outside[box] = False
    assert torch.equal(y[outside], x[outside])
    assert torch.equal(y[box].flatten().sort().values, x[box].flatten().sort().values)  # same multiset
    assert not torch.equal(y[box], x[box])


# ------------------------------------------------------------------------------------------ painting


@pytest.mark.parametrize("spatial", [(16, 20, 12), (24, 18)])
def test_box_mask_and_cutouts_against_loops(spatial):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((3, 2) + spatial, generator=gen)
    noise = torch.rand((3, 2) + spatial, generator=gen)
    for kind in ("inner", "outer"):
        boxes = draw_boxes(3, spatial, kind, gen)
        mask = box_mask(spatial, **boxes)
        want = torch.zeros((3, 1) + spatial, dtype=torch.bool)
        for b in range(3):
            for st, sz, ok in zip(boxes["starts"][b].tolist(), boxes["sizes"][b].tolist(), boxes["valid"][b].tolist()):
                if ok:
                    want[(b, 0) + tuple(slice(a, a + s) for a, s in zip(st, sz))] = True
        assert torch.equal(mask, want)
        inner, outer = inner_cutout(x, mask, noise), outer_cutout(x, mask, noise)
        m = mask.expand_as(x)
        assert torch.equal(inner[~m], x[~m]) and torch.equal(inner[m], noise[m])  # inner changes only the boxes
        assert torch.equal(outer[m], x[m]) and torch.equal(outer[~m], noise[~m])  # outer keeps only the boxes


def test_box_sizes_positions_and_counts_follow_the_authors():
    spatial = (64, 64, 32)
    ext = torch.tensor(spatial)
    gen = torch.Generator().manual_seed(4)
    inner, outer = draw_boxes(4000, spatial, "inner", gen), draw_boxes(4000, spatial, "outer", gen)
    assert ((inner["sizes"] >= ext // 6) & (inner["sizes"] <= ext // 3)).all()
    assert ((outer["sizes"] >= ext - 4 * ext // 7) & (outer["sizes"] <= ext - 3 * ext // 7)).all()
    for boxes in (inner, outer):
        assert (boxes["starts"] >= 3).all() and (boxes["starts"] + boxes["sizes"] <= ext - 3).all()
    # inner: box k exists while U < 0.95 (up to 5); outer: the first box always, then up to 4 more the same way
    n_in, n_out = inner["valid"].sum(1).float(), outer["valid"].sum(1).float()
    assert abs(float((n_in == 0).float().mean()) - 0.05) < 0.015
    assert bool((n_out >= 1).all()) and abs(float((n_out == 1).float().mean()) - 0.05) < 0.015
    assert abs(float((n_in == 5).float().mean()) - 0.95**5) < 0.03


# ------------------------------------------------------------------------------------------ flip + pipeline


def test_flip_is_shared_by_input_and_target():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(16, 1, 8, 9, 10, generator=gen)
    only_flip = GenesisRates(nonlinear=0.0, local=0.0, paint=0.0, inner=0.0, flip=1.0)
    inp, target, flags = genesis_transform(x, only_flip, generator=gen)
    assert torch.equal(inp, target) and bool(flags["flip"].all())
    for i in range(16):
        axes = [a + 1 for a in range(3) if flags["flip_parity"][i, a]]
        assert torch.equal(target[i], x[i].flip(axes) if axes else x[i])
    parity, _ = draw_flips(2, 3, 1.0, gen)
    assert torch.equal(flip_batch(x[:2], parity)[1], x[1].flip([a + 1 for a in range(3) if parity[1, a]])
                       if parity[1].any() else x[1])
    nothing = GenesisRates(0.0, 0.0, 0.0, 0.0, 0.0)
    inp, target, _ = genesis_transform(x, nothing, generator=gen)
    assert torch.equal(inp, x) and torch.equal(target, x)


def test_rates_hold_over_many_draws():
    gen = torch.Generator().manual_seed(6)
    n = 40000
    f = draw_flags(n, 3, GenesisRates(), gen)
    tol = 4 * math.sqrt(0.25 / n)  # four standard deviations at worst
    for key, rate in (("nonlinear", 0.9), ("local", 0.5), ("paint", 0.9), ("flip", 0.4)):
        assert abs(float(f[key].float().mean()) - rate) < tol, key
    painted = f["paint"]
    assert abs(float(f["inner"][painted].float().mean()) - 0.2) < 2 * tol  # inner 0.2, outer 0.8 of painted
    assert not bool((f["inner"] & ~painted).any())
    _, rounds = draw_flips(n, 3, 0.4, gen)
    assert abs(float(rounds.float().mean()) - 0.4) < tol
    parity, _ = draw_flips(n, 3, 0.4, gen)
    per_axis = parity.float().mean(0)
    assert (per_axis - per_axis.mean()).abs().max() < 2 * tol  # no axis favoured


def test_pipeline_applies_what_the_flags_say():
    x = torch.rand(48, 1, 20, 20, 20, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    half = GenesisRates(nonlinear=0.5, local=0.5, paint=0.5, inner=0.5, flip=0.4)  # 1 in 8 samples untouched
    inp, target, f = genesis_transform(x, half, n_blocks=300)  # torch's global RNG
    untouched = ~(f["local"] | f["nonlinear"] | f["paint"])
    assert untouched.any() and (~untouched).any()
    same = (inp == target).flatten(1).all(1)
    assert torch.equal(same, untouched)
    torch.manual_seed(7)
    again = genesis_transform(x, half, n_blocks=300)
    assert torch.equal(again[0], inp) and torch.equal(again[1], target)  # replayable from the RNG state
    assert inp.min() >= 0 and inp.max() <= 1


def test_registry_options_and_outputs():
    enc = tiny_swin(2)
    obj = build_objective({"name": "models_genesis", "local_rate": 0.0, "shuffle_blocks": 50}, enc)
    assert isinstance(obj, ModelsGenesis) and obj.rates.local == 0.0 and obj.rates.inner == 0.2
    with pytest.raises(ConfigError, match="flip_rat"):
        build_objective({"name": "models_genesis", "flip_rat": 0.4}, enc)
    with pytest.raises(ConfigError, match="rate must be in"):
        build_objective({"name": "models_genesis", "paint_rate": 1.5}, enc)
    out = obj({"image": torch.rand(2, 1, 32, 32)}, enc)
    assert out.embeddings is None and 0.0 <= out.logs["input_mse"]  # no projector: the probe judges the encoder
    assert {"flip", "local", "nonlinear", "inner", "outer"} <= set(out.logs)


def test_restoration_decoder_reads_every_encoder_stage():
    """The U-Net decoder returns the input grid and its output depends on every stage: the loss has a gradient on
    each stage's feature map (a decoder on the deepest stage alone gives the shallow ones none)."""
    from sslkit.objectives.recon import SkipDecoder

    for dims, size in ((3, (32, 32, 32)), (2, (64, 48))):
        enc = tiny_swin(dims)
        obj = build_objective({"name": "models_genesis"}, enc)
        assert isinstance(obj.decoder, SkipDecoder)
        feats = [f.detach().requires_grad_() for f in enc(torch.rand(2, 1, *size))]
        rec = obj.decoder(feats, size)
        assert rec.shape == (2, 1, *size)
        rec.square().mean().backward()
        assert all(float(f.grad.abs().sum()) > 0 for f in feats), [float(f.grad.abs().sum()) for f in feats]
    # stages on one grid (a ViT: equal strides) and a crop that is not a multiple of the stride
    dec = SkipDecoder(3, [8, 8, 8], [4, 4, 4], 1)
    assert dec([torch.randn(1, 8, 3, 3, 3) for _ in range(3)], (10, 11, 12)).shape == (1, 1, 10, 11, 12)
    with pytest.raises(ValueError, match="divide"):
        SkipDecoder(3, [8, 8], [4, 6], 1)


# ------------------------------------------------------------------------------------------ real scan


def ct_volume(demo_dir, spacing=2.0) -> torch.Tensor:
    """The demo head CT, HU -1000..1000 -> [0, 1] (the authors' window), resampled to ~`spacing` mm."""
    import nibabel as nib

    img = nib.load(str(demo_dir / "ct_head.nii.gz"))
    hu = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))
    x = ((hu.clamp(-1000.0, 1000.0) + 1000.0) / 2000.0)[None, None]
    size = [round(n * z / spacing) for n, z in zip(hu.shape, img.header.get_zooms()[:3])]
    return F.interpolate(x, size=size, mode="area")[0]  # (1, 122, 122, 81)


def head_crops(vol: torch.Tensor, n: int, size: int, dims: int, gen: torch.Generator) -> torch.Tensor:
    """n crops (n, 1, *size^dims) from the central 20-80% of the head; 2-D: an axial slice of the middle third."""
    out = []
    for _ in range(n):
        xy = [int(torch.randint(int(0.2 * s), max(int(0.2 * s) + 1, int(0.8 * s) - size), (1,), generator=gen))
              for s in vol.shape[1:3]]
        z_lo, z_hi = (int(0.2 * vol.shape[3]), int(0.8 * vol.shape[3]) - size) if dims == 3 else \
            (vol.shape[3] // 3, 2 * vol.shape[3] // 3)
        z = int(torch.randint(z_lo, z_hi, (1,), generator=gen))
        c = vol[:, xy[0]:xy[0] + size, xy[1]:xy[1] + size]
        out.append(c[..., z:z + size] if dims == 3 else c[..., z])
    return torch.stack(out)


@pytest.mark.parametrize("dims,size,threshold", [(3, 32, 0.8), (2, 64, 0.9)])
def test_restoration_loss_falls_on_real_ct_crops(demo_dir, dims, size, threshold):
    """Tiny Swin-UNETR + decoder, 30 Adam steps on a fixed pool of 2 batches of 4 real head-CT crops at 2 mm; the
    RNG is re-seeded per pool item so each keeps its transformations: the MSE must fall."""
    vol = ct_volume(demo_dir)
    gen = torch.Generator().manual_seed(0)
    pool = [head_crops(vol, 4, size, dims, gen) for _ in range(2)]
    torch.manual_seed(0)
    enc = tiny_swin(dims)
    obj = build_objective({"name": "models_genesis"}, enc)
    opt = torch.optim.Adam(list(enc.parameters()) + list(obj.parameters()), lr=1e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(1000 + step % 2)
        out = obj({"image": pool[step % 2]}, enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"models genesis {dims}D real-CT MSE: first 5 {[round(v, 4) for v in losses[:5]]} "
          f"last 5 {[round(v, 4) for v in losses[-5:]]} (input_mse {out.logs['input_mse']:.4f})")
    assert all(math.isfinite(v) for v in losses)
    assert last < threshold * first, f"{dims}D first {first:.4f} last {last:.4f}: {losses}"
    assert last < out.logs["input_mse"]  # better than returning the transformed input
