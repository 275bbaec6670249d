"""Collapse monitoring: metric functions, alarms, the Monitor, TensorBoard, and the dashboard in Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sslkit.config import AlarmConfig, Config, MonitorConfig
from sslkit.monitor import (
    AlarmEvent,
    Monitor,
    default_alarms,
    effective_rank,
    embedding_std,
    mean_pairwise_cosine,
    probe_statistics,
    teacher_student_cosine,
    write_html,
)
from sslkit.monitor.dashboard import JsonlTail, RunData, columns_of, make_server

REPO = Path(__file__).resolve().parents[1]
# screenshots for people to look at: a temporary folder unless SSLKIT_TEST_ARTIFACTS names one
ARTIFACTS = Path(os.environ["SSLKIT_TEST_ARTIFACTS"]) if os.environ.get("SSLKIT_TEST_ARTIFACTS") else None


# ------------------------------------------------------------------------------------------ metrics


def test_effective_rank_known_rank():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 5, generator=g, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(64, 5, generator=g, dtype=torch.float64))
    assert effective_rank(q @ r.T) == pytest.approx(5.0, abs=1e-3)          # 5 equal singular values
    low = torch.randn(200, 5, generator=g) @ torch.randn(5, 64, generator=g)  # rank 5, unequal values
    assert 3.5 < effective_rank(low) <= 5.0 + 1e-3
    iso = torch.randn(512, 64, generator=g)
    assert effective_rank(iso) > 0.9 * 64
    assert effective_rank(torch.ones(32, 16)) == pytest.approx(1.0, abs=1e-3)


def test_embedding_std_constant_and_isotropic():
    assert embedding_std(torch.full((16, 32), 3.0)) == pytest.approx(0.0, abs=1e-6)
    z = torch.randn(2048, 512, generator=torch.Generator().manual_seed(1))
    assert embedding_std(z) == pytest.approx(1.0, abs=0.03)
    assert math.isnan(embedding_std(torch.randn(1, 8)))


def test_mean_cosine_and_teacher_student():
    row = torch.randn(1, 24)
    assert mean_pairwise_cosine(row.repeat(10, 1)) == pytest.approx(1.0, abs=1e-6)
    z = torch.randn(1024, 256, generator=torch.Generator().manual_seed(2))
    assert abs(mean_pairwise_cosine(z)) < 0.02
    assert mean_pairwise_cosine(torch.stack([row[0], -row[0]])) == pytest.approx(-1.0, abs=1e-6)
    assert teacher_student_cosine(z, 2 * z) == pytest.approx(1.0, abs=1e-6)
    assert teacher_student_cosine(z, -z) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError):
        teacher_student_cosine(z, z[:3])


def test_spatial_embeddings_are_pooled():
    z = torch.randn(6, 8, 3, 3, 3)
    assert embedding_std(z) == pytest.approx(embedding_std(z.flatten(2).mean(-1)), abs=1e-6)


# ------------------------------------------------------------------------------------------ alarms


def _mon(tmp_path, alarms, bank_size=32, **kw) -> Monitor:
    return Monitor(MonitorConfig(bank_size=bank_size, alarms=alarms, **kw), tmp_path)


def _alarm_lines(run_dir: Path) -> list[dict]:
    text = (run_dir / "alarms.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("action", ["warn", "stop", "stop_keep_healthy"])
def test_alarm_patience_fires_once_per_streak(tmp_path, action):
    mon = _mon(tmp_path, [AlarmConfig(metric="embedding_std", below=0.1, patience=3, action=action)])
    values = [0.5, 0.05, 0.05, 0.5, 0.05, 0.05, 0.05, 0.05, 0.05, 0.9, 0.01, 0.01, 0.01]
    fired = {}
    for step, v in enumerate(values):
        for ev in mon.check_alarms(step, {"monitor/embedding_std": v, "loss": 1.0}):
            fired[step] = ev
    # streak 1 has 2 steps (no alarm); streak 2 fires on its 3rd step (6) once; streak 3 fires at step 12
    assert sorted(fired) == [6, 12]
    ev = fired[6]
    assert isinstance(ev, AlarmEvent)
    assert (ev.metric, ev.value, ev.threshold, ev.action, ev.since_step) == (
        "monitor/embedding_std", 0.05, 0.1, action, 4)
    assert ev.stops == (action != "warn")
    assert "embedding_std" in ev.message
    lines = _alarm_lines(tmp_path)
    assert [line["step"] for line in lines] == [6, 12]
    assert lines[0]["action"] == action
    assert mon.last_healthy_step == 9


def test_alarm_above_and_engine_metrics(tmp_path):
    mon = _mon(tmp_path, [AlarmConfig(metric="grad_norm", above=100.0, patience=1, action="stop"),
                          AlarmConfig(metric="mean_cosine", above=0.9, patience=2, action="warn")])
    assert mon.check_alarms(0, {"grad_norm": 5.0, "monitor/mean_cosine": 0.95}) == []
    evs = mon.check_alarms(1, {"grad_norm": 500.0, "monitor/mean_cosine": 0.97})
    assert [(e.metric, e.action) for e in evs] == [("grad_norm", "stop"), ("monitor/mean_cosine", "warn")]
    # a missing or NaN metric neither advances nor resets a streak
    mon2 = _mon(tmp_path / "b", [AlarmConfig(metric="embedding_std", below=0.1, patience=2)])
    assert mon2.check_alarms(0, {"monitor/embedding_std": 0.0}) == []
    assert mon2.check_alarms(1, {"monitor/embedding_std": float("nan")}) == []
    assert len(mon2.check_alarms(2, {"monitor/embedding_std": 0.0})) == 1


def test_nonfinite_loss_is_always_recorded(tmp_path):
    """The engine skips (or stops on) a non-finite step itself (train.nonfinite); the alarm log records it."""
    mon = _mon(tmp_path, [], enabled=False)   # even with monitoring disabled
    assert mon.check_alarms(0, {"loss": 1.0}) == []
    evs = mon.check_alarms(1, {"loss": 1.0, "loss/byol": torch.tensor(float("nan"))})  # tensors are fine too
    assert len(evs) == 1 and evs[0].action == "warn" and not evs[0].stops and evs[0].metric == "loss/byol"
    assert mon.check_alarms(2, {"loss": float("inf")}) == []   # same streak: written once
    lines = _alarm_lines(tmp_path)
    assert len(lines) == 1 and lines[0]["value"] == "nan" and lines[0]["action"] == "warn"


def test_nan_embeddings_never_enter_the_bank(tmp_path):
    mon = _mon(tmp_path, [])
    z = torch.randn(8, 16)
    z[3] = float("nan")
    mon.observe(z)
    m = mon.end_step(1)
    assert m["monitor/nonfinite_embeddings"] == 1.0 and mon.bank.shape == (7, 16)
    assert all(math.isfinite(v) for k, v in m.items())
    evs = mon.check_alarms(1, m)
    assert any(e.metric == "monitor/nonfinite_embeddings" for e in evs)
    mon.observe(torch.full((4, 16), float("nan")))
    assert "monitor/embedding_std" in mon.end_step(2)  # the bank of finite rows still gives statistics


def test_default_alarms_and_bad_rules(tmp_path):
    rules = default_alarms()
    assert {r.metric for r in rules} >= {"embedding_std", "rankme_ratio"}
    assert all(r.action in ("warn", "stop", "stop_keep_healthy") for r in rules)
    assert _mon(tmp_path, []).alarms.rules == rules   # empty list -> defaults
    with pytest.raises(ValueError, match="threshold"):
        _mon(tmp_path, [AlarmConfig(metric="x")])


# ------------------------------------------------------------------------------------------ monitor


def test_bank_rolls_and_metrics(tmp_path):
    mon = _mon(tmp_path, [], bank_size=20)
    assert mon.end_step(0, {}) == {}                  # nothing observed
    g = torch.Generator().manual_seed(3)
    for step in range(1, 5):
        for _ in range(2):                            # two micro-batches per step
            z = torch.randn(4, 16, generator=g)
            mon.observe(z, z + 0.01 * torch.randn(4, 16, generator=g))
        m = mon.end_step(step, {"loss": 1.0})
        assert mon.bank.shape == (min(8 * step, 20), 16)
    assert mon.bank.shape[0] == 20
    assert torch.equal(mon.bank[-4:], z)              # newest rows last
    keys = {"monitor/embedding_std", "monitor/rankme", "monitor/rankme_ratio", "monitor/mean_cosine",
            "monitor/teacher_student_cos"}
    assert keys <= set(m) and all(math.isfinite(m[k]) for k in keys)
    assert m["monitor/teacher_student_cos"] > 0.99
    assert m["monitor/rankme_ratio"] == pytest.approx(m["monitor/rankme"] / 16)
    mon.observe(torch.ones(3, 16), None)              # a collapsed step still counts within the bank
    assert "monitor/teacher_student_cos" not in mon.end_step(5, {})


def test_state_dict_round_trip(tmp_path):
    cfg_alarm = [AlarmConfig(metric="embedding_std", below=0.5, patience=3)]
    mon = _mon(tmp_path, cfg_alarm, bank_size=8)
    for step in range(2):
        mon.observe(torch.ones(4, 6) + 1e-3 * torch.randn(4, 6))
        mon.check_alarms(step, mon.end_step(step, {}))
    state = mon.state_dict()
    state = torch.load(_save(state, tmp_path / "s.pt"), weights_only=True)   # survives a checkpoint file
    json.dumps(state["alarms"])
    mon2 = _mon(tmp_path, cfg_alarm, bank_size=8)
    mon2.load_state_dict(state)
    assert torch.equal(mon2.bank, mon.bank)
    mon2.observe(torch.ones(4, 6))
    evs = mon2.check_alarms(2, mon2.end_step(2, {}))  # third violating step in a row -> fires after resume
    assert len(evs) == 1 and evs[0].since_step == 0


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


class TinyEncoder(nn.Module):
    """Two 'stages'; BatchNorm and Dropout make eval mode observable; `frozen` is kept in eval on purpose."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.deep = nn.Sequential(nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.Dropout(0.5))
        self.frozen = nn.Identity()
        self.frozen.eval()

    def forward(self, x):
        a = self.bn(self.stem(x))
        return [a, self.frozen(self.deep(a))]


