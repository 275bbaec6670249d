"""Probe set and badge agree: stratified probe windows, probe statistics valid for backbone features, and one
verdict per run on the dashboard (computed in Python, shown by the page)."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.config import DataConfig, MonitorConfig
from sslkit.data.probe import crops_per_volume, distinct_windows, probe_windows, start_ranges
from sslkit.monitor.alarms import HEALTH_BANDS, default_alarms
from sslkit.monitor.dashboard import RunData, columns_of, metric_health, run_verdict, write_html
from sslkit.monitor.metrics import collapse_statistics
from sslkit.monitor.monitor import Monitor, probe_embeddings
from sslkit.monitor.probe_stats import probe_feature_statistics, relative_spread

SHAPES = [(113, 117, 80), (91, 108, 89), (73, 91, 78)]   # the demo scans at 2 mm (X, Y, Z)
ROI = (48, 48, 48)


# ------------------------------------------------------------------------------------------ probe windows


def test_probe_windows_are_deterministic_and_seeded():
    a = probe_windows(SHAPES, ROI, 8, seed=0)
    assert a == probe_windows(SHAPES, ROI, 8, seed=0)
    assert a != probe_windows(SHAPES, ROI, 8, seed=1)
    assert len(a) == 8 and all(len(starts) == 3 for _, starts in a)


def test_probe_windows_cover_every_volume_and_every_stratum():
    windows = probe_windows(SHAPES, ROI, 8, seed=0)
    counts = [sum(v == i for v, _ in windows) for i in range(3)]
    assert counts == [3, 3, 2]                         # round-robin, the largest volume (0) first
    for vol, shape in enumerate(SHAPES):
        starts = [s for v, s in windows if v == vol]
        hi = start_ranges(shape, ROI)
        k = len(starts)
        for axis in range(3):
            assert all(0 <= s[axis] <= hi[axis] for s in starts)
            strata = {min(k - 1, int(s[axis] * k / (hi[axis] + 1))) for s in starts}
            assert len(strata) == k, (vol, axis, starts)   # one crop per stratum on every axis
        assert len(set(starts)) == k


def test_probe_windows_spread_further_than_centre_crops():
    """Mean distance between same-volume windows: stratified windows reach well away from the centre, where
    the old jittered centre crops stayed within roi/8 of it."""
    windows = probe_windows(SHAPES, ROI, 8, seed=0)
    dists = [math.dist(a, b) for (va, a), (vb, b) in combinations(windows, 2) if va == vb]
    centre_jitter_bound = 2 * math.sqrt(3) * (ROI[0] // 8)       # farthest two jittered centre crops can be
    assert np.mean(dists) > centre_jitter_bound


def test_probe_windows_small_volumes_and_2d():
    # a volume smaller than the roi has one distinct window: it gets one crop while another volume has room
    assert distinct_windows((40, 40, 40), ROI) == 1
    assert crops_per_volume([(40, 40, 40), (100, 100, 100)], ROI, 4) == [1, 3]
    # every volume full: duplicates are unavoidable but the count is still honoured
    assert crops_per_volume([(40, 40, 40)], ROI, 3) == [3]
    # 2-D: the slice axis is a window of size 1, so starts[2] is an axial slice spread over the volume
    w = probe_windows([(100, 100, 60)], (48, 48), 6, seed=2)
    slices = sorted(s[2] for _, s in w)
    assert len(set(slices)) == 6 and all(0 <= z <= 59 for z in slices)
    assert slices[0] < 10 and slices[-1] > 49
    with pytest.raises(ValueError):
        probe_windows([(10, 10)], ROI, 2, seed=0)


# ------------------------------------------------------------------------------------------ probe statistic


def test_relative_spread_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 7, generator=g) + 3.0
    zn = z.double().numpy()
    m = zn.mean(0)
    expected = math.sqrt(((zn - m) ** 2).sum(1).mean() / (zn ** 2).sum(1).mean())
    assert relative_spread(z) == pytest.approx(expected, rel=1e-12)
    assert relative_spread(z.double() * 1e4) == pytest.approx(expected, rel=1e-9)        # scale-free
    assert relative_spread(z[:1].repeat(5, 1)) == 0.0                           # all rows equal
    assert relative_spread(z - z.mean(0)) == pytest.approx(1.0)                 # zero-mean rows
    stats = probe_feature_statistics(z)
    assert stats["probe/centred_rankme_ratio"] == pytest.approx(stats["probe/centred_rankme"] / 7)  # min(N-1, D)


@pytest.fixture(scope="module")
def probe_batch(demo_dir, scan_cache):
    """8 real probe crops (32^3) of the 3 demo scans, placed by probe_windows on the prepared volumes."""
    from sslkit.data import PretrainDataset, load_datalist

    cfg = DataConfig(modality="ct", roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0], crops_per_volume=2)
    ds = PretrainDataset(load_datalist(demo_dir / "datalist.json"), cfg, scan_cache, seed=0)
    ds.prepare(progress=False)
    shapes = [tuple(v["shape"][1:]) for v in ds.volumes]                   # (C, X, Y, Z) -> (X, Y, Z)
    roi = [32, 32, 32]
    crops = [ds.store.read_crop(ds.volumes[vol]["key"], list(starts), roi)   # (1, 32, 32, 32), zero-padded
             for vol, starts in probe_windows(shapes, roi, 8, seed=0)]
    return torch.from_numpy(np.stack(crops))                      # (8, 1, 32, 32, 32)


def tiny_swin():
    from sslkit.models import build_encoder

    torch.manual_seed(0)
    return build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=12, depths=[1, 1, 1, 1])


class OneDirection(torch.nn.Module):
    """Dimensional collapse: an encoder's pooled features projected on one direction through a fixed point."""

    def __init__(self, encoder, point, direction):
        super().__init__()
        self.encoder, self.point, self.direction = encoder, point, direction

    def forward(self, x):
        f = self.encoder(x)[-1].flatten(2).mean(-1)                              # (B, C)
        return [self.point + ((f - self.point) @ self.direction)[:, None] * self.direction]


