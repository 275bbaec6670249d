"""One pipeline from scan to downstream model: the plan travels with the weights, downstream follows it, one run
layer and one config vocabulary for both loops, no import cycles, exact CPA resume."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, ckpt_tensors, cli, max_abs_diff, run_cli, tiny_raw, write_cfg

PLAN_KEYS = {"encoder", "spatial_dims", "in_channels", "orientation", "spacing", "intensity", "crop_foreground",
             "crop_size", "axis_order", "feature_channels", "feature_strides", "sslkit_version", "recipe"}


def _qt_raw(demo_dir, cache, **sections):
    """A 2-step BYOL run on a tiny QT-UNet (patch 4: works on 32^3 crops) over the MNI demo scan."""
    raw = tiny_raw(demo_dir, cache, train={"max_steps": 2, "ckpt_every": 1},
                   model={"name": "qt_unet", "args": {"variant": "tiny", "window_size": 4}},
                   data={"datalist_key": "labelled_mni_gmwm", "modality": "mri", "spacing": [3.0, 3.0, 3.0]})
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.fixture(scope="module")
def pretrained(demo_dir, scan_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    cfg = write_cfg(_qt_raw(demo_dir, scan_cache), root / "qt_byol.yaml")
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(root / "run"), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run", cfg


def _downstream_raw(demo_dir, **data) -> dict:
    """A downstream recipe that leaves the model and the preprocessing to the encoder's plan."""
    return {"data": {"layout": "mni_gm_wm", "root": str(demo_dir), "num_classes": 3,
                     "label_names": ["grey_matter", "white_matter"], "samples_per_volume": 1, "flip_prob": 0.0,
                     "rot90_prob": 0.0, **data},
            "train": {"max_steps": 2, "val_every": 2, "threads": 2, "sw_overlap": 0.0}}


# ------------------------------------------------------------------------------------------ the plan


def test_plan_travels_with_every_weights_file(pretrained, tmp_path):
    from sslkit.plan import read_plan

    run, cfg = pretrained
    plan = read_plan(run / "encoder.safetensors")
    assert PLAN_KEYS <= set(plan)
    assert plan["encoder"] == {"name": "qt_unet", "args": {"variant": "tiny", "window_size": 4}}
    assert plan["spacing"] == [3.0, 3.0, 3.0] and plan["crop_size"] == [32, 32, 32] and plan["axis_order"] == "CXYZ"
    assert plan["intensity"]["mri"] == {"scheme": "percentile", "percentiles": [0.5, 99.5]}
    assert plan["intensity"]["ct"] == {"scheme": "window", "window": [-175.0, 250.0]}
    assert plan["feature_strides"] == [[4, 4, 4], [8, 8, 8], [16, 16, 16], [32, 32, 32]]
    assert plan["recipe"]["name"] == "qt_byol" and plan["corpus"] == {"scans": 1, "modalities": {"mri": 1},
                                                                     "skipped": 0}
    assert read_plan(run / "checkpoints" / "step_00000001")["encoder"] == plan["encoder"]  # checkpoints too
    assert read_plan(run) == plan                                                          # a run directory

    res = cli("export", "--run-dir", str(run), "--out", str(tmp_path / "e.safetensors"), "--checkpoint",
                  str(run / "checkpoints" / "step_00000001"))
    assert res.returncode == 0, res.stderr
    exported = read_plan(tmp_path / "e.safetensors")
    assert exported["source"]["step"] == 1 and exported["spacing"] == plan["spacing"]
    for target in (run / "encoder.safetensors", run / "checkpoints" / "step_00000002", run):
        res = cli("info", str(target))
        assert res.returncode == 0, res.stderr
        assert "spacing         [3.0, 3.0, 3.0] mm" in res.stdout and "intensity mri   percentile" in res.stdout
    assert json.loads(cli("info", str(run), "--json").stdout)["encoder"]["name"] == "qt_unet"


