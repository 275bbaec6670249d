"""`sslkit study`: the grid, the statistics (a bootstrap interval against its hand-computed value), and a tiny real
study on the MNI slab demo that is stopped mid-way and resumed without redoing finished cells."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.downstream import study as S

# ------------------------------------------------------------------------------------------ statistics


def test_bootstrap_interval_equals_the_hand_computed_quantiles():
    # Two paired differences a < b: a resample of two draws has mean a (probability 1/4), (a + b)/2 (1/2) or b
    # (1/4). The 2.5 % and 97.5 % quantiles of 10,000 resample means therefore sit inside the blocks of a and b,
    # the 40 % / 60 % quantiles inside the middle block.
    a, b = -0.02, 0.05
    assert S.bootstrap_ci([a, b], 0.95) == (a, b)
    assert S.bootstrap_ci([a, b], 0.20) == pytest.approx(((a + b) / 2, (a + b) / 2))
    # Three differences: the all-minimum resample has probability 1/27 = 3.7 % > 2.5 %, so the 95 % interval is
    # [min, max]; here all three are positive, so the difference is beyond noise.
    d = [0.03, 0.01, 0.08]
    assert S.bootstrap_ci(d) == pytest.approx((0.01, 0.08))
    # the 2.5 % .. 97.5 % range of the exact bootstrap distribution of 4 values (4^4 = 256 equally likely
    # resamples, enumerated by hand in numpy) matches the Monte Carlo interval to within one resample step
    v = np.array([0.0, 0.1, 0.2, 1.0])
    grid = np.stack(np.meshgrid(*[v] * 4, indexing="ij"), -1).reshape(-1, 4).mean(1)
    exact = np.quantile(grid, [0.025, 0.975])
    lo, hi = S.bootstrap_ci(v)
    assert abs(lo - exact[0]) <= 0.025 + 1e-9 and abs(hi - exact[1]) <= 0.025 + 1e-9
    assert S.bootstrap_ci(v, seed=3) == S.bootstrap_ci(v, seed=3)          # seeded


def test_paired_differences_pair_by_seed_and_say_when_within_noise():
    rows = [{"encoder": e, "budget": b, "seed": s, "mean_dice": d} for e, b, s, d in [
        ("scratch", 1, 0, 0.50), ("scratch", 1, 1, 0.60), ("scratch", 1, 2, 0.70),
        ("byol", 1, 0, 0.55), ("byol", 1, 1, 0.62), ("byol", 1, 2, 0.74),     # every seed better
        ("scratch", 2, 0, 0.80), ("scratch", 2, 1, 0.82),
        ("byol", 2, 0, 0.79), ("byol", 2, 1, 0.85), ("byol", 2, 2, 0.90)]]  # seed 2 has no scratch pair
    d1, d2 = S.paired_differences(rows)
    assert (d1.encoder, d1.budget, d1.seeds) == ("byol", 1, [0, 1, 2])
    assert d1.diffs == pytest.approx([0.05, 0.02, 0.04]) and d1.mean == pytest.approx(0.11 / 3)
    assert d1.ci == pytest.approx((0.02, 0.05)) and not d1.within_noise
    assert "beyond noise" in d1.sentence("labelled") and "better" in d1.sentence("labelled")
    assert d2.seeds == [0, 1] and d2.diffs == pytest.approx([-0.01, 0.03])
    assert d2.within_noise and "within noise" in d2.sentence("labelled")
    m, s, n = S.mean_std([0.5, 0.6, 0.7])
    assert (m, n) == (pytest.approx(0.6), 3) and s == pytest.approx(0.1)  # sample std, ddof = 1


def test_grid_order_cell_keys_and_arguments():
    cells = S.study_grid(["byol", "mg"], True, [1, 3], [0, 1])
    assert [c.name for c in cells[:4]] == ["scratch/b1_s0", "byol/b1_s0", "mg/b1_s0", "scratch/b1_s1"]
    assert len(cells) == 12
    raw = {"data": {"root": "x"}, "train": {"max_steps": 5}}
    r = S.cell_recipe(raw, S.Cell("byol", 3, 2), n_train=6)
    assert r["data"] == {"root": "x", "num_labelled": 3, "split_seed": 2} and r["train"]["seed"] == 2
    assert raw == {"data": {"root": "x"}, "train": {"max_steps": 5}}       # the study's recipe is not changed
    assert S.cell_recipe(raw, S.Cell("byol", 6, 0), n_train=6)["data"]["num_labelled"] == 0  # all cases
    assert S.parse_int_list("1, 3,5", "--budgets") == [1, 3, 5]
    assert S.parse_encoders(["byol=runs/a", "mg=b.safetensors"]) == {"byol": "runs/a", "mg": "b.safetensors"}
    from sslkit.errors import ConfigError

    for bad in (lambda: S.parse_int_list("1,1", "--budgets"), lambda: S.parse_int_list("a", "--seeds"),
                lambda: S.parse_encoders(["scratch=x"]), lambda: S.parse_encoders(["noequals"]),
                lambda: S.parse_encoders(["a/b=x"])):
        with pytest.raises(ConfigError):
            bad()


def test_cli_parser_has_help_on_every_option():
    from sslkit.cli import build_parser, cmd_study

    parser = build_parser()
    p = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "study")[1]
    for action in p._actions:
        assert action.help, action.dest
    a = parser.parse_args(["study", "--cfg", "r.yaml", "--encoder", "b=x", "--scratch", "--budgets", "1,2",
                           "--out", "o", "--set", "train.max_steps=3", "--schedule", "f=adapt.warmup_frozen_steps=2"])
    assert a.func is cmd_study and a.encoder == ["b=x"] and a.seeds == "0,1,2"
    assert a.overrides == ["train.max_steps=3"] and a.jobs == 1
    assert S.parse_schedules(a.schedule + ["plain=", "ld=optim.layer_decay=0.5,adapt.encoder_lr_scale=0.2"]) == {
        "f": ["adapt.warmup_frozen_steps=2"], "plain": [],
        "ld": ["optim.layer_decay=0.5", "adapt.encoder_lr_scale=0.2"]}
    from sslkit.errors import ConfigError

    for bad in (["noequals"], ["x=novalue"], ["a=k=1", "a=k=2"]):
        with pytest.raises(ConfigError):
            S.parse_schedules(bad)


def test_mean_ranks_and_probe_agreement_by_hand():
    means = {("scratch", 1): 0.50, ("byol", 1): 0.70, ("mg", 1): 0.60,
             ("scratch", 2): 0.80, ("byol", 2): 0.78, ("mg", 2): 0.79}
    rows = [{"encoder": a, "budget": b, "seed": s, "mean_dice": m + 0.01 * (s - 1)}
            for (a, b), m in means.items() for s in (0, 1, 2)]
    # budget 1: byol 1, mg 2, scratch 3; budget 2: scratch 1, mg 2, byol 3
    assert S.mean_ranks(rows) == {"byol": 2.0, "mg": 2.0, "scratch": 2.0}
    agree = S.probe_agreement(rows, {"scratch": 0.1, "mg": 0.2, "byol": 0.3})
    assert agree.per_budget == {1: pytest.approx(1.0), 2: pytest.approx(-1.0)} and agree.mean == pytest.approx(0.0)
    assert S.probe_agreement(rows, {"byol": 0.3, "mg": 0.2}) is None   # two arms: no ranking to compare


def test_probe_ranks_arms_by_gain_over_their_own_random_line():
    """Two encoders whose plans probe at different levels (0.55 and 0.44 for a random encoder): the one that gained
    more over its own random line ranks first, whatever its raw Dice; scratch gains 0."""
    from sslkit.downstream.study.report import arm_probe_gain

    facts = {"byol": {"probe_dice": 0.551, "probe_random": 0.549}, "dino": {"probe_dice": 0.445, "probe_random": 0.435},
             "other": {"probe_dice": None, "probe_random": None}}
    assert arm_probe_gain("byol", facts) == pytest.approx(0.002)
    assert arm_probe_gain("dino+warm", facts) == pytest.approx(0.010)
    assert arm_probe_gain("scratch", facts) == 0.0 and arm_probe_gain("other", facts) is None
    rows = [{"encoder": a, "budget": 1, "seed": 0, "mean_dice": d} for a, d in (("scratch", 0.40), ("byol", 0.41),
                                                                                ("dino", 0.45))]
    gains = {a: arm_probe_gain(a, facts) for a in ("scratch", "byol", "dino")}
    assert S.probe_agreement(rows, gains).per_budget == {1: pytest.approx(1.0)}
    raw = {"scratch": 0.549, "byol": 0.551, "dino": 0.445}
    assert S.probe_agreement(rows, raw).per_budget == {1: pytest.approx(-0.5)}


# ------------------------------------------------------------------------------------------ a tiny real study


def _tiny_encoder(path: Path) -> Path:
    """A random tiny QT-UNet encoder (seeded) saved with its plan: MRI percentile scaling at 4 mm, 32^3 crops."""
    from sslkit.config import PreprocessConfig
    from sslkit.models.registry import build_encoder
    from sslkit.plan import make_plan, preprocessing_plan, write_weights

    args = {"variant": "tiny", "window_size": 4}
    torch.manual_seed(11)
    enc = build_encoder("qt_unet", spatial_dims=3, in_channels=1, **args)
    with torch.no_grad():
        feats = enc(torch.zeros(1, 1, 32, 32, 32))
    strides = [[32 // f.shape[-1]] * 3 for f in feats]
    prep = preprocessing_plan(PreprocessConfig(modality="mri", spacing=[4.0, 4.0, 4.0], roi=[32, 32, 32]), 3, 1,
                              slices=False)
    plan = make_plan("qt_unet", args, prep, enc.feature_channels, strides,
                     corpus={"scans": 1, "modalities": {"mri": 1}})
    return write_weights(path, enc.state_dict(), plan)


def _tiny_recipe(path: Path, datalist: Path) -> Path:
    import yaml

    raw = {"data": {"layout": "datalist", "root": str(datalist), "task": "slabs", "num_classes": 3,
                    "label_names": ["grey_matter", "white_matter"], "modality": "mri", "samples_per_volume": 2,
                    "flip_prob": 0.0, "rot90_prob": 0.0},
           "train": {"max_steps": 2, "val_every": 2, "threads": 1, "sw_overlap": 0.0, "ckpt_every": 1},
           "optim": {"lr": 0.001}}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


class _StopAtOnce:
    """StopSignals as if SIGTERM arrived before the first step: finetune trains one step, checkpoints, returns."""

    def __init__(self, *a, **k):
        self.requested = "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.slow
def test_tiny_study_writes_its_report_and_resumes_without_redoing_finished_cells(demo_dir, tmp_path, monkeypatch,
                                                                                capsys):
    import matplotlib.image

    from sslkit import run as R
    from sslkit.data.demo import build_mni_slabs
    from sslkit.downstream import evaluate as E
    from sslkit.downstream import train as T

    datalist = build_mni_slabs(demo_dir)
    enc = _tiny_encoder(tmp_path / "enc.safetensors")
    recipe = _tiny_recipe(tmp_path / "study.yaml", datalist)
    out = tmp_path / "study"
    args = (recipe, {"rand": str(enc)}, True, [1, 2], [0, 1], out)

    calls: list[tuple[str, str | None, bool]] = []
    real_finetune, real_stop, real_evaluate = T.finetune, R.StopSignals, E.evaluate
    stop_once = ["rand/b1_s0"]

    def counting_finetune(recipe, run_dir, encoder_path=None, resume=None, **kw):
        name = str(Path(run_dir).relative_to(out))
        calls.append((name, resume, kw.get("scratch", False)))
        # the second cell is "killed" mid-run the first time: a stop request before its first step
        stop = name in stop_once
        if stop:
            stop_once.remove(name)
        monkeypatch.setattr(R, "StopSignals", _StopAtOnce if stop else real_stop)
        return real_finetune(recipe, run_dir, encoder_path=encoder_path, resume=resume, **kw)

    evaluated: list[str] = []

    def counting_evaluate(run_dir, *a, **k):
        evaluated.append(str(Path(run_dir).relative_to(out)))
        return real_evaluate(run_dir, *a, **k)

    monkeypatch.setattr(T, "finetune", counting_finetune)
    monkeypatch.setattr(E, "evaluate", counting_evaluate)
    first = S.run_study(*args, progress=False)
    assert first.stopped_by_signal == "SIGTERM" and [c[0] for c in calls] == ["scratch/b1_s0", "rand/b1_s0"]
    assert [r["run_dir"] for r in first.rows] == ["scratch/b1_s0"] and evaluated == ["scratch/b1_s0"]
    assert (out / "rand" / "b1_s0" / "checkpoints" / "step_00000001").is_dir()  # stopped after 1 step
    done = out / "scratch" / "b1_s0"
    stamps = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}

    calls.clear()
    evaluated.clear()
    capsys.readouterr()
    second = S.run_study(*args, progress=False)
    assert second.stopped_by_signal is None and len(second.rows) == 8
    assert "scratch/b1_s0" not in [c[0] for c in calls] and len(calls) == 7     # the finished cell is skipped
    assert "scratch/b1_s0" not in evaluated and len(evaluated) == 7
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()} == stamps
    for cell in S.study_grid(["rand"], True, [1, 2], [0, 1]):  # evaluated: the best model stays, checkpoints go
        assert (out / cell.name / "model.safetensors").is_file() and not (out / cell.name / "checkpoints").exists()
    assert all(resume == "auto" for _, resume, _ in calls)
    assert "resumed from" in capsys.readouterr().out                           # rand/b1_s0 continued at step 1
    steps = [r["step"] for r in R.read_jsonl(out / "rand" / "b1_s0" / "metrics.jsonl")]
    assert steps == [1, 2]
    assert {(c, s) for c, _, s in calls if c.startswith("scratch")} == {(c, True) for c, _, _ in calls
                                                                         if c.startswith("scratch")}

    # a third call finds nothing to do
    calls.clear()
    third = S.run_study(*args, progress=False)
    assert calls == [] and third.finished_now == 0 and len(third.rows) == 8

    # study.csv: one row per cell, values taken from each cell's evaluation
    with open(out / "study.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["encoder"] for r in rows} == {"scratch", "rand"}
    for r in rows:
        m = json.loads((out / r["run_dir"] / "eval" / "metrics.json").read_text())["summary"]
        assert float(r["mean_dice"]) == pytest.approx(m["mean_dice"], abs=5e-5)
        assert float(r["dice_grey_matter"]) == pytest.approx(m["per_class"]["grey_matter"]["dice"], abs=5e-5)
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
    # labelled subsets: nested across budgets for one seed, identical across encoders, `budget` slabs each
    cases = {(r["encoder"], int(r["budget"]), int(r["seed"])): r["train_cases"].split(";") for r in rows}
    for s in (0, 1):
        assert cases[("scratch", 1, s)] == cases[("rand", 1, s)] and cases[("scratch", 2, s)] == cases[("rand", 2, s)]
        assert len(cases[("rand", 1, s)]) == 1 and len(cases[("rand", 2, s)]) == 2
        assert set(cases[("rand", 1, s)]) < set(cases[("rand", 2, s)])
    # scratch follows the encoder's plan from random weights; the other arm loads the encoder
    import yaml

    used = yaml.safe_load((out / "scratch" / "b2_s1" / "config.yaml").read_text())
    assert used["model"]["name"] == "qt_unet" and used["data"]["spacing"] == [4.0, 4.0, 4.0]
    assert used["data"]["num_labelled"] == 2 and used["data"]["split_seed"] == 1 and used["train"]["seed"] == 1
    assert json.loads((out / "scratch" / "b2_s1" / "summary.json").read_text())["encoder"] is None
    assert json.loads((out / "rand" / "b2_s1" / "summary.json").read_text())["encoder"] == str(enc)

    # paired differences: recomputed from the csv
    by = {(r["encoder"], int(r["budget"]), int(r["seed"])): float(r["mean_dice"]) for r in rows}
    for d in third.differences:
        want = [by[("rand", d.budget, s)] - by[("scratch", d.budget, s)] for s in (0, 1)]
        assert d.seeds == [0, 1] and d.diffs == pytest.approx(want, abs=1e-4)
        assert d.ci == pytest.approx((min(want), max(want)), abs=1e-4)       # two values: the 95 % range

    md = (out / "study.md").read_text(encoding="utf-8")
    assert "±" in md and "## Paired difference to scratch" in md
    assert "![Dice against labelled volumes](study.png)" in md
    assert md.count("rand - scratch =") == 2 and ("within noise" in md or "beyond noise" in md)
    img = matplotlib.image.imread(out / "study.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0
    svg = ET.parse(out / "study.svg").getroot()
    assert svg.tag.endswith("svg")

    # two worker processes (--jobs 2, one cell each) give the same cells as one process did
    par = S.run_study(recipe, {"rand": str(enc)}, True, [1], [0], tmp_path / "par", progress=False, jobs=2)
    assert par.stopped_by_signal is None and par.finished_now == 2
    assert {(r["encoder"], r["mean_dice"]) for r in par.rows} == {(r["encoder"], r["mean_dice"]) for r in third.rows
                                                                    if r["budget"] == 1 and r["seed"] == 0}

    # the same folder with other weights under the same name is refused
    other = _tiny_encoder(tmp_path / "other.safetensors")
    from sslkit.plan import read_weights, write_weights

    t, plan = read_weights(other)
    write_weights(other, {k: v + 0.01 for k, v in t.items()}, plan)
    from sslkit.errors import UserError

    with pytest.raises(UserError, match="other weights"):
        S.run_study(recipe, {"rand": str(other)}, True, [1, 2], [0, 1], out, progress=False)


def _sigterm_when_a_cell_evaluates() -> None:
    """In the study's process: SIGTERM to itself as a cell's evaluation starts."""
    import os
    import signal

    from sslkit.downstream import evaluate as E

    real = E.evaluate

    def evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    E.evaluate = evaluate


def test_study_stopped_while_a_cell_evaluates_exits_75_with_its_report(demo_dir, tmp_path):
    """SIGTERM during a cell's evaluation: the evaluation ends, the report of the finished cells is written, the
    next cell never starts, exit 75 and one line saying how to continue."""
    from conftest import CliChild
    from sslkit.data.demo import build_mni_slabs

    enc = _tiny_encoder(tmp_path / "enc.safetensors")
    recipe = _tiny_recipe(tmp_path / "study.yaml", build_mni_slabs(demo_dir))
    out = tmp_path / "study"
    res = CliChild("study", "--cfg", str(recipe), "--encoder", f"rand={enc}", "--budgets", "1", "--seeds", "0,1",
                   "--out", str(out), "--no-progress", setup=_sigterm_when_a_cell_evaluates).finish(timeout=600)
    assert res.returncode == 75, res.stderr[-2000:]
    assert "study stopped by SIGTERM" in res.stderr and "run the same command again" in res.stderr
    assert (out / "rand" / "b1_s0" / "eval" / "metrics.json").is_file() and not (out / "rand" / "b1_s1").exists()
    assert "rand/b1_s0" in (out / "study.csv").read_text(encoding="utf-8")


def test_a_linear_head_arm_through_a_schedule(tmp_path):
    """`--schedule lh=adapt.mode=linear_head` adds, per encoder, the frozen-encoder arm that measures the encoder
    (a linear head in place of the decoder) beside its full fine-tune."""
    from sslkit.downstream.adapt import build_model
    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.downstream.study.grid import resolve_arms
    from sslkit.models.linear_head import LinearHeadSegmenter

    enc = _tiny_encoder(tmp_path / "enc.safetensors")
    raw = {"data": {"layout": "datalist", "root": str(tmp_path / "dl.json"), "num_classes": 3}}
    arms = resolve_arms(raw, {"rand": str(enc)}, True, S.parse_schedules(["full=", "lh=adapt.mode=linear_head"]))
    assert [a.name for a in arms] == ["scratch", "rand+full", "rand+lh"]
    modes = {a.name: a.config["adapt"]["mode"] for a in arms}
    assert modes == {"scratch": "full", "rand+full": "full", "rand+lh": "linear_head"}
    model = build_model(downstream_config_from_dict(arms[2].config))
    assert isinstance(model, LinearHeadSegmenter) and len(model.heads) == len(model.encoder.feature_channels)