def input_ignored(encoder):
    """Complete collapse: the patch embedding's weights zeroed, so no voxel reaches the features."""
    out = copy.deepcopy(encoder)
    for name, p in out.named_parameters():
        if "patch_embed" in name and name.endswith("weight"):
            p.data.zero_()
    return out


def input_weakened(encoder, factor=1e-3):
    """Near collapse: the input reaches the features `factor` times weaker than in `encoder`."""
    out = copy.deepcopy(encoder)
    for name, p in out.named_parameters():
        if "patch_embed" in name and name.endswith("weight"):
            p.data.mul_(factor)
    return out


def test_probe_statistic_separates_a_real_encoder_from_collapsed_ones(probe_batch):
    spread_band = next(b for b in HEALTH_BANDS if b.key == "probe/spread")
    rank_band = next(b for b in HEALTH_BANDS if b.key == "probe/centred_rankme")
    encoder = tiny_swin()
    f = probe_embeddings(encoder, probe_batch)                                   # (8, 192)
    healthy = probe_feature_statistics(f)
    assert not spread_band.is_collapsed(healthy["probe/spread"]) and healthy["probe/spread"] > 2 * spread_band.below
    assert not rank_band.is_collapsed(healthy["probe/centred_rankme"])
    # the statistic the probe used to report calls this same working encoder collapsed: the bug of issue 12
    assert collapse_statistics(f, prefix="")["mean_cosine"] > 0.9

    ignored = probe_feature_statistics(probe_embeddings(input_ignored(encoder), probe_batch))
    assert ignored["probe/spread"] == 0.0
    weak = probe_feature_statistics(probe_embeddings(input_weakened(encoder), probe_batch))
    assert spread_band.is_collapsed(weak["probe/spread"])
    # centred rank alone would miss that one: the tiny input-driven part still varies in many directions
    assert not rank_band.is_collapsed(weak["probe/centred_rankme"])
    fd = f.double()
    direction = torch.linalg.svd(fd - fd.mean(0), full_matrices=False)[2][0].float()
    one_dir = probe_feature_statistics(probe_embeddings(OneDirection(encoder, f.mean(0), direction), probe_batch))
    assert rank_band.is_collapsed(one_dir["probe/centred_rankme"])
    assert not spread_band.is_collapsed(one_dir["probe/spread"])


# ------------------------------------------------------------------------------------------ one verdict


def test_default_alarms_are_the_bands():
    rules = {r.metric: r for r in default_alarms()}
    for band in HEALTH_BANDS:
        rule = rules[band.alarm_metric]
        assert (rule.below, rule.above, rule.action) == (band.below, band.above, "warn")
        key = band.alarm_metric if "/" in band.alarm_metric else f"monitor/{band.alarm_metric}"
        assert key == band.key


def _run(steps=4, **last) -> dict:
    """Columns of a run whose bank metrics are healthy; `last` overrides values of the final step."""
    records = [{"step": s, "loss": 1.0, "monitor/embedding_std": 0.8, "monitor/rankme_ratio": 0.4,
                "monitor/mean_cosine": 0.1} for s in range(1, steps + 1)]
    records[1].update({"probe/spread": 0.3, "probe/centred_rankme": 3.0})
    records[-1].update(last)
    return columns_of(records)


