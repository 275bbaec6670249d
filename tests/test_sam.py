"""SAM image encoders, official checkpoint loading, Medical SAM Adapter, AutoSAM heads.

ViT-B at 1024^2 is built on the meta device (parameter counts, shapes); real forwards use 64-128 px images
with interpolated position embeddings.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.errors import ConfigError
from sslkit.models import build_encoder, build_segmenter
from sslkit.models.sam import (SAMImageEncoder, adapter_parameters, add_adapters, build_sam_encoder,
                               freeze_all_but_adapters, load_sam_checkpoint, sam_vit)
from sslkit.models.sam_heads import HEADS, AutoSAMDecoder

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny(img_size: int = 64, **kw) -> SAMImageEncoder:
    torch.manual_seed(0)
    enc = sam_vit(img_size=img_size, **{**TINY, **kw})
    with torch.no_grad():
        for p in enc.parameters():  # SAM-like non-trivial values (zero-initialised tables otherwise)
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5) if p.shape[0] == 256 else p.normal_(0, 0.05)
    return enc


def official_state(enc: SAMImageEncoder) -> dict:
    """The encoder's weights under official SAM key names, plus prompt-encoder / mask-decoder keys."""
    sd = {"image_encoder." + k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2"): v.clone()
          for k, v in enc.state_dict().items()}
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 256)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return sd


# ------------------------------------------------------------------------------------------- architecture


def test_vit_b_parameter_count_and_output_shape_meta():
    with torch.device("meta"):
        enc = build_encoder("sam_vit_b", spatial_dims=2, in_channels=1)
        feats = enc(torch.zeros(2, 1, 1024, 1024))
    n = n_params(enc)
    print(f"sam_vit_b encoder: {n / 1e6:.3f} M parameters")
    assert abs(n - 89.7e6) / 89.7e6 < 0.01
    assert feats[-1].shape == (2, 256, 64, 64)
    assert [f.shape[1] for f in feats] == enc.feature_channels == [768] * 4 + [256]
    assert enc.patch_size == 16 and enc.embed_dim == 768 and enc.spatial_dims == 2
    with torch.device("meta"):
        for name, d, depth in (("sam_vit_l", 1024, 24), ("sam_vit_h", 1280, 32)):
            e = build_encoder(name, spatial_dims=2, in_channels=3)
            assert e.embed_dim == d and len(e.blocks) == depth
            print(f"{name}: {n_params(e) / 1e6:.1f} M parameters")


def test_input_normalisation_unit_range_and_grey_replication():
    enc = tiny(64)
    x = torch.rand(1, 1, 64, 64)
    unit = enc.normalize(x)
    enc.input_range = "255"
    raw = enc.normalize(x.expand(-1, 3, -1, -1) * 255)
    assert unit.shape == (1, 3, 64, 64) and torch.allclose(unit, raw, atol=1e-5)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert torch.allclose(raw, (x * 255 - mean) / std, atol=1e-5)
    with pytest.raises(ConfigError, match="input_range"):
        sam_vit(img_size=64, input_range="percent", **TINY)