def test_probe_restores_modes_and_is_deterministic(tmp_path):
    torch.manual_seed(0)
    enc = TinyEncoder().train()
    enc.frozen.eval()
    crops = torch.randn(5, 1, 8, 8, 8)
    mon = _mon(tmp_path, [])
    p1 = mon.probe(enc, crops, step=10)
    assert enc.training and enc.bn.training and not enc.frozen.training
    p2 = mon.probe(enc, crops, step=20)
    assert {"probe/spread", "probe/centred_rankme", "probe/centred_rankme_ratio"} <= set(p1)
    assert p2["probe/drift_cos"] == pytest.approx(1.0, abs=1e-5)    # eval mode: same crops, same output
    assert probe_statistics(enc, crops)["probe/centred_rankme"] == pytest.approx(p1["probe/centred_rankme"], rel=1e-5)


# ------------------------------------------------------------------------------------------ dashboard

STEPS = 50


def make_run(run_dir: Path, steps: int = STEPS, collapse_from: int | None = 25, seed: int = 0) -> Path:
    """A realistic run dir: metrics.jsonl from a real Monitor on synthetic embeddings that collapse late."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.monitor = MonitorConfig(bank_size=64, alarms=[
        AlarmConfig(metric="embedding_std", below=0.1, patience=3, action="warn"),
        AlarmConfig(metric="mean_cosine", above=0.95, patience=4, action="stop_keep_healthy")])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    mon = Monitor(cfg.monitor, run_dir)
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, 32, generator=g)
    probe_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    probe_crops = torch.randn(6, 1, 64, generator=g)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            a = 0.0 if collapse_from is None else min(1.0, max(0.0, (step - collapse_from) / 12))
            for _ in range(2):
                noise = torch.randn(8, 32, generator=g)
                z = (1 - a) * noise + a * centre + 1e-4 * noise
                mon.observe(z, z + 0.3 * torch.randn(8, 32, generator=g))
            warm = min(1.0, step / 10)
            byol = (2.0 - 0.3 * seed) * math.exp(-step / (15 + 10 * seed)) + 0.05 * float(torch.rand(1, generator=g))
            rot = 1.386 * math.exp(-step / 30) + 0.03 * float(torch.rand(1, generator=g))
            extra = {"step": step, "micro_step": 2 * step, "epoch": step // 10, "lr": 1e-4 * warm *
                     0.5 * (1 + math.cos(math.pi * step / steps)), "loss": byol + rot, "loss/byol": byol,
                     "loss/rotation": rot, "ema_tau": 1 - 0.004 * (math.cos(math.pi * step / steps) + 1) / 2,
                     "ema_updates": step, "samples_per_s": 30 + 3 * float(torch.rand(1, generator=g)),
                     "time": 0.7 * step, "grad_norm": 2.0 * math.exp(-step / 40)}
            metrics = {**extra, **mon.end_step(step, extra)}
            if step % 10 == 0:
                with torch.no_grad():   # the encoder drifts a little between probes
                    probe_net[1].weight.add_(0.2 * a * torch.randn(16, 64, generator=g))
                metrics.update(mon.probe(probe_net, probe_crops, step))
            mon.check_alarms(step, metrics)
            f.write(json.dumps(metrics) + "\n")
    return run_dir


def test_run_data_payload_and_tail(tmp_path):
    run = make_run(tmp_path / "runA")
    data = RunData([tmp_path]).payload(live=True)   # a folder of runs
    (r,) = data["runs"]
    assert r["name"] == "runA" and r["n_steps"] == STEPS and len(r["columns"]["loss/byol"]) == STEPS
    assert r["alarms"] and r["alarm_rules"][0]["metric"] == "embedding_std"
    assert "swin_unetr" in r["config_name"] and "byol" in r["config_name"]
    # NaN in metrics becomes null (valid JSON for the browser); a half-written line waits
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 51, "loss": float("nan")}) + "\n" + '{"step": 52, "lo')
    tail = JsonlTail(run / "metrics.jsonl")
    assert len(tail.read()) == 51
    assert columns_of(tail.read())["loss"][-1] is None
    json.dumps(RunData([run]).payload(live=True), allow_nan=False)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not on PATH (apt-get install chromium)")
    return exe


def run_chromium(target: str, tmp_path: Path, *extra: str) -> str:
    """Headless Chromium on `target`; returns stdout (the DOM with --dump-dom)."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *extra, target]
    out = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def chart_points(dom: str) -> dict[str, int]:
    """{data-metric: data-points} of every chart <svg> in a rendered DOM."""
    out = {}
    for tag in re.findall(r"<svg\b[^>]*>", dom):
        pts = re.search(r'data-points="(\d+)"', tag)
        key = re.search(r'data-metric="([^"]+)"', tag)
        if pts and key:
            out[key.group(1)] = int(pts.group(1))
    return out


