"""VICReg and Barlow Twins on lightly's losses (issue 23): the objectives' losses equal the papers' formulas written
out by hand on their own projections, the expander's norm choice, the one-line config check for micro-batches of
one crop, and losses that fall on real CT views from the data pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_swin
from sslkit.errors import ConfigError
from sslkit.objectives.registry import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def _views(seed=0, b=4):
    gen = torch.Generator().manual_seed(seed)
    return {"view1": torch.rand(b, 1, 32, 32, 32, generator=gen), "view2": torch.rand(b, 1, 32, 32, 32, generator=gen)}


def _projections(obj, enc, batch):
    with torch.no_grad():
        return [obj.projector(enc(batch[k])[-1].flatten(2).mean(-1)).double() for k in ("view1", "view2")]


def test_vicreg_equals_the_papers_formula():
    """25 * invariance + 25 * variance + 1 * covariance, written out per dimension and per pair."""
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = build_objective({"name": "vicreg", "hidden_dim": 32, "out_dim": 6, "head_norm": "layer"}, enc)
    batch = _views()
    out = obj(batch, enc)
    z1, z2 = _projections(obj, enc, batch)
    n, d = z1.shape
    inv = sum(float((z1[i, k] - z2[i, k]) ** 2) for i in range(n) for k in range(d)) / (n * d)

    def var_cov(z):
        mean = [sum(float(z[i, k]) for i in range(n)) / n for k in range(d)]
        cov = [[sum((float(z[i, a]) - mean[a]) * (float(z[i, c]) - mean[c]) for i in range(n)) / (n - 1)
                for c in range(d)] for a in range(d)]
        var = sum(max(0.0, 1.0 - math.sqrt(cov[k][k] + 1e-4)) for k in range(d)) / d
        return var, sum(cov[a][c] ** 2 for a in range(d) for c in range(d) if a != c) / d

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    want = 25 * inv + 25 * 0.5 * (v1 + v2) + 1 * (c1 + c2)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert obj.loss_fn.gather_distributed and out.embeddings.shape == (4, 6)


def test_barlow_twins_equals_the_papers_formula():
    """Per-dimension standardisation over the batch, C = z1n^T z2n / N,
    loss = sum (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2."""
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = build_objective({"name": "barlow_twins", "hidden_dim": 32, "out_dim": 6, "head_norm": "layer",
                           "lambda_param": 0.02}, enc)
    batch = _views(1)
    out = obj(batch, enc)
    z1, z2 = _projections(obj, enc, batch)
    n, d = z1.shape

    def standardise(z):
        mean = z.mean(0)
        var = ((z - mean) ** 2).mean(0)  # biased, as batch norm
        return (z - mean) / torch.sqrt(var + 1e-5)

    a, b = standardise(z1), standardise(z2)
    c = [[sum(float(a[i, p] * b[i, q]) for i in range(n)) / n for q in range(d)] for p in range(d)]
    want = sum((1 - c[p][p]) ** 2 for p in range(d)) + 0.02 * sum(c[p][q] ** 2 for p in range(d) for q in range(d)
                                                                  if p != q)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-4)


def test_expander_norm_choice_and_one_crop_micro_batches():
    from sslkit.config import config_from_dict

    enc = tiny_swin()
    layer = build_objective({"name": "vicreg", "hidden_dim": 16, "out_dim": 8, "head_norm": "layer"}, enc)
    kinds = [type(m).__name__ for m in layer.projector.layers]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]
    batch_norm = build_objective({"name": "barlow_twins", "hidden_dim": 16, "out_dim": 8}, enc)
    assert [type(m).__name__ for m in batch_norm.projector.layers][1] == "BatchNorm1d"
    assert batch_norm.projector.layers[0].bias is None and batch_norm.projector.layers[-1].bias is not None
    one = config_from_dict({"train": {"micro_batch_size": 1}})
    for name in ("vicreg", "barlow_twins"):
        obj = build_objective({"name": name, "hidden_dim": 16, "out_dim": 8, "head_norm": "layer"}, enc)
        with pytest.raises(ConfigError, match=rf"train.micro_batch_size: {name} \(objectives\[2\]\)"):
            obj.check_config(one, 2)


def test_losses_fall_on_real_ct_views(demo_dir, scan_cache):
    """15 Adam steps on one micro-batch of 4 pairs of real CT views (32^3 at 3 mm, strong views, the second crop
    shifted by up to 1/4 roi) from the data pipeline: each loss must fall clearly."""
    from sslkit.config import DataConfig
    from sslkit.data.datalist import load_datalist
    from sslkit.data.pretrain import PretrainDataset

    cfg = DataConfig(datalist=str(demo_dir / "datalist.json"), roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0],
                     crops_per_volume=2, cache_dir=str(scan_cache))
    cfg.views.shift = 0.25
    ds = PretrainDataset(load_datalist(cfg.datalist), cfg, scan_cache, seed=0).prepare(False)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 2, 4, 5)])
    for name in ("vicreg", "barlow_twins"):
        torch.manual_seed(0)
        enc = tiny_swin()
        obj = build_objective({"name": name, "hidden_dim": 128, "out_dim": 128}, enc)
        opt = torch.optim.Adam(list(enc.parameters()) + list(obj.parameters()), lr=1e-3)
        losses = []
        for _ in range(15):
            out = obj(batch, enc)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        print(f"{name}: {[round(v, 3) for v in losses]}")
        assert all(math.isfinite(v) for v in losses)
        assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), (name, losses)
