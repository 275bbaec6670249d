"""The shipped demo recipes of the contrastive and restoration objectives train on the demo corpus without a
collapse alarm, through `sslkit pretrain` with the recipe as written, up to and including their first probe of the
encoder (step 40), where earlier settings of these recipes raised the probe-spread alarm (BYOL 0.044, VoCo 0.043,
Models Genesis 0.006; the collapse threshold is 0.05)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, cli

FIRST_PROBE = 40


@pytest.mark.slow
@pytest.mark.parametrize("recipe,objective_key", [("demo_ct_byol", "byol/"), ("demo_voco", "voco/pred"),
                                                  ("demo_models_genesis", "models_genesis/input_mse")])
def test_demo_recipe_reaches_its_first_probe_without_an_alarm(demo_dir, tmp_path, recipe, objective_key):
    run, path = tmp_path / "run", REPO / "pretrain_configs" / f"{recipe}.yaml"
    # the task probe does not change the trajectory (tests/test_task_probe_run.py): left out here, as it costs time
    sets = [f"data.datalist={demo_dir / 'datalist.json'}", f"data.cache_dir={tmp_path / 'store'}",
            f"train.max_steps={FIRST_PROBE}", "train.threads=1", "monitor.task_probe.datalist=null"]
    res = cli("pretrain", "--cfg", str(path), "--run-dir", str(run), "--no-progress",
              *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == FIRST_PROBE and all(np.isfinite(r["loss"]) for r in rows)
    assert any(k.startswith(objective_key) for k in rows[-1])
    probe = rows[-1]
    assert probe["step"] == FIRST_PROBE and "probe/spread" in probe, "the recipe must probe at its first checkpoint"
    alarms = (run / "alarms.jsonl").read_text() if (run / "alarms.jsonl").exists() else ""
    print(f"{recipe}: loss first 5 {np.mean([r['loss'] for r in rows[:5]]):.4f} last 5 "
          f"{np.mean([r['loss'] for r in rows[-5:]]):.4f}; probe spread {probe['probe/spread']:.4f}, centred rankme "
          f"{probe['probe/centred_rankme']:.2f}; bank {({k: round(v, 3) for k, v in probe.items() if k.startswith('monitor/')})}")
    assert alarms == "", f"{recipe} raised alarms:\n{alarms}"
    assert probe["probe/spread"] >= 0.05 and probe["probe/centred_rankme"] >= 1.5