def test_token_hooks_and_interpolated_positions():
    enc = tiny(64).eval()
    x = torch.rand(2, 1, 96, 96)  # grid 6x6 vs the 4x4 the encoder was built for
    with torch.no_grad():
        a = enc(x)
        b = enc.forward_tokens(enc.embed(x))
    assert a[-1].shape == (2, 256, 6, 6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_forward_visible_with_all_tokens_equals_the_blocks():
    enc = tiny(64).eval()  # grid 4x4, window 4: no padding
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        tok = enc.embed(x)
        b, c, h, w = tok.shape
        t = tok.permute(0, 2, 3, 1) + enc.pos_embed_for((h, w))
        for blk in enc.blocks:
            t = blk(t)
        pos = torch.arange(h * w).expand(b, -1)
        vis = enc.forward_visible(tok.flatten(2).transpose(1, 2), pos, (h, w))
    assert torch.allclose(vis, t.reshape(b, h * w, c), atol=1e-5)


# ---------------------------------------------------------------------------------------- checkpoints


def test_official_checkpoint_loads_and_matches_timm(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = build_sam_encoder("b", img_size=128, input_range="none")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.02)
    ckpt = tmp_path / "sam_vit_b_random.pth"
    torch.save(official_state(src), ckpt)

    enc = build_encoder("sam_vit_b", spatial_dims=2, in_channels=3, img_size=128, input_range="none",
                        checkpoint=str(ckpt)).eval()
    ref = timm.create_model("samvit_base_patch16", pretrained=False, img_size=128, num_classes=0,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    sd = {k.replace("image_encoder.", "").replace("mlp.lin", "mlp.fc"): v
          for k, v in torch.load(ckpt, weights_only=True).items() if k.startswith("image_encoder.")}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("head") for k in missing)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ours = enc(x)[-1]
        theirs = ref.forward_features(x)
    assert ours.shape == (1, 256, 8, 8)
    assert (ours - theirs).abs().max() < 1e-4


def test_checkpoint_at_another_image_size_is_interpolated(tmp_path):
    src = tiny(64)
    ckpt = tmp_path / "sam_small.pth"
    torch.save(official_state(src), ckpt)
    enc = load_sam_checkpoint(sam_vit(img_size=128, **TINY), ckpt)
    assert enc.pos_embed.shape == (1, 8, 8, 32)
    g = enc.global_attn_indexes[0]
    assert enc.blocks[g].attn.rel_pos_h.shape[0] == 15 and src.blocks[g].attn.rel_pos_h.shape[0] == 7
    assert torch.equal(enc.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert enc(torch.rand(1, 1, 128, 128))[-1].shape == (1, 256, 8, 8)


def test_wrong_keys_and_missing_file_give_config_errors(tmp_path):
    sd = official_state(tiny(64))
    sd["image_encoder.blocks.0.attn.qkv_typo.weight"] = sd.pop("image_encoder.blocks.0.attn.qkv.weight")
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ConfigError) as e:
        load_sam_checkpoint(sam_vit(img_size=64, **TINY), bad)
    assert "blocks.0.attn.qkv.weight" in str(e.value) and "blocks.0.attn.qkv_typo.weight" in str(e.value)
    assert "bad.pth" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_sam_checkpoint(sam_vit(img_size=64, **TINY), tmp_path / "absent.pth")
    wide = tmp_path / "wide.pth"
    torch.save(official_state(sam_vit(img_size=64, **{**TINY, "embed_dim": 64})), wide)
    with pytest.raises(ConfigError, match="shapes differ"):
        load_sam_checkpoint(sam_vit(img_size=64, **TINY), wide)


# --------------------------------------------------------------------------------------------- adapters


def test_adapter_mode_trains_only_adapters_vit_b_meta():
    with torch.device("meta"):
        enc = build_encoder("sam_vit_b", spatial_dims=2, in_channels=1)
        base = n_params(enc)
        add_adapters(enc, mlp_scale=0.5, ratio=0.25)
        share = freeze_all_but_adapters(enc)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in n for n in trainable)
    n_ad = sum(p.numel() for p in adapter_parameters(enc))
    # 2 adapters per block, each D*D/4 + D/4 + D/4*D + D
    d = 768
    assert n_ad == 12 * 2 * (2 * d * (d // 4) + d // 4 + d)
    print(f"MSA adapters on ViT-B: {n_ad / 1e6:.2f} M = {share:.2%} of the adapted encoder, "
          f"{n_ad / base:.2%} of the original")
    # NB: with the paper's D/4 bottleneck the share is 7.3 %, not < 5 % (see the report / SPECS).
    assert share < 0.08


def test_adapters_start_as_identity_and_depth_branch_gets_gradients():
    enc = tiny(64).eval()
    x = torch.rand(2, 1, 3, 64, 64)  # (B, C, slices, H, W)
    with torch.no_grad():
        before = enc.forward_volume(x)[-1]
    add_adapters(enc, depth_branch=True)
    with torch.no_grad():
        after = enc.forward_volume(x)[-1]
    assert after.shape == (2, 256, 3, 4, 4) and torch.allclose(before, after, atol=1e-5)
    freeze_all_but_adapters(enc)
    enc.forward_volume(x)[-1].square().mean().backward()
    blk = enc.blocks[0]
    for a in (blk.space_adapter, blk.mlp_adapter, blk.depth_adapter):
        assert a.fc2.weight.grad is not None and a.fc2.weight.grad.abs().sum() > 0
    assert enc.blocks[0].attn.qkv.weight.grad is None


# ------------------------------------------------------------------------------------------------ heads


def test_autosam_decoder_gives_all_classes_in_one_forward():
    dec = AutoSAMDecoder(num_classes=4)
    calls = []
    dec.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    y = dec([torch.randn(2, 256, 8, 8)], size=(100, 100))
    assert y.shape == (2, 4, 100, 100) and dec.last_iou.shape == (2, 4)
    assert calls == [torch.Size([8, 256, 8, 8])]  # one transformer pass over B x K replicated embeddings
    # each class has its own tokens: different masks per class
    assert (y[:, 0] - y[:, 1]).abs().max() > 0


def _ch2_slices(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    nib = pytest.importorskip("nibabel")
    if not CH2.is_file():
        pytest.skip(f"{CH2} not present")
    vol = np.asarray(nib.load(str(CH2)).dataobj, dtype=np.float32)  # (X, Y, Z)
    zs = np.linspace(vol.shape[2] * 0.35, vol.shape[2] * 0.65, n).astype(int)
    sl = torch.from_numpy(np.stack([vol[:, :, z] for z in zs]))[:, None]  # (n, 1, X, Y)
    sl = F.interpolate(sl, size=(size, size), mode="bilinear", align_corners=False)
    sl = (sl - sl.amin()) / (sl.amax() - sl.amin())
    lab = (sl[:, 0] > 0.25).long() + (sl[:, 0] > 0.6).long()  # background / darker / brighter tissue
    return sl, lab


@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_head_learns_on_real_slices_with_a_frozen_tiny_encoder(head):
    x, y = _ch2_slices()
    torch.manual_seed(0)
    model = build_segmenter("sam", spatial_dims=2, in_channels=1, out_channels=3, encoder="sam_vit", head=head,
                            mode="frozen", img_size=128, encoder_args=dict(TINY))
    assert not any(p.requires_grad for p in model.encoder.parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4, betas=(0.5, 0.999))
    model.train()
    from monai.losses import DiceCELoss

    ce_dice = DiceCELoss(to_onehot_y=True, softmax=True)  # the paper's CE + soft Dice, as `sslkit finetune` uses
    losses = []
    for _ in range(8):
        loss = ce_dice(model(x), y[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------------------- SSL objectives


def test_mae_emix_shed_run_on_a_sam_encoder():
    from sslkit.objectives.emix import EMix
    from sslkit.objectives.mae import MAE
    from sslkit.objectives.shed import ShED

    enc = tiny(64)
    batch = {"view1": torch.rand(2, 1, 64, 64)}
    for obj in (MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2), EMix(enc, hidden_dim=32, out_dim=16),
                ShED(enc)):
        out = obj(batch, enc)
        out.loss.backward()
        assert torch.isfinite(out.loss)
    assert enc.patch_embed.proj.weight.grad is not None
