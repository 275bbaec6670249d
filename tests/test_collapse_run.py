"""Issue 5 end to end: a deliberately collapsing BYOL run trips the alarm and stops, keeping the last
healthy checkpoint; the same recipe with a predictor and a slow teacher raises no alarm."""

from __future__ import annotations

import json

import pytest

from conftest import cli, tiny_raw, write_cfg

ALARM = {"metric": "embedding_std", "below": 0.1, "patience": 3, "action": "stop_keep_healthy"}


def _raw(demo_dir, scan_cache, byol: dict, lr: float) -> dict:
    raw = tiny_raw(demo_dir, scan_cache, train={"max_steps": 10, "ckpt_every": 1, "keep_last": 2},
                   optim={"name": "sgd", "lr": lr, "betas": [0.9, 0.999]},
                   monitor={"bank_size": 8, "alarms": [ALARM]})
    raw["objectives"][0].update(byol)
    return raw


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def collapse_and_healthy(demo_dir, scan_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("collapse")
    runs = {}
    for name, byol, lr in (("collapse", {"use_predictor": False, "tau_base": 0.0, "tau_schedule": "constant"}, 0.5),
                           ("healthy", {"use_predictor": True, "tau_base": 0.99}, 0.05)):
        cfg = write_cfg(_raw(demo_dir, scan_cache, byol, lr), root / f"{name}.yaml")
        res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(root / name))
        runs[name] = (root / name, res)
    return runs


def test_collapsing_run_stops_and_keeps_last_healthy_checkpoint(collapse_and_healthy):
    run_dir, res = collapse_and_healthy["collapse"]
    assert res.returncode == 3, res.stderr[-2000:]  # stopped by an alarm
    alarms = [json.loads(x) for x in (run_dir / "alarms.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(alarms) == 1 and alarms[0]["action"] == "stop_keep_healthy"
    fired, since = alarms[0]["step"], alarms[0]["since_step"]
    assert fired <= 9 and fired == since + ALARM["patience"] - 1
    m = _metrics(run_dir)
    assert m[-1]["step"] == fired  # the run ended at the alarm
    assert m[-1]["monitor/embedding_std"] < 0.1 and m[-1]["monitor/mean_cosine"] > 0.9
    healthy = (run_dir / "checkpoints" / "last_healthy").read_text(encoding="utf-8").strip()
    assert healthy == f"step_{since - 1:08d}"  # the checkpoint just before the streak began
    assert (run_dir / "checkpoints" / healthy / "HEALTHY").is_file()
    assert m[since - 2]["monitor/embedding_std"] >= 0.1  # it really was healthy then
    assert "ALARM" in res.stderr and "stop_keep_healthy" in res.stderr
    assert not (run_dir / "encoder.safetensors").exists()


def test_healthy_run_raises_no_alarm(collapse_and_healthy):
    run_dir, res = collapse_and_healthy["healthy"]
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run_dir / "alarms.jsonl").read_text(encoding="utf-8") == ""
    m = _metrics(run_dir)
    assert len(m) == 10 and min(x["monitor/embedding_std"] for x in m) >= 0.1


def test_probe_command_on_a_checkpoint(collapse_and_healthy):
    run_dir, _ = collapse_and_healthy["healthy"]
    res = cli("probe", str(run_dir))
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads(res.stdout)
    assert stats["checkpoint"].endswith("step_00000010")
    assert 0.0 < stats["probe/spread"] and stats["probe/centred_rankme"] >= 1.0
