"""PUNet, CPA and prompt segmentation (issue 7): shapes, prompt routing, attention vs an explicit-softmax reference,
the CPA loss vs a hand-written reference, soft k-means, coordinate pairing, CPA on a real scan, prompt tuning
parameters. Real tensors use a narrow PUNet (channels 8..16, 2 heads) on small crops, one thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkit.errors import ConfigError
from sslkit.models.punet import (PUNetSegmenter, PromptWindowAttention, prompt_parameters,
                                 similarity_aggregation)
from sslkit.models.registry import build_encoder, build_segmenter
from sslkit.objectives import build_objective
from sslkit.objectives.cpa import (CPA, cpa_cross_entropy, crop_resample, grid_coords, pair_nearest, soft_kmeans,
                                   spatial_weight)
from sslkit.objectives.prompt_segmentation import focal_loss

TINY = dict(channels=(8, 8, 16, 16, 16), num_heads=2)
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes small ops 10x slower
    yield
    torch.set_num_threads(n)


def _tiny_seg(spatial_dims=3, out_channels=3, num_classes=4, **kw) -> PUNetSegmenter:
    torch.manual_seed(0)
    return build_segmenter("punet", spatial_dims=spatial_dims, out_channels=out_channels, num_classes=num_classes,
                           **TINY, **kw)


def _n(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ shapes and sizes


def test_default_sizes_and_feature_channels():
    with torch.device("meta"):
        for sd in (2, 3):
            enc = build_encoder("punet", spatial_dims=sd)
            assert enc.feature_channels == [32, 64, 128, 256, 384]
            assert enc.window_size == ((8, 8) if sd == 2 else (4, 4, 4))
            layers = enc.prompt_attention_layers()
            assert len(layers) == 18  # 9 stages x (W, SW)
            assert all(len(a.prompts) == 10 and a.prompts[0].shape == (16, a.dim) for a in layers)
            assert all(a.prompt_bias[0].shape == (16, 32) for a in layers)
            assert all(a.qkv.bias is None and a.num_heads == 8 for a in layers)
            print(f"PUNet {sd}D: {_n(enc) / 1e6:.3f} M, non-prompted "
                  f"{_n(build_encoder('punet', spatial_dims=sd, prompted=False)) / 1e6:.3f} M")


@pytest.mark.parametrize("spatial_dims,size", [(2, (40, 48)), (3, (32, 32, 16))])
def test_shapes(spatial_dims, size):
    model = _tiny_seg(spatial_dims).eval()
    x = torch.randn(2, 1, *size)
    out = model.encoder.run(x, [0, 1, 2])
    stem = (size[0] // 2, size[1] // 2) + ((size[2],) if spatial_dims == 3 else ())
    shapes = [tuple(s.shape) for s in out["stages"]]
    expect = [stem]
    for _ in range(4):
        expect.append(tuple(math.ceil(s / 2) for s in expect[-1]))
    assert shapes == [(2, c, *e) for c, e in zip(TINY["channels"], expect)]
    assert out["dense"].shape == (2, 8, *stem)
    assert out["scores"].shape == (2, 3, *size)
    assert model(x).shape == (2, 3, *size)
    assert [tuple(s.shape) for s in model.encoder(x)] == shapes  # Encoder contract
    # non-prompted variant: logits of a 1x1 conv head
    plain = build_segmenter("punet", spatial_dims=spatial_dims, out_channels=3, num_classes=4, prompted=False,
                            **TINY).eval()
    assert plain(x).shape == (2, 3, *size)
    assert not any(isinstance(m, PromptWindowAttention) and m.prompted for m in plain.modules())


# ------------------------------------------------------------------------------------------ attention


def _reference_attention(attn: PromptWindowAttention, norm, x, window, mask, classes):
    """Explicit softmax: prompts of the active classes prepended to each window, heterogeneous bias by loops."""
    b_, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    b = classes.shape[0]
    nw = b_ // b
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1).T  # (N, n)
    emb = torch.zeros(n, n, attn.bias_proj.in_features)
    for i in range(n):
        for j in range(n):
            e = [attn.axis_tables[a][coords[i, a] - coords[j, a] + attn.window_size[a] - 1] for a in range(len(window))]
            emb[i, j] = torch.stack(e).mean(0)
    cc_bias = attn.bias_proj(emb).permute(2, 0, 1)  # (h, N, N)
    out = torch.empty_like(x)
    for bi in range(b):
        active = [int(k) for k in classes[bi] if k >= 0]
        p_tok = torch.cat([attn.prompts[k] for k in active]) if active else torch.zeros(0, c)
        p_bias = attn.bias_proj(torch.cat([attn.prompt_bias[k] for k in active])).T if active else torch.zeros(h, 0)
        for w in range(nw):
            xw = x[bi * nw + w]  # (N, C)
            tokens = torch.cat([norm(p_tok), xw])  # (P + N, C)
            q = F.linear(xw, attn.qkv.weight[:c]).view(n, h, d).transpose(0, 1)
            k, v = F.linear(tokens, attn.qkv.weight[c:]).view(-1, 2, h, d).permute(1, 2, 0, 3)
            logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (h, N, P + N)
            bias = torch.cat([p_bias[:, None, :].expand(h, n, -1), cc_bias], dim=-1)
            if mask is not None:
                bias = bias + torch.cat([torch.zeros(n, len(p_tok)), mask[w]], dim=-1)
            o = torch.softmax(logits + bias, dim=-1) @ v  # (h, N, d)
            out[bi * nw + w] = attn.proj(o.transpose(0, 1).reshape(n, c))
    return out


@pytest.mark.parametrize("shifted", [False, True])
def test_prompt_attention_matches_explicit_softmax(shifted):
    from sslkit.models.window_attention import shift_mask

    torch.manual_seed(0)
    window = (4, 4)
    attn = PromptWindowAttention(8, 2, window, num_classes=3, prompt_tokens=2, bias_dim=4)
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(attn.bias_proj.weight)
    for t in list(attn.axis_tables) + list(attn.prompt_bias):
        torch.nn.init.normal_(t)
    classes = torch.tensor([[0, 2], [1, -1]])
    x = torch.randn(2 * 4, 16, 8)  # B = 2, 4 windows of an 8x8 map
    mask = shift_mask((8, 8), window, (2, 2)) if shifted else None
    got = attn(x, window, mask, attn.prompt_state(norm, classes))
    ref = _reference_attention(attn, norm, x, window, mask, classes)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_tokens_route_to_their_class():
    model = _tiny_seg(2).eval()
    net = model.encoder
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        base = net.segment(x, [0, 1, 2])
        # changing class 1's deep prompt tokens (one stage) changes the output of class 1
        p = net.encoder_stages[2].block.sw_msa.attn.prompts[1]
        p.add_(torch.randn_like(p))  # (a constant shift would vanish in the shared LayerNorm)
        changed = net.segment(x, [0, 1, 2])
        assert (changed[:, 1] - base[:, 1]).abs().max() > 1e-4
        # class 3's prompts are not active: changing them changes nothing
        for a in net.prompt_attention_layers():
            a.prompts[3].add_(torch.randn_like(a.prompts[3]))
            a.prompt_bias[3].add_(1.0)
        net.seg_prompts[3].add_(torch.randn_like(net.seg_prompts[3]))
        torch.testing.assert_close(net.segment(x, [0, 1, 2]), changed, atol=0, rtol=0)
        # the segmentation prompt of class 2 moves class 2's score only (the head is per class)
        net.seg_prompts[2].add_(torch.randn_like(net.seg_prompts[2]))
        head_changed = net.segment(x, [0, 1, 2])
        torch.testing.assert_close(head_changed[:, :2], changed[:, :2])
        assert (head_changed[:, 2] - changed[:, 2]).abs().max() > 1e-4
        # removing class 2's prompt tokens from the attention changes class 1's output
        assert (net.segment(x, [0, 1])[:, 1] - head_changed[:, 1]).abs().max() > 1e-4


def test_per_sample_classes_and_padding():
    net = _tiny_seg(3).encoder.eval()
    x = torch.randn(2, 1, 16, 16, 8)
    with torch.no_grad():
        mixed = net.segment(x, torch.tensor([[0, 1, -1], [0, 2, 3]]))
        a = net.segment(x[:1], [0, 1])
        b = net.segment(x[1:], [0, 2, 3])
    torch.testing.assert_close(mixed[:1, :2], a, atol=1e-5, rtol=1e-5)
    assert torch.isinf(mixed[0, 2]).all() and (mixed[0, 2] < 0).all()
    torch.testing.assert_close(mixed[1:], b, atol=1e-5, rtol=1e-5)


def test_similarity_aggregation_formula():
    torch.manual_seed(0)
    f, p = torch.randn(2, 5, 6), torch.randn(2, 3, 4, 6)
    got = similarity_aggregation(f, p, 0.1)
    for b in range(2):
        for i in range(3):
            for m in range(5):
                s = (F.cosine_similarity(f[b, m][None], p[b, i], dim=-1) + 1) / 2  # (T,)
                w = torch.softmax(s / 0.1, dim=0)
                assert torch.allclose(got[b, i, m], (w * s).sum(), atol=1e-6)
    assert ((got >= 0) & (got <= 1)).all()
    # the weights are stop-gradient: the gradient w.r.t. f is that of sum w * s with w constant
    f.requires_grad_(True)
    similarity_aggregation(f, p).sum().backward()
    s = (torch.einsum("bmd,bitd->bimt", F.normalize(f, dim=-1), F.normalize(p, dim=-1)) + 1) / 2
    f2 = f.detach().clone().requires_grad_(True)
    s2 = (torch.einsum("bmd,bitd->bimt", F.normalize(f2, dim=-1), F.normalize(p, dim=-1)) + 1) / 2
    (torch.softmax(s.detach() / 0.1, -1) * s2).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)


def test_prompt_tuning_touches_only_the_new_class():
    model = _tiny_seg(2, out_channels=3, num_classes=4).eval()  # eval: BatchNorm statistics stay frozen
    new = 2
    params = prompt_parameters(model, new)
    assert len(params) == 2 * 18 + 1  # tokens + bias table per sub-block, final pool
    assert sum(p.numel() for p in params) == (
        sum(16 * a.dim + 16 * 32 for a in model.encoder.prompt_attention_layers()) + 16 * 8)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ids = {id(p) for p in params}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    torch.manual_seed(1)
    x, label = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    for _ in range(3):
        loss = focal_loss(torch.log_softmax(model(x), 1), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    tuned = {names[i] for i in ids}
    after = model.state_dict()
    for k, v in before.items():
        if k in tuned:
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k  # bitwise


# ------------------------------------------------------------------------------------------ CPA pieces


def test_cpa_loss_matches_hand_reference():
    torch.manual_seed(0)
    b, m, k, d = 2, 5, 3, 4
    fs, ft, c = torch.randn(b, m, d), torch.randn(b, m, d), torch.randn(b, k, d)
    keep = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    total, count = 0.0, 0
    for bi in range(b):
        for i in range(m):
            if not keep[bi, i]:
                continue
            cos_t = [F.cosine_similarity(ft[bi, i], c[bi, j], dim=0) / 0.033 for j in range(k)]
            cos_s = [F.cosine_similarity(fs[bi, i], c[bi, j], dim=0) / 0.066 for j in range(k)]
            zt = sum(math.exp(v) for v in cos_t)
            zs = sum(math.exp(v) for v in cos_s)
            total += -sum(math.exp(cos_t[j]) / zt * math.log(math.exp(cos_s[j]) / zs) for j in range(k))
            count += 1
    got = cpa_cross_entropy(fs, ft, keep, c, 0.033, 0.066)
    assert abs(float(got) - total / count) < 1e-4


def test_soft_kmeans_recovers_separated_clusters():
    torch.manual_seed(0)
    d, k, per = 16, 4, 60
    centres = F.normalize(torch.randn(k, d), dim=-1)
    labels = torch.arange(k).repeat_interleave(per)
    feats = centres[labels] + 0.15 * torch.randn(k * per, d)
    coords = torch.rand(k * per, 3) * 32  # all within one FWHM: the spatial weight barely matters
    perm = torch.randperm(k * per)
    feats, labels, coords = feats[perm][None], labels[perm], coords[perm][None]
    # seeds: a noisy point of each cluster, badly placed
    seeds = torch.stack([feats[0, (labels == j).nonzero()[0, 0]] for j in range(k)])[None] + 0.3 * torch.randn(1, k, d)
    protos, xc = soft_kmeans(feats, coords, seeds, torch.zeros(1, k, 3), iters=3)
    sim = protos[0] @ centres.T  # (K, K)
    assert (sim.argmax(1) == torch.arange(k)).all()
    assert sim.diagonal().min() > 0.98
    assign = (F.normalize(feats[0], dim=-1) @ protos[0].T).argmax(1)
    assert (assign == labels).float().mean() == 1.0
    assert xc.shape == (1, k, 3)


def test_spatial_weight_fwhm_and_z_scale():
    c = torch.zeros(1, 1, 3)
    pts = torch.tensor([[[64.0, 0, 0], [0, 64.0, 0], [0, 0, 32.0], [0, 0, 0]]])
    w = spatial_weight(pts, c, fwhm=128.0, z_scale=2.0)[0, :, 0]
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.5, 1.0]))  # half maximum at FWHM / 2; z counts twice


def test_grid_coords_follow_the_resampled_views():
    """A view made by crop_resample of a coordinate ramp holds, at each position, the coordinate grid_coords gives."""
    spatial = (40, 36, 20)
    ramps = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij"))
    image = ramps[None].expand(2, -1, -1, -1, -1)  # (B, 3, *S): channel a = coordinate along axis a
    start = torch.tensor([[3, 5, 2], [10, 0, 4]])
    length = torch.tensor([[30, 24, 16], [24, 36, 12]])
    for size in [(15, 12, 8), (20, 18, 6)]:  # downsampled views: linear interpolation of a ramp is exact
        view = crop_resample(image, start, length, size)
        coords = grid_coords(start, length, size)  # (B, M, 3)
        torch.testing.assert_close(view.flatten(2).transpose(1, 2), coords, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_pairing_matches_brute_force_under_crops_and_scales(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 2, 3
    t_start = torch.randint(0, 10, (b, n), generator=g)
    t_len = torch.randint(20, 40, (b, n), generator=g)
    t_size = (int(torch.randint(8, 20, (), generator=g)), int(torch.randint(8, 20, (), generator=g)), 10)
    s_start = t_start + torch.randint(-6, 8, (b, n), generator=g)  # partly outside the teacher crop
    s_len = torch.randint(8, 24, (b, n), generator=g)
    s_size = (7, 9, 5)
    cs = grid_coords(s_start, s_len, s_size)
    ct = grid_coords(t_start, t_len, t_size)
    idx, keep = pair_nearest(cs, t_start, t_len, t_size, max_dist=4.0)
    dist = torch.cdist(cs.double(), ct.double())  # (B, Ms, Mt)
    best = dist.min(-1)
    torch.testing.assert_close(dist.gather(-1, idx[..., None])[..., 0], best.values)  # a nearest point
    assert torch.equal(keep, best.values <= 4.0)
    assert keep.any() and not keep.all()


# ------------------------------------------------------------------------------------------ objectives


def _ch2() -> torch.Tensor:
    nib = pytest.importorskip("nibabel")
    if not CH2.is_file():
        pytest.skip(f"{CH2} not installed")
    vol = np.asarray(nib.load(str(CH2)).dataobj, dtype=np.float32)
    fg = vol[vol > vol.mean()]
    return torch.from_numpy((vol - fg.mean()) / fg.std())


def test_cpa_views_pairs_and_teacher():
    torch.manual_seed(0)
    enc = build_encoder("punet", spatial_dims=3, num_classes=1, **TINY)
    obj = build_objective({"name": "cpa", "seed": 1}, enc)
    assert isinstance(obj, CPA) and obj.teachers()["teacher"].tau_base == 0.99
    image = torch.randn(2, 1, 32, 32, 16)
    views = obj.make_views(image)
    assert views["teacher"]["input"].shape == (2, 1, 32, 32, 16)
    for s in ("student1", "student2"):
        assert views[s]["input"].shape == (2, 1, 24, 24, 12)
        t0, t1 = views["teacher"]["start"], views["teacher"]["start"] + views["teacher"]["length"]
        assert ((views[s]["start"] >= t0) & (views[s]["start"] + views[s]["length"] <= t1)).all()
    out = obj({"image": image}, enc)
    assert out.loss.requires_grad and out.embeddings.shape == (2, 8)
    assert out.logs["cpa_pairs_kept"] > 0.9
    out.loss.backward()
    t = obj.teachers()["teacher"]["encoder"]
    before = [p.clone() for p in t.parameters()]
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    obj.on_optimizer_step(1, 10)
    for b0, p, s in zip(before, t.parameters(), enc.parameters()):
        torch.testing.assert_close(p, 0.99 * b0 + 0.01 * s)
    with pytest.raises(ConfigError, match="not an option"):
        build_objective({"name": "cpa", "temperature": 0.1}, enc)


def test_cpa_2d():
    enc = build_encoder("punet", spatial_dims=2, num_classes=2, **TINY)
    obj = build_objective({"name": "cpa", "classes": [0]}, enc)
    out = obj({"image": torch.randn(2, 1, 48, 48)}, enc)
    assert torch.isfinite(out.loss) and out.embeddings.shape == (2, 8)


def test_cpa_loss_falls_on_a_real_scan():
    vol = _ch2()  # (181, 217, 181) Colin27 T1
    torch.manual_seed(0)
    enc = build_encoder("punet", spatial_dims=3, num_classes=1, **TINY)
    obj = build_objective({"name": "cpa", "seed": 0}, enc)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, 31):
        crops = []
        for _ in range(2):  # 40x40x20 crops from the brain's middle
            s = [int(torch.randint(50, d - 90, (), generator=g)) for d in vol.shape]
            crops.append(vol[s[0]:s[0] + 40, s[1]:s[1] + 40, s[2]:s[2] + 20])
        out = obj({"image": torch.stack(crops)[:, None]}, enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.on_optimizer_step(step, 30)
        losses.append(float(out.loss.detach()))
    print("CPA losses:", np.round(losses, 3))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8])


def test_prompt_segmentation_objective():
    torch.manual_seed(0)
    enc = build_encoder("punet", spatial_dims=2, num_classes=4, **TINY)
    obj = build_objective({"name": "prompt_segmentation", "classes": [0, 1, 3], "unknown": "ignore"}, enc)
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ConfigError, match="'label'"):
        obj({"image": x}, enc)
    label = torch.randint(0, 4, (2, 1, 32, 32))  # class 2 is not known: ignored
    out = obj({"image": x, "label": label}, enc)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.embeddings.shape == (2, 8)
    # the loss is the focal loss on the known-class positions, by hand
    with torch.no_grad():
        scores = enc.segment(x, [0, 1, 3])
    logp = torch.log_softmax(scores, 1)
    pos = {0: 0, 1: 1, 3: 2}
    terms = [-(1 - logp[b, pos[int(label[b, 0, i, j])], i, j].exp()) ** 4 * logp[b, pos[int(label[b, 0, i, j])], i, j]
             for b in range(2) for i in range(32) for j in range(32) if int(label[b, 0, i, j]) != 2]
    assert abs(float(out.loss.detach()) - float(torch.stack(terms).mean())) < 1e-5
    # gamma 0 is plain NLL
    lp, t = torch.randn(2, 3, 4, 4).log_softmax(1), torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(focal_loss(lp, t, gamma=0.0), F.nll_loss(lp, t))
    with pytest.raises(ConfigError, match="PUNet"):
        build_objective({"name": "prompt_segmentation"}, build_encoder("swin_unetr", spatial_dims=2, feature_size=12))


def test_prompt_segmentation_unknown_classes_are_background():
    """unknown="background" (the default): a label class outside `classes` is scored as class 0; -100 is ignored."""
    torch.manual_seed(0)
    enc = build_encoder("punet", spatial_dims=2, num_classes=4, **TINY)
    obj = build_objective({"name": "prompt_segmentation", "classes": [1, 0, 3]}, enc)  # class 0 at position 1
    x = torch.randn(1, 1, 32, 32)
    label = torch.full((1, 1, 32, 32), 2)   # class 2 is not known
    label[..., :8, :] = 3
    label[..., 8:16, :] = 1
    label[..., 16:20, :] = -100
    assert obj.targets(torch.tensor([[3, 1, 2, 0, -100]])).tolist() == [[2, 0, 1, 1, -100]]
    out = obj({"image": x, "label": label}, enc)
    with torch.no_grad():
        logp = torch.log_softmax(enc.segment(x, [1, 0, 3]), 1)[0]  # (3, 32, 32)
    pos = {3: 2, 1: 0, 2: 1}  # unknown 2 -> the position of class 0
    terms = [-(1 - logp[pos[int(label[0, 0, i, j])], i, j].exp()) ** 4 * logp[pos[int(label[0, 0, i, j])], i, j]
             for i in range(32) for j in range(32) if int(label[0, 0, i, j]) != -100]
    assert len(terms) == 32 * 28
    assert abs(float(out.loss.detach()) - float(torch.stack(terms).mean())) < 1e-5
    with pytest.raises(ConfigError, match="class 0"):
        build_objective({"name": "prompt_segmentation", "classes": [1, 2]}, enc)
    with pytest.raises(ConfigError, match="background, ignore"):
        build_objective({"name": "prompt_segmentation", "unknown": "drop"}, enc)


@pytest.mark.parametrize("name", ["punet_cpa.yaml", "demo_punet_cpa.yaml"])
def test_recipes_load_and_build(name):
    from sslkit.config import load_config

    cfg = load_config(REPO / "pretrain_configs" / name)
    assert cfg.model.name == "punet"
    assert [o["name"] for o in cfg.objectives] == ["cpa"]
    if name.startswith("demo"):
        m = cfg.model
        enc = build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)
        build_objective(cfg.objectives[0], enc)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_encoder("punet", spatial_dims=2, num_classes=2, **TINY)
    b = build_encoder("punet", spatial_dims=2, num_classes=2, use_checkpoint=True, **TINY)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 32, 32)
    for m in (a, b):
        m.dense(x).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match="prompt pool"):
        build_segmenter("punet", spatial_dims=2, out_channels=5, num_classes=4, **TINY)
