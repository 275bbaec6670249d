"""benchmarks/gpu.py, the one-call GPU benchmark (issue 24), in its CPU smoke mode: every row runs (the flex row
is skipped on the CPU), the table is printed and written as JSON."""

from __future__ import annotations

import importlib.util
import json
import sys

import torch

from conftest import REPO


def test_gpu_benchmark_smoke(tmp_path, capsys, monkeypatch, one_thread):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks itself up there
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec.loader.exec_module(bench)
    out = tmp_path / "table.json"
    torch._dynamo.reset()
    rows = bench.main(["--smoke", "--device", "cpu", "--json", str(out), "--budget-s", "3600"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["rows"]] == list(bench.ROWS) == [r.name for r in rows]
    for r in report["rows"]:
        if r["name"] == "qt_unet_b_flex+compile":
            assert r["status"].startswith("skipped: FlexAttention")
            continue
        assert r["status"] == "ok", r
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0 and r["tflop_per_step"] > 0
        assert (r["compile_s"] is not None) == r["name"].endswith("+compile")
    by = {r["name"]: r for r in report["rows"]}
    # the checkpointed row does the same model work (its recomputation is not model FLOPs)
    assert by["sslkit_ckpt"]["tflop_per_step"] == by["sslkit"]["tflop_per_step"]
    assert "sslkit / monai_ref:" in printed and "samples/s" in printed and report["info"]["smoke"] is True