def test_finetune_builds_from_the_plan_and_predict_uses_the_models_plan(pretrained, demo_dir, tmp_path):
    from sslkit.plan import read_plan

    run, _ = pretrained
    recipe = write_cfg(_downstream_raw(demo_dir), tmp_path / "down.yaml")
    res = cli("finetune", "--cfg", str(recipe), "--encoder", str(run), "--run-dir", str(tmp_path / "ft"),
                  "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning" not in res.stderr and "sslkit evaluate" in res.stdout
    used = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text(encoding="utf-8"))
    assert used["model"]["name"] == "qt_unet" and used["model"]["args"] == {"variant": "tiny", "window_size": 4}
    assert used["data"]["spacing"] == [3.0, 3.0, 3.0] and used["data"]["roi"] == [32, 32, 32]
    assert used["data"]["mri_norm"] == "percentile" and used["data"]["modality"] == "mri"
    model_plan = read_plan(tmp_path / "ft")
    assert model_plan["kind"] == "segmenter" and model_plan["segmenter"]["num_classes"] == 3
    assert model_plan["spacing"] == [3.0, 3.0, 3.0] and model_plan["input_stats"]["cases"] == 1
    res = cli("info", str(tmp_path / "ft"))
    assert res.returncode == 0 and "segmenter       qt_unet" in res.stdout

    # predict on the full brain: the model's plan preprocesses it; the hemisphere-trained model says the field
    # of view is far from what it saw
    res = cli("predict", "--ckpt", str(tmp_path / "ft"), "--input", str(demo_dir / "mri_mni152_t1.nii.gz"),
                  "--output", str(tmp_path / "pred"))
    assert res.returncode == 0, res.stderr[-3000:]
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(warn) == 1 and "field of view" in warn[0], res.stderr
    assert (tmp_path / "pred" / "mri_mni152_t1_seg.nii.gz").is_file()


def test_a_recipe_that_differs_from_the_plan_warns_and_strict_plan_refuses(pretrained, demo_dir, tmp_path):
    run, _ = pretrained
    raw = _downstream_raw(demo_dir, spacing=[2.0, 2.0, 2.0], mri_norm="zscore_nonzero", roi=[32, 32, 32])
    recipe = write_cfg(raw, tmp_path / "down.yaml")
    res = cli("finetune", "--cfg", str(recipe), "--encoder", str(run), "--run-dir", str(tmp_path / "strict"),
                  "--strict-plan")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("sslkit: error:")]
    assert len(err) == 1
    assert "data.spacing: [3.0, 3.0, 3.0] -> [2.0, 2.0, 2.0]" in err[0]
    assert 'data.mri_norm: "percentile" -> "zscore_nonzero"' in err[0] and "--strict-plan" in err[0]
    assert not (tmp_path / "strict").exists()  # refused before anything was written

    res = cli("finetune", "--cfg", str(recipe), "--encoder", str(run), "--run-dir", str(tmp_path / "warned"),
                  "--no-progress", "--set", "train.max_steps=1", "--set", "train.val_every=1")
    assert res.returncode == 0, res.stderr[-3000:]
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(warn) == 1 and "data.spacing" in warn[0] and "data.mri_norm" in warn[0]
    used = yaml.safe_load((tmp_path / "warned" / "config.yaml").read_text(encoding="utf-8"))
    assert used["data"]["spacing"] == [2.0, 2.0, 2.0]  # the recipe wins, and said so


# ------------------------------------------------------------------------------------------ one run layer