EVERY_STEP = ["loss", "loss/byol", "loss/rotation", "monitor/embedding_std", "monitor/rankme",
              "monitor/rankme_ratio", "monitor/mean_cosine", "monitor/teacher_student_cos", "lr", "ema_tau",
              "samples_per_s"]


def test_dashboard_html_in_chromium(tmp_path):
    _chromium()
    run = make_run(tmp_path / "byol_collapsing")
    page = write_html([run], tmp_path / "report.html")
    html = page.read_text(encoding="utf-8")
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org", "")
    dom = run_chromium(page.as_uri(), tmp_path, "--dump-dom")
    pts = chart_points(dom)
    for key in EVERY_STEP:
        assert pts.get(key) == STEPS, (key, pts.get(key))
    assert pts["probe/centred_rankme"] == STEPS // 10
    assert dom.count('class="alarm-row"') == len(_alarm_lines(run)) > 0
    assert "alarm-marker" in dom and "band band-good" in dom and "byol_collapsing" in dom

    # a screenshot with two runs overlaid, for people to look at
    make_run(tmp_path / "byol_healthy", collapse_from=None, seed=1)
    both = write_html([tmp_path / "byol_healthy", run], tmp_path / "both.html")
    shot = (ARTIFACTS or tmp_path) / "dashboard.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    run_chromium(both.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1440,2300",
                 "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 20_000
    split = chart_points_all(run_chromium(both.as_uri() + "#split", tmp_path, "--dump-dom"))
    assert split.count(("loss/byol", STEPS)) == 2           # side by side: one chart per run


