"""Transfer schedules of fine-tuning: encoder lr scale, layer-wise lr decay, frozen-encoder warm-up; one weight-decay
policy for both loops."""

from __future__ import annotations

import pytest
import torch

from sslkit.downstream.adapt import adapt, build_model
from sslkit.downstream.config import downstream_config_from_dict
from sslkit.engine.optim import make_optimizer
from sslkit.engine.schedules import make_scheduler
from sslkit.errors import ConfigError
from sslkit.models.base import layer_ids


def _cfg(**sections):
    raw = {"data": {"num_classes": 3, "roi": [32, 32, 32]},
           "model": {"name": "swin_unetr", "args": {"feature_size": 12, "depths": [1, 1, 1, 1], "window_size": 4,
                                                     "norm_name": "batch"}},
           "optim": {"lr": 1e-3, "weight_decay": 0.01}, "train": {"max_steps": 20}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return downstream_config_from_dict(raw)


def _setup(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    a = adapt(model, cfg.adapt, cfg.optim.lr, cfg.optim.layer_decay)
    opt = make_optimizer(model, cfg.optim, groups=a.param_groups)
    sched = make_scheduler(opt, cfg.optim, cfg.train.max_steps, group_factors=a.lr_factors(opt.param_groups))
    return model, a, opt, sched


def test_layer_decay_sets_each_encoder_depth_lr():
    cfg = _cfg(optim={"layer_decay": 0.5}, adapt={"encoder_lr_scale": 0.2})
    model, _, opt, _ = _setup(cfg)
    ids, last = layer_ids(model.encoder)
    assert last == 4
    names = {id(p): n for n, p in model.encoder.named_parameters()}
    seen = set()
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) in names:
                depth = ids[names[id(p)]]
                assert g["lr"] == pytest.approx(1e-3 * 0.2 * 0.5 ** (last + 1 - depth)), (names[id(p)], g["lr"])
                seen.add(depth)
            else:
                assert g["lr"] == pytest.approx(1e-3)       # decoder and head: depth L + 1
    assert seen == {0, 1, 2, 3, 4}
    assert ids["swinViT.patch_embed.proj.weight"] == 0 and ids["swinViT.layers4.0.downsample.reduction.weight"] == 4


def test_one_weight_decay_policy_biases_and_norms_not_decayed():
    model, _, opt, _ = _setup(_cfg())
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            no_decay = p.ndim <= 1 or names[id(p)].endswith(".bias")
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), names[id(p)]
    # the pretraining loop uses the same factory
    from sslkit.config import load_config
    from sslkit.engine.trainer import build_model as build_ssl

    pcfg = load_config(None, ["model.args={feature_size: 12, depths: [1, 1, 1, 1]}", "optim.weight_decay=0.05",
                              "objectives=[{name: byol, hidden_dim: 16, out_dim: 8}]"])
    ssl = build_ssl(pcfg)
    names = {id(p): n for n, p in ssl.named_parameters()}
    for g in make_optimizer(ssl, pcfg.optim).param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 or names[id(p)].endswith(".bias") else 0.05)


def test_frozen_encoder_warmup_step_by_step():
    n = 3
    cfg = _cfg(adapt={"warmup_frozen_steps": n}, train={"max_steps": 10})
    model, a, opt, sched = _setup(cfg)
    enc = model.encoder
    x = torch.randn(2, 1, 32, 32, 32)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    for step in range(2 * n + 1):
        a.set_step(model, step)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        if step < n:
            assert lrs["encoder"] == 0.0 and lrs["decoder"] == pytest.approx(1e-3 * (step + 1) / n)
            assert not enc.training and all(not p.requires_grad for p in enc.parameters())
        else:
            want = 1e-3 * min(1.0, (step - n + 1) / n)
            assert lrs["encoder"] == pytest.approx(want) and lrs["decoder"] == pytest.approx(want)
            assert enc.training and all(p.requires_grad for p in enc.parameters())
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        grads = [p.grad for p in enc.parameters()]
        assert all(g is None for g in grads) == (step < n)
        opt.step()
        sched.step()
        same = all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
        assert same == (step < n), step       # frozen: weights and BatchNorm statistics untouched
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())