def test_fine_tuning_refuses_a_used_run_directory_and_a_failed_run_leaves_nothing(demo_dir, tmp_path):
    import nibabel as nib
    import numpy as np

    raw = _downstream_raw(demo_dir, spacing=[4.0, 4.0, 4.0], roi=[32, 32, 32], modality="mri")
    raw["model"] = {"name": "qt_unet", "args": {"variant": "tiny", "window_size": 4}}
    raw["train"].update(max_steps=1, val_every=1)
    recipe = write_cfg(raw, tmp_path / "r.yaml")
    res = cli("finetune", "--cfg", str(recipe), "--run-dir", str(tmp_path / "ft"), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    kept = {p: p.read_bytes() for p in (tmp_path / "ft").rglob("*") if p.is_file()}
    res = cli("finetune", "--cfg", str(recipe), "--run-dir", str(tmp_path / "ft"))
    assert res.returncode == 2 and "already holds a run with checkpoints" in res.stderr and "--resume auto" in res.stderr
    assert all(p.read_bytes() == b for p, b in kept.items())

    # a label on another grid: one line naming both files, and no run directory left behind
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), str(tmp_path / "im.nii.gz"))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), shifted), str(tmp_path / "lb.nii.gz"))
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "im.nii.gz", "label": "lb.nii.gz"}],
                                                    "validation": [{"image": "im.nii.gz", "label": "lb.nii.gz"}]}))
    bad = dict(raw, data={"root": str(tmp_path / "list.json"), "roi": [16, 16, 16], "spacing": []})
    res = cli("finetune", "--cfg", str(write_cfg(bad, tmp_path / "bad.yaml")), "--run-dir", str(tmp_path / "x"))
    assert res.returncode == 2, res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("sslkit: error:")][0]
    assert "lb.nii.gz" in line and "im.nii.gz" in line and "affine" in line
    assert not (tmp_path / "x").exists()


def test_device_picker_is_one_line_in_both_loops(demo_dir, scan_cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache), tmp_path / "c.yaml")
    for cmd in (["pretrain", "--cfg", str(cfg)],
                ["finetune", "--cfg", str(REPO / "downstream" / "demo_mni_gm_wm.yaml")]):
        res = cli(*cmd, "--set", "train.device=cuda", "--run-dir", str(tmp_path / cmd[0]))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "train.device: cuda asked for" in res.stderr
        assert not (tmp_path / cmd[0]).exists()


# ------------------------------------------------------------------------------------------ one vocabulary


def test_both_schemas_share_their_sections_and_check_enumerations_on_read():
    from sslkit.config import (
        Config,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        PreprocessConfig,
        TrainConfig,
        config_from_dict,
    )
    from sslkit.downstream.config import DownstreamConfig, downstream_config_from_dict
    from sslkit.errors import ConfigError

    def types(cls):
        return {f.name: f.type for f in dataclasses.fields(cls)}

    pre, down = types(Config), types(DownstreamConfig)
    for name, cls in (("model", ModelConfig), ("logging", LoggingConfig)):
        assert pre[name] in (cls, cls.__name__) and down[name] in (cls, cls.__name__)
    import sslkit.config as C
    import sslkit.downstream.config as DC

    assert pre["optim"] in (OptimConfig, "OptimConfig") and issubclass(DC.FinetuneOptimConfig, OptimConfig)

    assert issubclass(C.PretrainTrainConfig, TrainConfig) and issubclass(DC.FinetuneTrainConfig, TrainConfig)
    assert issubclass(C.DataConfig, PreprocessConfig) and issubclass(DC.DownstreamDataConfig, PreprocessConfig)
    shared = {f.name for f in dataclasses.fields(PreprocessConfig)}
    assert {"modality", "spacing", "intensity_range", "mri_norm", "crop_foreground", "roi"} <= shared
    for build in (config_from_dict, downstream_config_from_dict):
        with pytest.raises(ConfigError, match="optim.name: 'adamm' is not one of adamw, adam, sgd; did you mean"):
            build({"optim": {"name": "adamm"}})
        with pytest.raises(ConfigError, match="optim.schedule"):
            build({"optim": {"schedule": "linear"}})
        with pytest.raises(ConfigError, match="data.mri_norm"):
            build({"data": {"mri_norm": "nonzero"}})
        with pytest.raises(ConfigError, match="optim.lr: must be positive"):
            build({"optim": {"lr": -1e-3}})
    with pytest.raises(ConfigError, match="unknown config key 'data.in_channels'"):
        downstream_config_from_dict({"data": {"in_channels": 2}})


def test_model_and_objective_options_fail_before_any_scan_is_read(demo_dir, tmp_path):
    cache = tmp_path / "cache"
    raw = tiny_raw(demo_dir, cache)
    cases = [("model.args.feature_sizee=12", "feature_sizee"), ("objectives.0.hiden_dim=8", "hiden_dim"),
             ("train.micro_batch_size=1", "BatchNorm")]
    for override, needle in cases:
        cur = dict(raw, objectives=[dict(raw["objectives"][0], head_norm="batch")])
        cfg = write_cfg(cur, tmp_path / "c.yaml")
        res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", override)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert not cache.exists() and not (tmp_path / "run").exists()  # no scan was preprocessed