def test_verdict_is_not_healthy_while_any_band_is_red():
    rules = [dict(vars(r)) for r in default_alarms()]
    assert run_verdict(_run(), [], rules)["status"] == "healthy"
    for band in HEALTH_BANDS:
        bad = band.below - 0.01 if band.below is not None else band.above + 0.01
        cols = _run(**{band.key: bad})
        assert metric_health({band.key: bad})[band.key] == "collapsed"
        verdict = run_verdict(cols, [], rules)
        assert verdict["status"] == "warn", band.key
        assert any(band.key in r for r in verdict["reasons"])


def test_verdict_uses_the_latest_probe_and_the_run_rules():
    # the probe is logged only every few steps: its last value counts until the next probe
    cols = _run(steps=6)
    cols["probe/spread"][3] = 0.01
    assert run_verdict(cols, [], [])["status"] == "warn"
    cols["probe/spread"][5] = 0.3
    assert run_verdict(cols, [], [])["status"] == "healthy"
    # a recipe's own rule: a value past its dashed line is a reason too, before the alarm's patience runs out
    rule = {"metric": "embedding_std", "below": 0.9, "above": None, "patience": 50, "action": "stop"}
    v = run_verdict(_run(), [], [rule])
    assert v["status"] == "warn" and "monitor/embedding_std" in v["reasons"][0]
    stop = {"step": 3, "metric": "loss", "value": "nan", "threshold": None, "action": "stop",
            "message": "step 3: loss is nan (non-finite loss); stopping"}
    assert run_verdict(_run(), [stop], [])["status"] == "stopped"
    assert run_verdict(columns_of([]), [], [])["status"] == "waiting"


def test_old_raw_probe_metrics_no_longer_draw_a_red_band():
    """The README symptom: raw probe std 0.06-0.08, cosine 0.99, rank 1.4-1.5 (the README run at steps 40-120).
    Those keys have no band, so a run that logs them (older runs) is not painted red under a healthy badge, and
    the new statistics carry new names, so old raw values are never judged by the new thresholds."""
    cols = _run(**{"probe/embedding_std": 0.06, "probe/mean_cosine": 0.99, "probe/rankme": 1.44,
                   "probe/rankme_ratio": 0.18})
    assert run_verdict(cols, [], [dict(vars(r)) for r in default_alarms()])["status"] == "healthy"
    raw_keys = {"probe/embedding_std", "probe/mean_cosine", "probe/rankme", "probe/rankme_ratio"}
    assert {b.key for b in HEALTH_BANDS}.isdisjoint(raw_keys)
    assert set(probe_feature_statistics(torch.randn(8, 16))).isdisjoint(raw_keys)


@pytest.fixture(scope="module")
def collapsed_probe_run(tmp_path_factory, probe_batch) -> Path:
    """A run directory written by a real Monitor with the default alarms: healthy bank metrics, and a probe of
    an encoder that ignores its input at step 4."""
    run = tmp_path_factory.mktemp("runs") / "probe_collapsed"
    mon = Monitor(MonitorConfig(bank_size=64), run)
    (run / "config.yaml").write_text("name: probe_collapsed\n", encoding="utf-8")
    ignored = input_ignored(tiny_swin())
    g = torch.Generator().manual_seed(0)
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, 7):
            mon.observe(torch.randn(16, 32, generator=g))
            metrics = {"step": step, "loss": 1.0 / step, **mon.end_step(step)}
            if step == 4:
                metrics.update(probe_feature_statistics(probe_embeddings(ignored, probe_batch)))
            mon.check_alarms(step, metrics)
            f.write(json.dumps(metrics) + "\n")
    return run


def test_collapsed_probe_fires_the_default_alarm_and_the_badge(collapsed_probe_run):
    events = [json.loads(x) for x in (collapsed_probe_run / "alarms.jsonl").read_text().splitlines()]
    assert [(e["step"], e["metric"]) for e in events] == [(4, "probe/spread")]
    (run,) = RunData([collapsed_probe_run]).payload(live=False)["runs"]
    assert run["verdict"]["status"] == "warn" and run["health"]["probe/spread"] == "collapsed"
    assert run["health"]["monitor/embedding_std"] == "healthy"


def test_page_shows_the_python_verdict(collapsed_probe_run, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not on PATH")
    page = write_html([collapsed_probe_run], tmp_path / "page.html")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=120).stdout
    card = re.search(r'<div class="run-card"[^>]*data-verdict="(\w+)"[^>]*>.*?<span class="badge (\w+)"[^>]*>([^<]+)<',
                     dom, re.S)
    assert card is not None, dom[-2000:]
    assert card.groups() == ("warn", "warn", "warning")
    spread_chart = re.search(r'<div class="chart" data-metric="probe/spread">.*?</svg>', dom, re.S).group(0)
    assert "band band-bad" in spread_chart
