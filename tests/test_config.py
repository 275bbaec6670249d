"""Config schema: unknown keys, wrong types, overrides, saved resolved config."""

from __future__ import annotations

import pytest

from sslkit.config import apply_override, config_from_dict, load_config, save_config
from sslkit.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train: {max_steps: 5}\nobjectives: [{name: byol, weight: 1}]\n", encoding="utf-8")
    cfg = load_config(p, ["train.grad_accum_steps=4", "optim.lr=4e-4", "data.roi=[48, 48, 48]",
                          "objectives.0.weight=0.5", "model.args.feature_size=24"])
    assert cfg.train.max_steps == 5 and cfg.train.grad_accum_steps == 4
    assert cfg.optim.lr == pytest.approx(4e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.roi == [48, 48, 48]
    assert cfg.objectives[0]["weight"] == 0.5
    assert cfg.model.args == {"feature_size": 24}


@pytest.mark.parametrize("raw, expected", [
    ({"train": {"max_step": 5}}, "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
    ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'?"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
    ({"train": {"micro_batch_size": 1.5}}, "train.micro_batch_size: expected an integer, got 1.5"),
    ({"train": {"precision": "fp8"}}, "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ({"data": {"roi": [64, 64]}}, "data.roi: needs 3 positive sizes"),
    ({"train": {"worker_nice": 20}}, "train.worker_nice: 20 is not a niceness in 0..19"),
    ({"objectives": [{"weight": 1}]}, "objectives[0]: expected a mapping with a 'name'"),
])
def test_bad_values_name_the_key(raw, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_objective_and_model_option():
    from sslkit.models import build_encoder
    from sslkit.objectives import build_objective

    with pytest.raises(ConfigError, match="did you mean 'byol'"):
        build_objective({"name": "boyl"}, encoder=None)
    enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=12)
    with pytest.raises(ConfigError, match="objectives\\[0\\].tau: not an option of objective 'byol' "
                                          "\\(did you mean 'tau_base'"):
        build_objective({"name": "byol", "tau": 0.9}, encoder=enc)
    with pytest.raises(ConfigError, match="model.featuresize: not an option .*did you mean 'feature_size'"):
        build_encoder("swin_unetr", featuresize=12)


def test_saved_config_round_trips(tmp_path):
    cfg = config_from_dict({"train": {"max_steps": 7}, "objectives": ["byol"]})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def _recipes():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parents[1] / "pretrain_configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda p: p.stem)
def test_every_recipe_loads_and_demo_recipes_build(recipe):
    """Every recipe passes the schema and the start-up checks (meta weights, each objective's check_config); the CPU
    demo twins also build their encoder and objectives."""
    import torch

    from sslkit.engine.trainer import check_buildable

    cfg = load_config(recipe)
    assert cfg.monitor.enabled and cfg.objectives
    check_buildable(cfg, torch.device("cpu"))
    if recipe.stem.startswith("demo_"):
        from sslkit.engine.trainer import build_model

        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
        assert len(model.objectives.objectives) == len(cfg.objectives)
