"""The objective zoo (issue 4): exact formulas on small tensors, gradients, shared forwards, and short training
runs on a real scan (the MNI ch2 template shipped with mricron) that must lower each loss."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslkit.errors import ConfigError
from sslkit.models.vit import ViTEncoder, sincos_pos_embed
from sslkit.objectives import ForwardContext
from sslkit.objectives.composite import Composite
from sslkit.objectives.emix import EMix, emix_loss, mix_embeddings
from sslkit.objectives.inpainting import l1_loss
from sslkit.objectives.mae import mae_loss, patchify, random_keep
from sslkit.objectives.recon import voxel_shuffle
from sslkit.objectives.registry import build_objective
from sslkit.objectives.rotation import rotation_loss
from sslkit.objectives.shed import shed_loss, shuffle_tokens
from sslkit.objectives.simclr import NTXentLoss
from sslkit.objectives.simmim import SimMIM
from sslkit.objectives.views import CorruptionSpec, cutout, rotate_batch, shared_view

from conftest import tiny_swin

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(dims: int):
    return ViTEncoder(dims, 1, patch_size=4, embed_dim=48, depth=2, num_heads=3)


def rand_batch(dims: int, b: int = 2, size: int | None = None) -> dict:
    size = size or (32 if dims == 3 else 64)
    shape = (b, 1) + (size,) * dims
    return {"image": torch.rand(shape), "view1": torch.rand(shape), "view2": torch.rand(shape),
            "index": torch.arange(b)}


# ------------------------------------------------------------------------------------------ NT-Xent


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_simclr_loss_is_nt_xent_written_out(t):
    """SimCLR's loss (lightly's NTXentLoss) equals NT-Xent by hand: each of the 2N queries against its other view
    among all 2N - 1 other projections."""
    torch.manual_seed(0)
    enc = tiny_swin(3)
    obj = build_objective({"name": "simclr", "temperature": t, "hidden_dim": 16, "out_dim": 8}, enc)
    batch = rand_batch(3, b=3)
    loss = obj(batch, enc).loss
    with torch.no_grad():
        z = torch.cat([F.normalize(obj.head(enc(batch[k])[-1].flatten(2).mean(-1)), dim=1) for k in ("view1", "view2")])
    n = 3
    terms = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i)
        terms.append(-math.log(math.exp(float(z[i] @ z[pos]) / t) / den))
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def _ntxent_worker(rank: int, world: int, store: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)  # same full batch on every rank
    n = a.shape[0] // world
    la = a[rank * n:(rank + 1) * n].clone().requires_grad_()
    lb = b[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = NTXentLoss(0.5, gather_distributed=True)(la, lb)
    loss.backward()
    torch.save({"loss": loss.detach(), "ga": la.grad, "gb": lb.grad}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_ntxent_gathered_equals_single_process(tmp_path):
    world = 2
    torch.multiprocessing.spawn(_ntxent_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
                                nprocs=world, join=True)
    res = [torch.load(tmp_path / f"r{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    a, b = torch.randn(8, 16).requires_grad_(), torch.randn(8, 16).requires_grad_()
    full = NTXentLoss(0.5, gather_distributed=False)(a, b)
    full.backward()
    # the global loss is the mean of the per-rank losses (equal local batch sizes)
    assert torch.allclose(torch.stack([r["loss"] for r in res]).mean(), full.detach(), atol=1e-6)
    # DDP averages gradients over ranks: (1/W) * rank gradient == single-process gradient
    ga = torch.cat([r["ga"] for r in res]) / world
    gb = torch.cat([r["gb"] for r in res]) / world
    assert torch.allclose(ga, a.grad, atol=1e-6) and torch.allclose(gb, b.grad, atol=1e-6)


# ------------------------------------------------------------------------------------------ formulas


def test_rotation_batch_and_loss():
    x = torch.randn(4, 2, 6, 6, 6)
    k = torch.tensor([0, 1, 2, 3])
    y = rotate_batch(x, k)
    for i in range(4):
        assert torch.equal(y[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    with pytest.raises(ValueError, match="unequal"):
        rotate_batch(torch.randn(2, 1, 4, 6), k[:2])
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 2])
    manual = -sum(logits[i, labels[i]] - torch.logsumexp(logits[i], 0) for i in range(5)) / 5
    assert torch.allclose(rotation_loss(logits, labels), manual, atol=1e-6)


def test_l1_masked():
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 1, 4, 4) > 0.5
    manual = sum((pred[b, c, i, j] - target[b, c, i, j]).abs() for b in range(2) for c in range(3)
                 for i in range(4) for j in range(4) if mask[b, 0, i, j]) / (3 * mask.sum())
    assert torch.allclose(l1_loss(pred, target, mask), manual, atol=1e-6)
    assert torch.allclose(l1_loss(pred, target), (pred - target).abs().mean())


def test_patchify_and_mae_loss_norm_pix():
    x = torch.randn(2, 1, 4, 8, 8)
    p = patchify(x, 4)  # grid (1, 2, 2) -> N = 4, P = 64
    assert p.shape == (2, 4, 64)
    assert torch.equal(p[1, 3], x[1, 0, 0:4, 4:8, 4:8].reshape(-1))
    pred = torch.randn(2, 4, 64)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    total, count = 0.0, 0
    for b in range(2):
        for n in range(4):
            if mask[b, n]:
                t = p[b, n]
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                total += ((pred[b, n] - t) ** 2).mean()
                count += 1
    assert torch.allclose(mae_loss(pred, p, mask, norm_pix_loss=True), total / count, atol=1e-5)
    raw = sum(((pred[b, n] - p[b, n]) ** 2).mean() for b in range(2) for n in range(4) if mask[b, n]) / count
    assert torch.allclose(mae_loss(pred, p, mask, norm_pix_loss=False), raw, atol=1e-5)
    ids, m = random_keep(3, 16, 0.75, "cpu")
    assert ids.shape == (3, 4) and m.sum(1).tolist() == [12, 12, 12]


def test_voxel_shuffle_matches_pixel_shuffle_in_2d():
    x = torch.randn(2, 3 * 4, 5, 5)
    assert torch.equal(voxel_shuffle(x, 2), F.pixel_shuffle(x, 2))
    y = voxel_shuffle(torch.arange(8.0).view(1, 8, 1, 1, 1), 2)
    assert y.shape == (1, 1, 2, 2, 2) and torch.equal(y.flatten(), torch.arange(8.0))


def test_emix_loss_formula_and_stop_gradient():
    torch.manual_seed(0)
    zm, z = torch.randn(4, 8), torch.randn(4, 8)
    lam, perm = 0.7, torch.tensor([2, 0, 3, 1])
    logits = F.normalize(zm, dim=1) @ F.normalize(z, dim=1).T / 0.2
    logp = logits.log_softmax(1)
    manual = -sum(lam * logp[i, i] + (1 - lam) * logp[i, perm[i]] for i in range(4)) / 4
    assert torch.allclose(emix_loss(zm, z, lam, perm, 0.2), manual, atol=1e-6)
    # no gradient into the partner through its mixing term: d mix / d e = lam * I only
    e = torch.randn(4, 3, 5, requires_grad=True)
    g = torch.randn(4, 3, 5)
    mix_embeddings(e, lam, perm).backward(g)
    assert torch.allclose(e.grad, lam * g)


def test_emix_objective_gradients():
    torch.manual_seed(0)
    enc = tiny_vit(2)
    obj = EMix(enc, hidden_dim=32, out_dim=16)
    seen = {}

    def keep(_m, _i, out):
        out.register_hook(lambda g: seen.setdefault("g", g))

    h = enc.patch_embed.register_forward_hook(keep)
    out = obj(rand_batch(2, 4, 32), enc)
    h.remove()
    out.loss.backward()
    assert all(p.grad is not None for p in obj.head.parameters())
    assert enc.patch_embed.weight.grad is not None and enc.blocks[0].attn.qkv.weight.grad is not None


def test_shed_shuffle_and_loss():
    torch.manual_seed(0)
    t = torch.randn(3, 20, 4)
    s, labels = shuffle_tokens(t, 0.15)
    assert labels.sum(1).tolist() == [3, 3, 3]
    for b in range(3):
        moved = labels[b].bool()
        assert torch.equal(s[b][~moved], t[b][~moved])  # untouched tokens stay
        # shuffled tokens are a permutation of the originals at the same positions, none in place
        assert sorted(s[b][moved].sum(1).tolist()) == pytest.approx(sorted(t[b][moved].sum(1).tolist()))
        assert not (s[b][moved] == t[b][moved]).all(1).any()
    logits = torch.randn(3, 2, 20)
    logp = logits.log_softmax(1)
    manual = -sum(logp[b, labels[b, n], n] for b in range(3) for n in range(20)) / 60
    assert torch.allclose(shed_loss(logits, labels), manual, atol=1e-6)


def test_cutout_and_shared_view_conflict():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 32, 32, 32)
    y, m = cutout(x, 0.3, 0.05, 0.25, "both")
    assert torch.equal(y[~m.expand_as(y)], x[~m.expand_as(x)])  # only boxes change
    assert 0 < m.float().mean() <= 0.6 + 0.25**3  # two rounds of at most 30% (+ the last box)
    y1, m1 = cutout(x, 0.3, fill="swap")
    assert m1.any()
    ctx = ForwardContext(rand_batch(3), None)
    shared_view(ctx, "rot_cutout", CorruptionSpec.from_view_name("rot_cutout"))
    with pytest.raises(ValueError, match="disagree on max_fraction"):
        shared_view(ctx, "rot_cutout", CorruptionSpec.from_view_name("rot_cutout", max_fraction=0.1),
                    check=("max_fraction",))


def test_simmim_mask_and_mask_token():
    torch.manual_seed(0)
    enc = tiny_swin(3)
    obj = SimMIM(enc, mask_ratio=0.6, mask_patch_size=8)
    x = torch.rand(2, 1, 32, 32, 32)
    mask = obj.make_mask(x)
    assert mask.shape == (2, 4, 4, 4) and mask.sum(1).sum((1, 2)).tolist() == [38, 38]  # round(0.6 * 64)
    out = obj({"view1": x}, enc)
    out.loss.backward()
    assert obj.mask_token.grad is not None and obj.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.decoder.parameters())


def test_vit_token_hooks():
    torch.manual_seed(0)
    enc = tiny_vit(3).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    a = enc(x)
    tokens = enc.embed(x)
    assert [f.shape for f in a] == [(2, 48, 4, 4, 4)] * 2
    assert torch.allclose(a[-1], enc.forward_tokens(tokens)[-1])
    flat = tokens.flatten(2).transpose(1, 2)
    pos = torch.arange(64).expand(2, -1)
    vis = enc.forward_visible(flat, pos, (4, 4, 4))
    assert torch.allclose(vis, a[-1].flatten(2).transpose(1, 2), atol=1e-5)
    pe = sincos_pos_embed((2, 3), 8)
    assert pe.shape == (6, 8) and torch.allclose(pe[4, [0, 2]], torch.tensor([math.sin(1.0), math.cos(1.0)]))


def test_registry_options_checked():
    enc = tiny_swin(2)
    with pytest.raises(ConfigError, match="temprature.*did you mean 'temperature'"):
        build_objective({"name": "simclr", "temprature": 0.1}, enc)
    with pytest.raises(ConfigError, match="forward_visible"):
        build_objective({"name": "mae"}, enc)


# ------------------------------------------------------------------------------------------ composite


def test_swin_unetr_composite_encodes_each_view_once():
    torch.manual_seed(0)
    enc = tiny_swin(3)
    specs = [{"name": "rotation", "view": "rot_cutout"},
             {"name": "simclr", "view": "rot_cutout", "hidden_dim": 32, "out_dim": 16},
             {"name": "inpainting", "view": "rot_cutout"}]
    comp = Composite.from_specs(specs, enc)
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    h = enc.swinViT.patch_embed.register_forward_hook(count)
    out = comp(rand_batch(3), enc)
    h.remove()
    assert comp.last_encoder_calls == 2 and calls == 2
    assert set(out.logs) >= {"loss/rotation", "loss/simclr", "loss/inpainting"}
    assert out.embeddings.shape == (2, enc.out_channels)
    out.loss.backward()
    for obj in comp.objectives:
        assert all(p.grad is not None for p in obj.parameters()), obj.name
    assert all(p.grad is not None for n, p in enc.named_parameters() if "layers4" in n)


# ------------------------------------------------------------------------------------------ training on a real scan


@pytest.fixture(scope="module")
def scan() -> torch.Tensor:
    if not CH2.is_file():
        pytest.skip(f"{CH2} not installed")
    import nibabel as nib

    v = torch.from_numpy(nib.load(str(CH2)).get_fdata().astype("float32"))
    return (v - v.min()) / (v.max() - v.min())


def crops(scan: torch.Tensor, dims: int, n: int, size: int) -> torch.Tensor:
    """n random crops (n, 1, *size^dims) from the brain's central region (torch global RNG)."""
    out = []
    lo = [int(0.3 * s) for s in scan.shape]
    hi = [int(0.7 * s) - size for s in scan.shape]
    for _ in range(n):
        st = [int(torch.randint(a, max(a + 1, b), (1,))) for a, b in zip(lo, hi)]
        c = scan[st[0]:st[0] + size, st[1]:st[1] + size, st[2]:st[2] + size]
        out.append(c[size // 2] if dims == 2 else c)  # 2D: an axial slice of the cube
    return torch.stack(out).unsqueeze(1)


def augment(x: torch.Tensor) -> torch.Tensor:
    """A light SSL view: random flip, intensity scale/shift, noise."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    return x * (1 + 0.1 * torch.randn(shape)) + 0.1 * torch.randn(shape) + 0.02 * torch.randn_like(x)


TRAIN = [  # name, encoder, options, AdamW lr
    ("simclr", "swin", {"hidden_dim": 64, "out_dim": 32, "temperature": 0.2, "head_norm": "batch"}, 3e-4),
    ("rotation", "swin", {}, 1e-3),
    ("inpainting", "swin", {}, 1e-3),
    ("simmim", "swin", {"mask_patch_size": 8, "stage": -2}, 1e-3),
    ("mae", "vit", {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}, 1e-3),
    ("emix", "vit", {"hidden_dim": 64, "out_dim": 32}, 3e-4),  # 1e-3 collapses the tiny ViT (loss log B)
    ("shed", "vit", {}, 1e-3),
]


def train_losses(scan, dims, name, kind, opts, lr, steps=30) -> list[float]:
    """Plain AdamW loop over a fixed pool of 2 batches of 4 real crops; the RNG is re-seeded per pool item, so
    each item keeps its views and corruptions (rotation labels, boxes, masks, lambda): the objective must fit
    a small fixed set, a check that is not at the mercy of sampling noise in 30 steps."""
    torch.manual_seed(0)
    size = 32 if dims == 2 else 16  # 2D 32^2 slices, 3D 16^3 cubes: a few seconds on 2 CPU cores
    enc = tiny_swin(dims) if kind == "swin" else tiny_vit(dims)
    obj = build_objective({"name": name, **opts}, enc)
    params = list(enc.parameters()) + list(obj.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pool = [crops(scan, dims, 4, size) for _ in range(2)]
    losses = []
    for step in range(steps):
        torch.manual_seed(1000 + step % len(pool))
        img = pool[step % len(pool)]
        batch = {"image": img, "view1": augment(img), "view2": augment(img), "index": torch.arange(4)}
        out = obj(batch, enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses




@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name,kind,opts,lr", TRAIN, ids=[t[0] for t in TRAIN])
def test_training_lowers_loss_on_real_scan(scan, dims, name, kind, opts, lr):
    losses = train_losses(scan, dims, name, kind, opts, lr)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, f"{name} {dims}D: first {first:.4f} last {last:.4f}: {losses}"