def test_transfer_keys_refused_where_they_cannot_apply():
    with pytest.raises(ConfigError, match="optim.layer_decay: must be in"):
        _cfg(optim={"layer_decay": 0.0})
    with pytest.raises(ConfigError, match="applies to adapt.mode full"):
        _cfg(adapt={"mode": "frozen_encoder", "warmup_frozen_steps": 2})
    with pytest.raises(ConfigError, match="do not fit in train.max_steps"):
        _cfg(adapt={"warmup_frozen_steps": 15})
    with pytest.raises(ConfigError, match="one_cycle"):
        _cfg(adapt={"warmup_frozen_steps": 2}, optim={"schedule": "one_cycle"})


def test_transfer_default_from_a_plan_where_the_recipe_is_silent():
    from sslkit.config import Config
    from sslkit.downstream.from_plan import TRANSFER_DEFAULTS, recipe_from_plan
    from sslkit.plan import make_plan, preprocessing_plan

    plan = make_plan("swin_unetr", {"feature_size": 12}, preprocessing_plan(Config().data, 3, 1, False), [12, 24],
                     [[2, 2, 2], [4, 4, 4]])
    (key, value), = TRANSFER_DEFAULTS
    assert key == "adapt.encoder_lr_scale" and value == 0.1
    raw, _ = recipe_from_plan({"data": {"modality": "mri"}}, plan)
    assert raw["adapt"]["encoder_lr_scale"] == 0.1
    raw, _ = recipe_from_plan({"adapt": {"encoder_lr_scale": 1.0}}, plan)   # the recipe's own value stays
    assert raw["adapt"]["encoder_lr_scale"] == 1.0
    raw, _ = recipe_from_plan({"adapt": {"mode": "frozen_encoder"}}, plan)  # no encoder lr to scale
    assert "encoder_lr_scale" not in raw["adapt"]
    assert recipe_from_plan({}, None)[0] == {}                              # no plan, no transfer default


def test_linear_head_is_one_linear_classifier_on_the_frozen_features():
    """adapt.mode linear_head: the decoder replaced by BatchNorm + 1x1 conv per stage, scores upsampled and summed;
    only the head trains. At eval it equals one linear map of every stage's normalised features upsampled to the
    input (upsampling and 1x1 convs commute), written here by hand."""
    import torch.nn.functional as F

    from sslkit.downstream.adapt import load_finetuned, mode_names, save_model
    from sslkit.downstream.config import ADAPT_MODES

    assert sorted(ADAPT_MODES) == mode_names()        # the recipe check knows every registered mode
    cfg = _cfg(adapt={"mode": "linear_head"})
    model, a, opt, _ = _setup(cfg)
    assert not hasattr(model, "net") and len(model.heads) == len(model.encoder.feature_channels) == 5
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for m in (model.norms, model.heads) for p in m.parameters()}
    x = torch.randn(2, 1, 32, 32, 32)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    for _ in range(2):
        a.train_mode(model)
        opt.zero_grad(set_to_none=True)
        model(x).logsumexp(1).mean().backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())

    model.eval()
    with torch.no_grad():
        feats = [(m - n.running_mean.view(1, -1, 1, 1, 1)) / (n.running_var.view(1, -1, 1, 1, 1) + n.eps).sqrt()
                 * n.weight.view(1, -1, 1, 1, 1) + n.bias.view(1, -1, 1, 1, 1)
                 for m, n in zip(model.encoder(x), model.norms)]
        up = torch.cat([F.interpolate(f, size=(32, 32, 32), mode="trilinear", align_corners=False) for f in feats], 1)
        w = torch.cat([h.weight.flatten(1) for h in model.heads], 1)
        want = torch.einsum("kc,bcxyz->bkxyz", w, up) + sum(h.bias for h in model.heads).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:        # evaluate / predict rebuild the same architecture from the file
        save_model(model, cfg, {}, Path(d) / "model.safetensors")
        again = load_finetuned(d)[0].eval()
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x))
