"""QT-UNet / QT-UNet-2D (issue 3): sizes, MACs, window attention vs an explicit-softmax reference, shapes,
cross-attention, the Encoder contract, checkpointing.

Heavy checks (4×128³) run on the meta device: shapes and FLOP counts without memory or compute.
Real tensors use a narrow model (embed_dim 12) on small crops.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sslkit.errors import ConfigError
from sslkit.models.qt_unet import QTDecoderBlock, QTUNet, QTUNetEncoder
from sslkit.models.registry import build_encoder, build_segmenter
from sslkit.models.window_attention import (WindowAttention, relative_position_index, shift_mask,
                                            shifted_window_attention, window_partition, window_reverse)

VARIANTS = ("tiny", "small", "base")
# SPECS.md: parameters with 4 input channels and 3 classes (authors' code).
SPEC_PARAMS_M = {False: (6.65, 14.51, 25.51), True: (5.87, 12.76, 22.41)}
# Our FlopCounterMode multiply-adds (G) at 1×4×128³, pinned; thesis Table 4.1 / 4.10 (fvcore) beside them.
OUR_GMACS = {False: (31.82, 60.34, 97.26), True: (46.97, 90.13, 146.40)}
THESIS_GMACS = {False: (32.5, 61.3, 98.5), True: (47.7, 91.2, 147.8)}


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _small(spatial_dims=3, **kw) -> QTUNet:
    """Narrow model for real-tensor tests (C = 12, heads 3/6/12/24 still divide)."""
    torch.manual_seed(0)
    kw.setdefault("in_channels", 2)
    kw.setdefault("out_channels", 3)
    return QTUNet(spatial_dims=spatial_dims, embed_dim=12, **kw)


# ------------------------------------------------------------------------------------------ sizes and MACs


@pytest.mark.parametrize("ablation", [False, True])
def test_param_counts_match_spec(ablation):
    counts = []
    with torch.device("meta"):
        for v, spec in zip(VARIANTS, SPEC_PARAMS_M[ablation]):
            n = _n_params(build_segmenter("qt_unet", variant=v, spatial_dims=3, in_channels=4, out_channels=3,
                                          ablation_a=ablation)) / 1e6
            counts.append(n)
            print(f"QT-UNet{'-A' if ablation else ''}-{v[0].upper()}: {n:.3f} M (spec {spec} M)")
            assert abs(n - spec) / spec < 0.01
    assert counts[0] < counts[1] < counts[2]


def test_param_counts_2d():
    """QT-UNet-2D has no depth; "-A" in 2D removes cross-attention (thesis Table 4.6: 5.4/12.2/21.6, -A 5.0/11.3/20.1
    with 3 input channels and 20 classes)."""
    thesis = {False: (5.4, 12.2, 21.6), True: (5.0, 11.3, 20.1)}
    with torch.device("meta"):
        for ablation in (False, True):
            for v, ref in zip(VARIANTS, thesis[ablation]):
                n = _n_params(build_segmenter("qt_unet", variant=v, spatial_dims=2, in_channels=3, out_channels=20,
                                              ablation_a=ablation)) / 1e6
                print(f"QT-UNet-2D{'-A' if ablation else ''}-{v[0].upper()}: {n:.3f} M (thesis {ref} M)")
                assert abs(n - ref) < 0.06


def _gmacs(model: torch.nn.Module, shape) -> tuple[float, dict, float]:
    """(G MACs by FlopCounterMode, per-op G MACs, G 'flops' fvcore adds for LayerNorm: 5 per input element)."""
    x = torch.empty(*shape, device="meta")
    ln = [0]
    hooks = [m.register_forward_hook(lambda mod, inp, out: ln.__setitem__(0, ln[0] + 5 * inp[0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    per_op = {str(k): v / 2e9 for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 2e9, per_op, ln[0] / 1e9  # 2 FLOPs per multiply-add


def test_macs_at_128_cubed():
    """MACs at 1×4×128³ counted on the meta device (SDPA dispatches to its math path there, so the q·kᵀ and
    attn·v products are counted as bmm). Pinned to our own figures; thesis (fvcore) figures printed beside them.

    Our count is 0.9 - 2.1 % below the thesis; the gap is fvcore's LayerNorm count (5 per element, mostly the
    final LayerNorm at full resolution): adding it reproduces Table 4.1 / 4.10 to within 0.2 %."""
    macs = {}
    with torch.device("meta"):
        for ablation in (False, True):
            for i, v in enumerate(VARIANTS):
                m = build_segmenter("qt_unet", variant=v, spatial_dims=3, in_channels=4, out_channels=3,
                                    ablation_a=ablation)
                g, per_op, ln = _gmacs(m, (1, 4, 128, 128, 128))
                macs[ablation, v] = g
                ref = THESIS_GMACS[ablation][i]
                print(f"QT-UNet{'-A' if ablation else ''}-{v[0].upper()}: {g:.2f} G MACs; thesis {ref} G "
                      f"(gap {100 * (g - ref) / ref:+.1f} %; + fvcore LayerNorm {ln:.2f} G = {g + ln:.2f} G); "
                      f"by op {({k: round(c, 2) for k, c in per_op.items()})}")
                assert abs(g + ln - ref) / ref < 0.003
                assert per_op.get("aten.bmm", 0) > 0 or any("scaled_dot_product" in k for k in per_op), \
                    "attention products were not counted"
                assert abs(g - OUR_GMACS[ablation][i]) / OUR_GMACS[ablation][i] < 0.02
                assert abs(g - ref) / ref < 0.05
    for ablation in (False, True):
        assert macs[ablation, "tiny"] < macs[ablation, "small"] < macs[ablation, "base"]
    # depth-wise merging is what saves compute: the "-A" (H/W only) variant costs ~1.5× (thesis: 32 - 34 % less)
    for v in VARIANTS:
        saving = 1 - macs[False, v] / macs[True, v]
        assert 0.28 < saving < 0.38, saving


# ------------------------------------------------------------------------------- window attention vs reference


def _reference_window_attention(attn: WindowAttention, x, window, shift, context=None):
    """Explicit softmax(q kᵀ·scale + bias + mask) v over the whole (padded, rolled) map, written without window
    partitioning: a pair (i, j) may attend iff both tokens fall in the same window and the same shift region.
    Returns (output (B, *S, C), allowed (L, L), weights (B, h, L, L))."""
    b, *spatial, c = x.shape
    nd = len(spatial)
    win = [min(s, w) for s, w in zip(spatial, window)]
    sh = [0 if s <= w else k for s, w, k in zip(spatial, window, shift)]
    padded = [math.ceil(s / w) * w for s, w in zip(spatial, win)]

    def prep(t):
        full = t.new_zeros(b, *padded, c)
        full[(slice(None), *[slice(0, s) for s in spatial])] = t
        return torch.roll(full, [-k for k in sh], list(range(1, nd + 1))).reshape(b, -1, c)  # (B, L, C)

    coords = torch.tensor(list(itertools.product(*[range(p) for p in padded])))  # (L, nd)
    wid = coords // torch.tensor(win)
    region = torch.stack([torch.where(coords[:, a] < padded[a] - win[a], 0,
                                      torch.where(coords[:, a] < padded[a] - sh[a], 1, 2)) if sh[a] else
                          torch.zeros_like(coords[:, a]) for a in range(nd)], 1)
    allowed = ((wid[:, None] == wid[None]).all(-1) & (region[:, None] == region[None]).all(-1))  # (L, L)
    rel = coords[:, None] - coords[None]  # (L, L, nd)
    tw = attn.window_size
    idx = torch.zeros(rel.shape[:2], dtype=torch.long)
    for a in range(nd):
        idx = idx * (2 * tw[a] - 1) + (rel[..., a] + tw[a] - 1).clamp(0, 2 * tw[a] - 2)
    bias = attn.relative_position_bias_table[idx].permute(2, 0, 1)  # (h, L, L)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))

    xs = prep(x)
    h, d = attn.num_heads, attn.head_dim
    if attn.cross:
        cs = prep(context)
        q = attn.q(xs).view(b, -1, h, d).transpose(1, 2)
        k, v = attn.kv(cs).view(b, -1, 2, h, d).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = attn.qkv(xs).view(b, -1, 3, h, d).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + bias + mask, dim=-1)  # (B, h, L, L)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(b, -1, c)).view(b, *padded, c)
    out = torch.roll(out, sh, list(range(1, nd + 1)))
    return out[(slice(None), *[slice(0, s) for s in spatial])], allowed, weights


@pytest.mark.parametrize("spatial,window,shift,cross", [
    ((10, 9, 3), (4, 4, 4), (2, 2, 2), False),   # padding, a clipped axis (3 <= 4: window 3, shift 0)
    ((8, 8, 8), (4, 4, 4), (2, 2, 2), True),     # cross attention with shift mask
    ((8, 8, 8), (4, 4, 4), (0, 0, 0), False),    # plain W-MSA
    ((11, 13), (5, 5), (2, 2), True),            # 2D
])
def test_sdpa_matches_explicit_softmax(spatial, window, shift, cross):
    torch.manual_seed(0)
    attn = WindowAttention(24, 3, window, cross=cross).double()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)  # a bias that matters
    x = torch.randn(2, *spatial, 24, dtype=torch.float64)
    ctx = torch.randn(2, *spatial, 24, dtype=torch.float64) if cross else None
    ours = shifted_window_attention(attn, x, window, shift, context=ctx)
    ref, allowed, weights = _reference_window_attention(attn, x, window, shift, ctx)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # float32 through SDPA as used in training
    attn32 = attn.float()
    ours32 = shifted_window_attention(attn32, x.float(), window, shift, None if ctx is None else ctx.float())
    torch.testing.assert_close(ours32, ref.float(), atol=1e-5, rtol=1e-4)
    # no token attends to another region or window: those weights are exactly zero, rows sum to one
    assert (weights[..., ~allowed] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    if any(shift):
        assert (~allowed).any()


def test_shift_mask_separates_regions():
    """The mask is -inf exactly between tokens of different shift regions inside a window."""
    spatial, window, shift = (8, 8), (4, 4), (2, 2)
    mask = shift_mask(spatial, window, shift)  # (nW, N, N)
    coords = torch.tensor(list(itertools.product(range(8), range(8)))).view(1, 8, 8, 2)
    region = torch.where(coords < 4, 0, torch.where(coords < 6, 1, 2))
    lab = window_partition((region[..., :1] * 3 + region[..., 1:]).float(), window).squeeze(-1)  # (nW, N)
    differ = lab[:, :, None] != lab[:, None, :]
    assert torch.isinf(mask[differ]).all() and (mask[~differ] == 0).all()
    assert differ[-1].any() and not differ[0].any()  # the last window mixes regions, the first does not
    assert shift_mask(spatial, window, (0, 0)) is None


def test_window_partition_roundtrip_and_bias_index():
    x = torch.randn(2, 6, 8, 4, 5)
    w = window_partition(x, (3, 4, 2))
    assert w.shape == (2 * 2 * 2 * 2, 24, 5)
    torch.testing.assert_close(window_reverse(w, (3, 4, 2), (6, 8, 4)), x)
    # clipped window indexes the centre of the larger table: offset 0 -> (2*7-1)^2 // 2
    idx = relative_position_index((3, 3), (7, 7))
    assert idx.shape == (9, 9) and (idx.diagonal() == 13 * 13 // 2).all()
    assert idx.max() < 13 * 13


# -------------------------------------------------------------------------------------------------- shapes


def test_output_shape_3d_128_meta():
    with torch.device("meta"):
        m = build_segmenter("qt_unet", variant="tiny", spatial_dims=3, in_channels=4, out_channels=3)
        for shape in [(1, 4, 128, 128, 128), (1, 4, 96, 96, 96), (1, 4, 80, 96, 112)]:
            y = m(torch.empty(*shape))
            assert y.shape == (1, 3, *shape[2:])
        feats = m.encoder(torch.empty(1, 4, 128, 128, 128))
        assert [tuple(f.shape) for f in feats] == [(1, 48 * 2 ** i, *(32 // 2 ** i,) * 3) for i in range(4)]


@pytest.mark.parametrize("spatial_dims,shape,kw", [
    (3, (1, 2, 20, 24, 36), {}),                        # not multiples of 32: padded and cropped
    (3, (1, 2, 6, 40, 36), {"merge_depth": False}),     # "-A": depth stride 4 only
    (2, (2, 2, 50, 70), {}),
    (2, (1, 2, 33, 31), {"cross_attention": False}),
])
def test_output_shapes_real(spatial_dims, shape, kw):
    m = _small(spatial_dims, **kw).eval()
    with torch.no_grad():
        y = m(torch.randn(*shape))
    assert y.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------- cross attention


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cross_attention_uses_encoder_tensor(spatial_dims):
    torch.manual_seed(0)
    s = (9,) * spatial_dims
    x, ctx = torch.randn(1, *s, 24), torch.randn(1, *s, 24)
    other = ctx + torch.randn_like(ctx)
    for shift in (0, 3):
        blk = QTDecoderBlock(24, 3, (7,) * spatial_dims, (shift,) * spatial_dims).eval()
        assert not torch.allclose(blk(x, ctx), blk(x, other), atol=1e-4)
        off = QTDecoderBlock(24, 3, (7,) * spatial_dims, (shift,) * spatial_dims, cross_attention=False).eval()
        torch.testing.assert_close(off(x, ctx), off(x, other), atol=0, rtol=0)


def test_ablation_flag_meaning():
    with torch.device("meta"):
        m2 = build_segmenter("qt_unet", spatial_dims=2, ablation_a=True)
        m3 = build_segmenter("qt_unet", spatial_dims=3, ablation_a=True)
        m3x = build_segmenter("qt_unet", spatial_dims=3, cross_attention=False)
    blocks = lambda m: [b for st in m.decoder.stages for b in st.blocks]  # noqa: E731
    assert all(b.cross_attn is None for b in blocks(m2))
    assert all(b.cross_attn is not None for b in blocks(m3)) and m3.encoder.merge_factors == (1, 2, 2)
    assert all(b.cross_attn is None for b in blocks(m3x))
    # cross-attention relative bias starts at zero
    assert all((b.cross_attn.relative_position_bias_table == 0).all() for b in blocks(_small(2)))
    with pytest.raises(ConfigError):
        build_segmenter("qt_unet", variant="huge")


def test_decoder_queries_same_stage_encoder_tensor():
    """Perturb only what the cross-attention sees (the skip stays the same): the model output changes."""
    m = _small(3).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        bott, skips, _ = m.encoder.encode(m.encoder.embed(x))
        base = m.decoder(bott, skips)
        stage = m.decoder.stages[-1]  # C at stride 4; context of its blocks = skips[0]
        orig = stage._blocks

        def perturbed(h, skip):
            h = stage.concat_linear(torch.cat([h, skip], -1))
            for blk in stage.blocks:
                h = blk(h, skip + 1.0)
            return h
        stage._blocks = perturbed
        changed = m.decoder(bott, skips)
        stage._blocks = orig
    assert not torch.allclose(base, changed, atol=1e-4)


# ---------------------------------------------------------------------------------------- encoder contract


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encoder_contract_and_weight_transfer(spatial_dims):
    seg = _small(spatial_dims).eval()
    enc = QTUNetEncoder(spatial_dims, in_channels=2, embed_dim=12).eval()
    assert list(seg.encoder.state_dict()) == list(enc.state_dict())
    enc.load_state_dict(seg.encoder.state_dict(), strict=True)
    x = torch.randn(1, 2, *(24,) * spatial_dims)
    with torch.no_grad():
        feats = enc(x)
        tok = enc.forward_tokens(enc.embed(x))
        feats_seg = seg.encoder(x)
    assert enc.feature_channels == [12, 24, 48, 96] and enc.patch_size == 4 and enc.embed_dim == 12
    assert [f.shape[1] for f in feats] == enc.feature_channels
    assert enc.embed(x).shape == (1, 12, *(8,) * spatial_dims)  # 24 padded to 32, /4
    for a, b, c in zip(feats, tok, feats_seg):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_registered_encoder_keys_match_segmenter():
    with torch.device("meta"):
        for ablation in (False, True):
            enc = build_encoder("qt_unet", variant="small", spatial_dims=3, in_channels=4, ablation_a=ablation)
            seg = build_segmenter("qt_unet", variant="small", spatial_dims=3, in_channels=4, out_channels=3,
                                  ablation_a=ablation)
            assert {k: v.shape for k, v in enc.state_dict().items()} == \
                   {k: v.shape for k, v in seg.encoder.state_dict().items()}


# ------------------------------------------------------------------------------------ checkpoint, drop path


def test_checkpointing_gives_same_gradients():
    x = torch.randn(1, 2, 32, 32)
    grads = []
    for ckpt in (False, True):
        m = _small(2, use_checkpoint=ckpt)
        m(x).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_drop_path_is_stochastic_in_training_only():
    m = _small(2, drop_path_rate=0.5)
    x = torch.randn(1, 2, 32, 32)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