# ------------------------------------------------------------------------------------------ imports


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sslkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sslkit") and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module_graph() -> dict[str, set[str]]:
    pkg = REPO / "sslkit"
    mods = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in pkg.rglob("*.py")}
    return {m: {i for i in _imports_of(p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycles_and_packages_import_only_those_above_them():
    graph = _module_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    order = ["data", "models", "objectives", "monitor", "engine", "downstream"]  # DESIGN.md: each may import above
    for m, deps in graph.items():
        parts = m.split(".")
        if len(parts) < 3 or parts[1] not in order:
            continue
        for d in deps:
            dp = d.split(".")
            if len(dp) >= 3 and dp[1] in order:
                assert order.index(dp[1]) <= order.index(parts[1]), f"{m} imports {d}"


# ------------------------------------------------------------------------------------------ CPA resume


def test_cpa_generator_is_per_rank_and_a_resumed_run_equals_an_uninterrupted_one(demo_dir, scan_cache, tmp_path):
    from sslkit.config import config_from_dict
    from sslkit.engine.trainer import pretrain

    raw = tiny_raw(demo_dir, scan_cache, train={"max_steps": 3, "ckpt_every": 1},
                   data={"roi": [32, 32, 16]},
                   model={"name": "punet", "args": {"channels": [8, 8, 16, 16, 32], "num_heads": 2,
                                                    "window_size": [4, 4, 4], "num_classes": 2,
                                                    "default_classes": [0]}},
                   objectives=[{"name": "cpa", "tau": 0.99, "proto_grid": 2}])
    full = pretrain(config_from_dict(raw), tmp_path / "full", progress=False)
    assert full.steps == 3
    rank0 = tmp_path / "full" / "checkpoints" / "step_00000002" / "rank0.safetensors"
    from safetensors.torch import load_file

    assert any(k.startswith("gen.") for k in load_file(str(rank0)))  # the CPA generator's state is saved
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000001", part / "checkpoints" / "step_00000001")
    pretrain(config_from_dict(raw), part, resume="auto", progress=False)
    s_full, t_full = ckpt_tensors(tmp_path / "full", 3)
    s_res, t_res = ckpt_tensors(part, 3)
    assert max_abs_diff(s_full, s_res) == 0.0 and max_abs_diff(t_full, t_res) == 0.0


# ------------------------------------------------------------------------------------------ newcomer friction


def test_every_cli_option_has_help():
    import argparse

    from sslkit.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction):
                yield path, action

    missing = [f"{' '.join(p)} {a.dest}" for p, a in walk(build_parser(), ["sslkit"]) if not a.help]
    assert not missing, missing


def test_commands_say_what_a_newcomer_needs(pretrained, tmp_path, demo_dir, scan_cache):
    run, _ = pretrained
    for cmd in (["evaluate", str(run)], ["compare", str(run), str(run)]):
        res = cli(*cmd)
        assert res.returncode == 2 and "a pretraining run" in res.stderr and "sslkit finetune" in res.stderr
    # a relative datalist that does not exist says how to make one
    raw = tiny_raw(demo_dir, scan_cache, data={"datalist": "demo_data/datalist.json"})
    res = cli("pretrain", "--cfg", str(write_cfg(raw, tmp_path / "c.yaml")), "--run-dir", str(tmp_path / "r"),
                  cwd=tmp_path)
    assert res.returncode == 2 and "sslkit data demo" in res.stderr and "--set data.datalist=" in res.stderr
    # start-up chatter of third-party libraries is silenced (a child process: import-time output shows only there)
    res = run_cli("pretrain", "--cfg", str(write_cfg(tiny_raw(demo_dir, scan_cache, train={"max_steps": 1}),
                                                     tmp_path / "one.yaml")),
                  "--run-dir", str(tmp_path / "one"), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    noise = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert not noise, noise
