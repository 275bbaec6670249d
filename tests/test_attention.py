"""Window attention through SDPA everywhere, FlexAttention as an option (issue 24): every path equals an explicit
softmax(q kᵀ·scale + bias + mask) v, forward and (where torch has a backward) gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_encoder
from sslkit.errors import ConfigError
from sslkit.models.registry import build_encoder
from sslkit.models.window_attention import attend_windows, bias_from_table, set_attention_backend, shift_mask

try:
    import torch.nn.attention.flex_attention  # noqa: F401
    HAS_FLEX = True
except ImportError:
    HAS_FLEX = False
needs_flex = pytest.mark.skipif(not HAS_FLEX, reason="this torch has no FlexAttention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def explicit(q, k, v, bias, mask, scale):
    """The textbook formula, windows batch-major: B_ = B · nW, window w = b % nW."""
    logits = q @ k.transpose(-2, -1) * scale + bias  # (B_, h, N, N)
    if mask is not None:
        nw = mask.shape[0]
        logits = logits + mask.repeat(q.shape[0] // nw, 1, 1).unsqueeze(1)
    return logits.softmax(-1) @ v


def _inputs(shifted: bool, requires_grad: bool = True):
    g = torch.Generator().manual_seed(0)
    mask = shift_mask((8, 8), (4, 4), (2, 2)) if shifted else None  # 4 windows of 16 tokens, 3 of them mixed
    b_, h, n, d = 8, 2, 16, 8
    q, k, v = (torch.randn(b_, h, n, d, generator=g, requires_grad=requires_grad) for _ in range(3))
    bias = torch.randn(h, n, n, generator=g, requires_grad=requires_grad)
    return q, k, v, bias, mask


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("bias_trained", [False, True])
def test_sdpa_equals_explicit_softmax_with_gradients(shifted, bias_trained):
    """A frozen bias goes through SDPA's fused CPU kernel; a trained one (its gradient needed) through the formula
    that stands in for SDPA's unfused math path on the CPU. Both equal the textbook formula."""
    q, k, v, bias, mask = _inputs(shifted)
    bias.requires_grad_(bias_trained)
    scale = 8 ** -0.5
    got = attend_windows(q, k, v, bias, mask, scale)
    want = explicit(q, k, v, bias, mask, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    inputs = (q, k, v, bias) if bias_trained else (q, k, v)
    cot = torch.randn_like(got)
    g_got = torch.autograd.grad(got, inputs, cot)
    g_want = torch.autograd.grad(want, inputs, cot)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if shifted:  # the mask really cuts: without it the output differs
        assert not torch.allclose(got, explicit(q, k, v, bias, None, scale), atol=1e-3)


@needs_flex
@pytest.mark.parametrize("shifted", [False, True])
def test_flex_equals_explicit_softmax(shifted):
    """Forward only: torch has no FlexAttention backward on the CPU (training with flex needs CUDA)."""
    q, k, v, bias, mask = _inputs(shifted, requires_grad=False)
    got = attend_windows(q, k, v, bias, mask, 0.3, backend="flex")
    torch.testing.assert_close(got, explicit(q, k, v, bias, mask, 0.3), atol=1e-5, rtol=1e-4)


def _monai_reference(enc):
    """MONAI's own SwinTransformer (explicit softmax in training) holding the encoder's weights."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    vit = enc.swinViT
    ref = SwinTransformer(in_chans=1, embed_dim=vit.embed_dim, window_size=vit.window_size,
                          patch_size=vit.patch_size, depths=[len(getattr(vit, f"layers{i}")[0].blocks)
                                                             for i in range(1, 5)],
                          num_heads=[getattr(vit, f"layers{i}")[0].blocks[0].attn.num_heads for i in range(1, 5)],
                          spatial_dims=len(vit.window_size))
    ref.load_state_dict(vit.state_dict())
    return ref


@pytest.mark.parametrize("dims", [3, 2])
def test_swin_unetr_sdpa_equals_monai_explicit_softmax(dims, one_thread):
    """The Swin-UNETR encoder's attention (SDPA in training too) against MONAI's explicit softmax, shifted
    windows included: stage maps and every gradient."""
    if dims == 3:
        enc, shape = tiny_encoder("swin_unetr_3d")
    else:
        enc = build_encoder("swin_unetr", spatial_dims=2, feature_size=12, window_size=4, depths=(2, 2, 1, 1),
                            num_heads=(1, 2, 2, 4))
        shape = (2, 1, 64, 64)
    ref = _monai_reference(enc)
    assert type(ref.layers1[0].blocks[0].attn).__name__ == "WindowAttention"  # MONAI's class, not ours
    assert type(enc.swinViT.layers1[0].blocks[0].attn).__name__ == "FusedWindowAttention"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours, theirs = enc(x), ref(x, normalize=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    sum(o.square().mean() for o in ours).backward()
    sum(o.square().mean() for o in theirs).backward()
    theirs_grads = dict(ref.named_parameters())
    for name, p in enc.swinViT.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_flex
@pytest.mark.parametrize("family", ["swin_unetr_3d", "qt_unet_3d"])
def test_flex_backend_equals_sdpa_in_the_encoders(family, one_thread):
    enc, shape = tiny_encoder(family)
    enc.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sdpa = enc(x)
        assert set_attention_backend(enc, "flex") > 0
        flex = enc(x)
    for a, b in zip(flex, sdpa):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["sam_vit", "vit_3d"])
def test_timm_attention_runs_sdpa_and_equals_explicit_softmax(family, one_thread):
    """SAM and ViT blocks are timm's, whose attention takes F.scaled_dot_product_attention (fused_attn) unless
    TIMM_FUSED_ATTN=0; its explicit path gives the same maps."""
    enc, shape = tiny_encoder(family)
    attn = [m for m in enc.modules() if hasattr(m, "fused_attn")]
    assert attn and all(m.fused_attn for m in attn)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused = enc(x)
        for m in attn:
            m.fused_attn = False
        plain = enc(x)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.args.attention: 'fused'"):
        build_encoder("qt_unet", spatial_dims=2, attention="fused")


def test_relative_bias_gradient_is_indexing_and_run_to_run_identical():
    """The bias lookup's gradient equals plain indexing's up to summation order, and two backward passes give the
    same bits (indexing's CPU backward adds with parallel atomics: on a multi-core CPU its last bits changed from
    run to run, and with them a resumed run's weights)."""
    torch.manual_seed(0)
    heads, window = 4, (4, 4, 4)
    from sslkit.models.window_attention import relative_position_index

    idx = relative_position_index(window, window, "cpu").reshape(-1)
    n = int(idx.numel() ** 0.5)
    table = torch.randn(int(idx.max()) + 1, heads, requires_grad=True)
    upstream = torch.randn(heads, n, n)

    def grad(lookup):
        table.grad = None
        (lookup() * upstream).sum().backward()
        return table.grad.clone()

    with torch.autograd.set_grad_enabled(True):
        threads = torch.get_num_threads()
        torch.set_num_threads(max(2, threads))
        try:
            ours = [grad(lambda: bias_from_table(table, idx, n, heads)) for _ in range(5)]
        finally:
            torch.set_num_threads(threads)
        indexing = grad(lambda: table[idx].view(n, n, heads).permute(2, 0, 1))
    assert torch.equal(bias_from_table(table, idx, n, heads), table[idx].view(n, n, heads).permute(2, 0, 1))
    assert all(torch.equal(ours[0], g) for g in ours[1:])
    torch.testing.assert_close(ours[0], indexing, rtol=1e-5, atol=1e-5)
