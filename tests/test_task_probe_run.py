"""The task probe inside pretraining runs: its rows, the untouched training trajectory, resume, checkpoint selection
by probe Dice, the refusal at start, and the exported plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ckpt_tensors, cli, max_abs_diff, tiny_raw, write_cfg
from sslkit import run as R
from sslkit.config import config_from_dict
from sslkit.engine.trainer import pretrain
from sslkit.errors import ConfigError

CLASSES = ("grey_matter", "white_matter")


@pytest.fixture(scope="module")
def probe_json(demo_dir, tmp_path_factory) -> Path:
    """The MNI152 T1 with its grey / white matter map: one labelled scan, so its two x-halves are train / val."""
    d = tmp_path_factory.mktemp("probe")
    doc = {"training": [{"image": str(demo_dir / "mri_mni152_t1.nii.gz"), "label": str(demo_dir / "mri_mni152_gmwm.nii.gz"),
                         "modality": "mri"}], "labels": {"0": "background", "1": CLASSES[0], "2": CLASSES[1]}}
    path = d / "probe.json"
    path.write_text(json.dumps(doc))
    return path


def _raw(demo_dir, cache, probe_json, steps=3, **train):
    return tiny_raw(demo_dir, cache, train={"max_steps": steps, **train},
                    monitor={"bank_size": 64, "task_probe": {"datalist": str(probe_json), "every": 1, "crops": 2,
                                                             "voxels": 4000}})


def _rows(run_dir: Path) -> list[dict]:
    return R.read_jsonl(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def probed(demo_dir, scan_cache, probe_json, tmp_path_factory):
    """Three steps with the task probe at every step, then the same run without it, through the CLI in this process
    (the run without the probe comes second: what the probe left behind in the process must not reach it)."""
    root = tmp_path_factory.mktemp("runs")
    raw_off = _raw(demo_dir, scan_cache, probe_json)
    raw_off["monitor"].pop("task_probe")
    for name, raw in (("on", _raw(demo_dir, scan_cache, probe_json)), ("off", raw_off)):
        res = cli("pretrain", "--cfg", str(write_cfg(raw, root / f"{name}.yaml")), "--run-dir", str(root / name),
                  "--no-progress")
        assert res.returncode == 0, res.stderr[-3000:]
    return root / "on", root / "off"


def test_probe_rows_and_references(probed):
    on, _ = probed
    rows = _rows(on)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    zero = rows[0]
    for prefix in ("task_probe/", "task_probe/ref_random/", "task_probe/ref_intensity/"):
        assert 0.0 <= zero[f"{prefix}dice_mean"] <= 1.0
        assert {f"{prefix}dice/{c}" for c in CLASSES} <= set(zero)
    assert zero["task_probe/ref_random/dice_mean"] == zero["task_probe/dice_mean"]  # step 0 is the random encoder
    # grey / white matter is an intensity task: intensity filters alone, and a random encoder's features, separate it
    # well above chance (about 1/3 per class for three balanced classes; 0.58 and 0.64 here at 3 mm, 32^3 crops)
    assert zero["task_probe/ref_intensity/dice_mean"] > 0.45 and zero["task_probe/ref_random/dice_mean"] > 0.45
    for r in rows[1:]:
        assert 0.0 <= r["task_probe/dice_mean"] <= 1.0 and "task_probe/ref_random/dice_mean" not in r
    # the trackers get the same scalars (TensorBoard by default; every backend logs the row: tests/test_trackers.py)
    from test_trackers import tensorboard_scalars

    scalars, _ = tensorboard_scalars(on / "tb")
    assert [s for s, _ in scalars["task_probe/dice_mean"]] == [0, 1, 2, 3]
    assert scalars["task_probe/ref_intensity/dice_mean"] == [(0, pytest.approx(zero["task_probe/ref_intensity/dice_mean"]))]


def test_probe_leaves_the_training_trajectory_bitwise_unchanged(probed):
    on, off = probed
    losses = lambda d: [r["loss"] for r in _rows(d) if r["step"] > 0]  # noqa: E731
    assert losses(on) == losses(off)
    s_on, t_on = ckpt_tensors(on, 3)
    s_off, t_off = ckpt_tensors(off, 3)
    assert max_abs_diff(s_on, s_off) == 0.0 and max_abs_diff(t_on, t_off) == 0.0


def test_best_probe_checkpoint_is_kept_selected_and_exported(probed, tmp_path, capsys):
    from sslkit.cli import main
    from sslkit.engine.export import resolve_encoder, select_checkpoint
    from sslkit.plan import read_plan

    on, _ = probed
    rows = _rows(on)
    best = max(rows[1:], key=lambda r: r["task_probe/dice_mean"])["step"]
    state = json.loads((on / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    assert state["best"]["step"] == best and state["best"]["checkpoint"] == R.step_dir_name(best)
    assert select_checkpoint(on, "best-probe").name == R.step_dir_name(best)
    assert resolve_encoder(f"{on}@best-probe") == str(on / "checkpoints" / R.step_dir_name(best))
    assert main(["export", "--run-dir", str(on), "--select", "best-probe", "--out", str(tmp_path / "e.safetensors")]) == 0
    plan = read_plan(tmp_path / "e.safetensors")
    assert plan["source"]["step"] == best
    assert plan["task_probe"]["best"]["step"] == best
    assert plan["task_probe"]["references"]["intensity"] == rows[0]["task_probe/ref_intensity/dice_mean"]
    final = read_plan(on / "encoder.safetensors")
    assert final["task_probe"]["last"]["step"] == 3
    capsys.readouterr()
    assert main(["export", "--run-dir", str(probed[1]), "--select", "best-probe", "--out", str(tmp_path / "x.st")]) == 2
    assert "no best-probe checkpoint" in capsys.readouterr().err


def test_pruning_keeps_the_best_probe_checkpoint_and_resume_keeps_history(demo_dir, scan_cache, probe_json,
                                                                          tmp_path, monkeypatch):
    from sslkit.monitor import task_probe

    figures = iter([0.10, 0.50, 0.30, 0.20, 0.10, 0.05])  # step 0, then steps 1..5: the best is step 1

    def scripted(self, encoder, prefix=task_probe.PREFIX):
        v = next(figures)
        return {f"{prefix}dice_mean": v, **{f"{prefix}dice/{c}": v for c in CLASSES}}

    monkeypatch.setattr(task_probe.TaskProbe, "measure", scripted)
    raw = _raw(demo_dir, scan_cache, probe_json, steps=3, keep_last=1)
    pretrain(config_from_dict(raw), tmp_path / "run", progress=False)
    raw["train"]["max_steps"] = 5
    pretrain(config_from_dict(raw), tmp_path / "run", resume="auto", progress=False)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["task_probe/dice_mean"] for r in rows] == [0.10, 0.50, 0.30, 0.20, 0.10, 0.05]
    state = json.loads((tmp_path / "run" / "checkpoints" / R.step_dir_name(5) / "trainer.json").read_text())
    assert state["best"] == {"step": 1, "value": 0.5, "checkpoint": R.step_dir_name(1)}
    kept = {p.name for p in R.list_checkpoints(tmp_path / "run" / "checkpoints")}
    # keep_last 1: the newest, the best-probe one and the last healthy one survive pruning, nothing else
    assert kept == {R.step_dir_name(5), R.step_dir_name(1)} | ({state["healthy"]} if state["healthy"] else set())


def test_a_probe_that_cannot_run_is_refused_before_the_corpus_is_prepared(demo_dir, probe_json, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": str(demo_dir / "mri_mni152_t1.nii.gz")}]}))
    raw = _raw(demo_dir, tmp_path / "store", bad)
    with pytest.raises(ConfigError, match="needs 'image' and 'label'"):
        pretrain(config_from_dict(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    assert not (tmp_path / "run").exists()
