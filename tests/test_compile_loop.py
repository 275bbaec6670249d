"""`train.compile` in the training loops (issue 24): the compiled pretraining step (encoder, objective heads and EMA
teacher compiled in place inside the DeepSpeed engine) gives eager's loss trajectory over 5 steps and checkpoints
with the same keys; inductor's caches default to ~/.cache/sslkit/inductor.

The runs compile with the aot_eager backend: dynamo and AOT autograd build the same forward and backward graphs
inductor would get, without generating code (a cold inductor compile of this step takes minutes on 2 CPU cores;
tests/test_compile.py runs inductor on one encoder, benchmarks/compile_step.py times it). Tolerance: 1e-4 relative
per step (measured: equal to 1e-6; the graphs may reorder float sums).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ckpt_tensors, max_abs_diff, tiny_raw

STEPS = 5


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_compiled_pretraining_step_follows_eager(demo_dir, scan_cache, tmp_path, monkeypatch, one_thread):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sslkit.config import config_from_dict
    from sslkit.engine import compile as compile_mod
    from sslkit.engine.trainer import pretrain

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for mode in ("off", "default"):
        raw = tiny_raw(demo_dir, scan_cache, train={"max_steps": STEPS, "ckpt_every": STEPS, "compile": mode})
        torch._dynamo.reset()
        counters.clear()
        pretrain(config_from_dict(raw), tmp_path / mode, progress=False)
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (mode == "default"), graphs  # encoder, heads, teacher: each traced once
    eager, compiled = _losses(tmp_path / "off"), _losses(tmp_path / "default")
    assert len(eager) == STEPS and eager[-1] < eager[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0.0)
    (s0, t0), (s1, t1) = ckpt_tensors(tmp_path / "off", STEPS), ckpt_tensors(tmp_path / "default", STEPS)
    assert s0.keys() == s1.keys() and t0.keys() == t1.keys()  # compiled in place: no _orig_mod. prefixes
    assert max_abs_diff(s0, s1) < 1e-4 and max_abs_diff(t0, t1) < 1e-4


def test_compiled_finetuning_step_follows_eager(tmp_path, monkeypatch, one_thread):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sslkit.downstream.train import finetune
    from sslkit.engine import compile as compile_mod
    from test_downstream import _tiny_cfg

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    losses = {}
    for mode in ("off", "default"):
        raw = _tiny_cfg(tmp_path)
        raw["train"].update({"max_steps": STEPS, "val_every": STEPS, "val_cases": 1, "threads": 1, "compile": mode})
        torch._dynamo.reset()
        counters.clear()
        finetune(raw, tmp_path / mode, progress=False)
        assert (counters["stats"]["unique_graphs"] > 0) == (mode == "default")
        losses[mode] = [r["loss"] for r in map(json.loads, (tmp_path / mode / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert len(losses["off"]) == STEPS
    torch.testing.assert_close(losses["default"], losses["off"], rtol=1e-4, atol=0.0)


def test_compile_mode_and_persistent_caches(monkeypatch, tmp_path):
    from sslkit.engine import compile as compile_mod
    from sslkit.engine.compile import compile_mode, use_persistent_caches

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) is None and compile_mode("auto", cuda) == "default"
    assert compile_mode("auto", cuda, zero_stage=3) is None and compile_mode("off", cuda) is None
    assert compile_mode("max-autotune", cpu) == "max-autotune"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_mod, "CACHE_DIR", tmp_path / "home" / ".cache" / "sslkit" / "inductor")
    assert use_persistent_caches() == compile_mod.CACHE_DIR
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compile_mod.CACHE_DIR)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert use_persistent_caches() == tmp_path / "mine"
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache


def test_compile_with_zero3_is_one_line(demo_dir, tmp_path):
    from sslkit.config import config_from_dict
    from sslkit.engine.trainer import check_buildable
    from sslkit.errors import ConfigError

    cfg = config_from_dict(tiny_raw(demo_dir, tmp_path, train={"zero_stage": 3, "compile": "default"}))
    with pytest.raises(ConfigError, match="train.compile: default needs train.zero_stage 0, 1 or 2"):
        check_buildable(cfg, torch.device("cpu"))