def chart_points_all(dom: str) -> list[tuple[str, int]]:
    """(data-metric, data-points) of every chart <svg>, repeats kept."""
    tags = re.findall(r'<svg\b[^>]*data-points="(\d+)"[^>]*data-metric="([^"]+)"', dom)
    return [(key, int(n)) for n, key in tags]


def test_dashboard_served_live_in_chromium(tmp_path):
    _chromium()
    run = make_run(tmp_path / "runs" / "live_run")
    server = make_server([tmp_path / "runs"], port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        first = json.load(urllib.request.urlopen(url + "data.json", timeout=10))
        assert first["runs"][0]["n_steps"] == STEPS
        dom = run_chromium(url, tmp_path, "--virtual-time-budget=5000", "--dump-dom")
        pts = chart_points(dom)
        assert pts.get("loss/byol") == STEPS and pts.get("monitor/embedding_std") == STEPS
        assert "live_run" in dom
        # the run goes on: new lines show up in the next poll
        with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": STEPS + 1, "loss": 0.1, "loss/byol": 0.05}) + "\n")
        again = json.load(urllib.request.urlopen(url + "data.json", timeout=10))
        assert again["runs"][0]["n_steps"] == STEPS + 1
        assert urllib.request.urlopen(url, timeout=10).read().startswith(b"<!DOCTYPE html>")
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_main_writes_html_and_names_bad_paths(tmp_path, capsys):
    from sslkit.errors import UserError
    from sslkit.monitor import dashboard_main

    run = make_run(tmp_path / "r", steps=5)
    assert dashboard_main([run], port=0, html_out=tmp_path / "out" / "d.html") == 0
    html = (tmp_path / "out" / "d.html").read_text(encoding="utf-8")
    assert '"n_steps":5' in html and "__SSLKIT" not in html          # data embedded, placeholders filled
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(UserError, match="no_such_run"):
        dashboard_main([tmp_path / "no_such_run"], port=0, html_out=tmp_path / "x.html")
    with pytest.raises(UserError, match="no run directories"):
        dashboard_main([tmp_path / "out"], port=0, html_out=tmp_path / "x.html")


def _add_task_probe(run_dir: Path, every: int = 10) -> dict:
    """Task-probe rows as a run with monitor.task_probe writes them: the step-0 row with both references, then the
    probe every `every` steps. Returns the reference values."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    refs = {"task_probe/ref_random/dice_mean": 0.46, "task_probe/ref_intensity/dice_mean": 0.21,
            "task_probe/ref_random/dice/frontal": 0.55, "task_probe/ref_intensity/dice/frontal": 0.40}
    zero = {"step": 0, "task_probe/dice_mean": 0.46, "task_probe/dice/frontal": 0.55, **refs}
    for r in rows:
        if r["step"] % every == 0:
            r.update({"task_probe/dice_mean": 0.46 + 0.002 * r["step"], "task_probe/dice/frontal": 0.55 + 0.001 * r["step"]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [zero, *rows]), encoding="utf-8")
    return refs


def test_dashboard_task_probe_panel_in_chromium(tmp_path):
    """The task-probe panel: probe Dice over steps with the random-init and intensity-only lines, per class too."""
    _chromium()
    run = make_run(tmp_path / "byol_probe", collapse_from=None, seed=2)
    refs = _add_task_probe(run)
    page = write_html([run], tmp_path / "probe.html")
    dom = run_chromium(page.as_uri(), tmp_path, "--dump-dom")
    pts = chart_points(dom)
    assert pts["task_probe/dice_mean"] == STEPS // 10 + 1 and pts["task_probe/dice/frontal"] == STEPS // 10 + 1
    assert "Task probe: does the encoder separate your labels?" in dom
    lines = re.findall(r'<line[^>]*class="reference"[^>]*data-label="([^"]+)"', dom)
    assert lines.count("random init") == 2 and lines.count("intensity only") == 2    # mean and per-class charts
    labels = re.findall(r'class="reference-label"[^>]*>([^<]+)<', dom)
    assert f"intensity only {refs['task_probe/ref_intensity/dice_mean']}" in labels
    assert "probe Dice" in dom                                                   # the run card's figure
    shot = (ARTIFACTS or tmp_path) / "dashboard_task_probe.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    run_chromium(page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1440,1300", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 20_000
