"""SMIT (issue 23): its three terms and their weights against a hand computation, the temperature schedules, what
reaches the student and the teacher, the encoders it runs on, and a student that learns on real CT crops. Its
engine runs (exact resume after SIGKILL, ZeRO-2 on 2 gloo ranks) share DINO's and iBOT's in
test_dino_ibot.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_swin, train_objective
from sslkit.errors import ConfigError
from sslkit.objectives.distill import masked_features, views_to_batch
from sslkit.objectives.registry import build_objective
from sslkit.objectives.smit import SMIT

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def _softmax_ce(t, s, t_temp, s_temp=0.1):
    """Row-wise -sum softmax(t / T_t) log softmax(s / T_s) in float64 (zero centres): (N, K), (N, K) -> (N,)."""
    return -(torch.softmax(t.double() / t_temp, -1) * torch.log_softmax(s.double() / s_temp, -1)).sum(-1)


def _batch(seed=0, b=2):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 2, 8, dtype=torch.bool)
    for i in range(b):
        for v in range(2):
            masks[i, v, torch.randperm(8, generator=gen)[: 3 + i + v]] = True  # different counts per image
    return {"view1": torch.rand(b, 1, 32, 32, 32, generator=gen), "view2": torch.rand(b, 1, 32, 32, 32, generator=gen),
            "masks": masks.view(b, 2, 2, 2, 2)}


def test_three_terms_and_their_weights_equal_a_hand_computation():
    """image: cross-view CE of the image heads (teacher on unmasked views); patch: same-view CE on the masked tokens,
    per image; recon: L1 on the masked voxels; total = weighted sum (weights other than SMIT's 0.1 / 0.1 / 1.0 so
    that a swapped weight shows)."""
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = SMIT(enc, **SMALL, image_weight=0.3, patch_weight=0.5, recon_weight=2.0, teacher_temp=0.05,
               warmup_teacher_temp=0.05, recon_stage=-2)
    with torch.no_grad():  # student heads away from the teacher's copies
        for p in [*obj.image_head.parameters(), *obj.patch_head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    out = obj(batch, enc)
    with torch.no_grad():
        x, m = torch.cat([batch["view1"], batch["view2"]]), views_to_batch(batch["masks"])
        feats = masked_features(enc, x, m, obj.mask_token)
        tok = feats[3].flatten(2).transpose(1, 2)  # stride 16: one token per mask cell, (4, 8, 96)
        t_tok = obj.teacher["encoder"](x)[3].flatten(2).transpose(1, 2)
        s_img, t_img = obj.image_head(tok.mean(1)), obj.teacher["image_head"](t_tok.mean(1))
        image = torch.stack([_softmax_ce(t_img[i * 2:(i + 1) * 2], s_img[j * 2:(j + 1) * 2], 0.05)
                             for i in range(2) for j in range(2) if i != j]).mean()
        ce = _softmax_ce(obj.teacher["patch_head"](t_tok).flatten(0, 1), obj.patch_head(tok).flatten(0, 1),
                         0.05).view(4, 8)
        flat = m.flatten(1)
        patch = torch.stack([ce[i][flat[i]].mean() for i in range(4)]).mean()
        rec = obj.decoder(feats[-2])
        m_vox = m.repeat_interleave(16, 1).repeat_interleave(16, 2).repeat_interleave(16, 3).unsqueeze(1)
        recon = ((rec - x).abs() * m_vox).sum() / m_vox.sum()
    assert out.logs["image"] == pytest.approx(float(image), rel=1e-5)
    assert out.logs["patch"] == pytest.approx(float(patch), rel=1e-5)
    assert out.logs["recon"] == pytest.approx(float(recon), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(0.3 * image + 0.5 * patch + 2.0 * recon), rel=1e-5)
    assert out.logs["mask_fraction"] == pytest.approx(float(m.float().mean()))
    # the monitor gets the image head's bottleneck: student of the masked first view, teacher of the unmasked one
    torch.testing.assert_close(out.teacher_embeddings, F.normalize(
        obj.teacher["image_head"].layers(t_tok[:2].mean(1)), dim=-1), rtol=1e-4, atol=1e-6)
    assert obj.data_requests() == {"views": {}, "masks": {"patch": 16, "ratio": [0.7, 0.7], "prob": 1.0, "count": 2}}


def test_gradients_reach_student_heads_mask_token_and_decoder_never_the_teacher():
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = SMIT(enc, **SMALL, recon_stage=-2)
    obj(_batch(1), enc).loss.backward()
    for name, module in (("image_head", obj.image_head.layers), ("patch_head", obj.patch_head.layers),
                         ("mask_token", obj.mask_token), ("decoder", obj.decoder)):
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters()), name
    assert all(p.grad is None for p in obj.teacher.modules.parameters())
    assert sum(p.grad is not None for p in enc.parameters()) > 0


def test_batch_norm_heads_see_tokens_as_rows():
    """With BatchNorm heads (the demo recipes') the patch heads take (tokens, C) rows, student and teacher alike."""
    torch.manual_seed(0)
    enc = tiny_swin()
    smit = SMIT(enc, **SMALL, batch_norm=True, recon_stage=-2)
    out = smit(_batch(3), enc)
    out.loss.backward()
    assert math.isfinite(out.logs["patch"]) and smit.patch_head.layers[1].weight.grad is not None
    ibot = build_objective({"name": "ibot", **SMALL, "batch_norm": True, "n_local": 0, "patch_out_dim": 32}, enc)
    g = torch.rand(2, 2, 1, 32, 32, 32)
    assert math.isfinite(ibot({"global_crops": g, "masks": _batch(4)["masks"]}, enc).logs["patch"])


def test_temperatures_and_teacher_follow_optimizer_steps():
    """Image teacher temperature 0.04 -> 0.07 over the warm-up; the patch one held for the delay first (SMIT's
    mim_start_epoch); the teacher moves by the constant 0.996 once per optimizer step."""
    obj = SMIT(tiny_swin(), **SMALL, warmup_teacher_temp_steps=2, patch_temp_delay_steps=2)
    seen = []
    for step in range(1, 6):
        seen.append(obj.teacher_temps())
        obj.on_optimizer_step(step, 5)
    assert [round(a, 3) for a, _ in seen] == [0.04, 0.055, 0.07, 0.07, 0.07]
    assert [round(b, 3) for _, b in seen] == [0.04, 0.04, 0.04, 0.055, 0.07]
    assert obj.teacher.updates == 5 and obj.teacher.tau == pytest.approx(0.996)


def test_runs_on_qt_unet_and_refuses_encoders_without_token_hooks():
    from sslkit.models import build_encoder
    from sslkit.models.qt_unet import QTUNetEncoder

    torch.manual_seed(0)
    qt = QTUNetEncoder(3, 1, embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
    obj = build_objective({"name": "smit", **SMALL}, qt)
    assert obj.token_stage == 2  # QT-UNet: patch 4, stage strides 4, 8, 16, 32
    out = obj(_batch(2), qt)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and qt.patch_embed.proj.weight.grad is not None
    punet = build_encoder("punet", spatial_dims=3, channels=[8, 16, 16, 32, 32], num_heads=2, num_classes=3,
                          prompt_tokens=2, bias_dim=4)
    with pytest.raises(ConfigError) as err:
        build_objective({"name": "smit", **SMALL}, punet)
    assert "token hooks" in str(err.value) and "\n" not in str(err.value)


def test_check_config_names_the_roi_the_decoder_cannot_restore():
    from sslkit.config import config_from_dict

    obj = SMIT(tiny_swin(), **SMALL)
    obj.check_config(config_from_dict({"data": {"roi": [64, 64, 64]}}), 0)
    want = r"objectives\[1\] \(smit\): data.roi \[48, 48, 48\] must be a multiple of 32"
    with pytest.raises(ConfigError, match=want):
        obj.check_config(config_from_dict({"data": {"roi": [48, 48, 48]}}), 1)


def test_student_learns_its_teacher_and_restores_masked_voxels_on_real_ct(demo_dir, scan_cache):
    """12 Adam steps on one micro-batch of the data pipeline's two views of real CT crops (32^3 at 3 mm) and their
    masks: with the teacher and centres held (tau 1, centre momentum 1) the image and patch cross-entropies are to
    fixed targets and must fall, and so must the masked-voxel L1."""
    from sslkit.config import DataConfig
    from sslkit.data.datalist import load_datalist
    from sslkit.data.pretrain import PretrainDataset

    cfg = DataConfig(datalist=str(demo_dir / "datalist.json"), roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0],
                     crops_per_volume=2, cache_dir=str(scan_cache))
    cfg.views.shift = 0.25
    req = {"views": {}, "masks": {"patch": 16, "ratio": [0.5, 0.5], "prob": 1.0, "count": 2}}
    ds = PretrainDataset(load_datalist(cfg.datalist), cfg, scan_cache, seed=0, requests=req).prepare(False)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 4)])
    logs = train_objective({"name": "smit", **SMALL, "mask_ratio": 0.5, "tau_base": 1.0, "center_momentum": 1.0,
                            "recon_stage": -2}, batch)
    for key in ("image", "patch", "recon"):
        values = [row[key] for row in logs]
        print(f"smit {key}: {[round(v, 3) for v in values]}")
        assert all(math.isfinite(v) for v in values)
        assert np.mean(values[-3:]) < 0.85 * np.mean(values[:3]), (key, values)
