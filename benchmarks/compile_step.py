"""sslkit's compiled SSL training step against MONAI's eager reference on this machine (issue 24), in one run.

Rows (steps of the rows alternate, so a machine shared with other jobs slows each alike):
  sslkit          the recipe's step as pretraining runs it (default pretrain_configs/demo_swin_unetr_ssl.yaml:
                  rotation, simclr and inpainting on the shared rot_cutout view, Swin-UNETR feature size 12, 32^3
                  crops, micro-batch 2): PretrainTask.optimizer_step + end_step, i.e. data loading from the prepared
                  store, the DeepSpeed engine, the fused optimizer, the EMA teachers and the monitor; train.compile off
  sslkit+compile  the same with train.compile: default (inductor: encoder, objective heads, EMA teachers in place)
  monai_ref       MONAI SwinTransformer (use_flash_attention=True: SDPA wherever MONAI takes it) + the same SSL heads and
                  losses in plain PyTorch (benchmarks/ssl_step_vs_monai.py), AdamW, eager, a synthetic batch in memory
                  (no data loading); the recipe's Swin-UNETR architecture, crop and batch
  qt_unet_b       QT-UNet-B encoder + byol, rotation, inpainting on rot_cutout (benchmarks/gpu.py's row), 64^3,
                  batch 2, synthetic batch, eager and compiled the way train.compile does it
Compile time = the first step's time minus a steady step's: cold (an empty inductor cache: a fresh folder unless
--cache-dir is given) and warm (a second process on the cache the first filled: what the next run of the same recipe
pays).

    python benchmarks/compile_step.py                       # demo corpus: /tmp/sslkit-test-demo or demo_data/
    python benchmarks/compile_step.py --skip-qt --skip-ref --recipe pretrain_configs/demo_ct_byol.yaml
CPU, fp32; the table and ratios go to stdout (and --json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "pretrain_configs" / "demo_swin_unetr_ssl.yaml"))
    p.add_argument("--demo-dir", default=None, help="demo corpus (default /tmp/sslkit-test-demo, else demo_data/)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row after the first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--qt-roi", type=int, default=64)
    p.add_argument("--qt-steps", type=int, default=3)
    p.add_argument("--skip-qt", action="store_true")
    p.add_argument("--skip-ref", action="store_true")
    p.add_argument("--cache-dir", default=None, help="inductor cache (default: a fresh folder: a cold compile)")
    p.add_argument("--json", default=None)
    p.add_argument("--warm-probe", action="store_true", help=argparse.SUPPRESS)  # the child that times a warm compile
    return p.parse_args(argv)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------ rows


class SSLKitRow:
    """A PretrainTask of the recipe (compile off / default); step() = optimizer_step + end_step."""

    def __init__(self, a, work: Path, compile_setting: str, stop):
        from sslkit import run as R
        from sslkit.config import load_config
        from sslkit.engine import distributed as D
        from sslkit.engine.loop import NonfinitePolicy
        from sslkit.engine.trainer import PretrainTask

        demo = Path(a.demo_dir or ("/tmp/sslkit-test-demo" if Path("/tmp/sslkit-test-demo").is_dir() else
                                   REPO / "demo_data"))
        cfg = load_config(a.recipe, [f"data.datalist={demo / 'datalist.json'}", f"data.cache_dir={work / 'store'}",
                                     f"train.compile={compile_setting}", f"train.threads={a.threads}",
                                     "train.ckpt_every=0", "monitor.task_probe.datalist=''", "monitor.probe_every=0"])
        device = D.pick_device(cfg.train.device)
        D.init_distributed(device)
        torch.set_num_threads(a.threads)
        self.run = R.RunDir.open(work / f"run-{compile_setting}", None, cfg.to_dict())
        self.task = PretrainTask(cfg, self.run, device, stop, a.recipe, progress=False)
        self.policy, self.n = NonfinitePolicy("skip"), 0
        self.batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        self.label = f"{cfg.model.name} {'+'.join(o['name'] for o in cfg.objectives)} {cfg.data.roi[0]}^3"

    def step(self) -> None:
        out = self.task.optimizer_step(self.policy)
        self.n += 1
        self.task.end_step(self.n, out)

    def close(self) -> None:
        self.run.close(True)


def monai_ref_row(cfg_recipe: str):
    """The MONAI reference step on the recipe's architecture, crop and batch (synthetic batch)."""
    import ssl_step_vs_monai as ref
    from monai.networks.nets.swin_unetr import WindowAttention

    from sslkit.config import load_config

    cfg = load_config(cfg_recipe)
    fs, roi, batch = cfg.model.args.get("feature_size", 48), cfg.data.roi[0], cfg.train.micro_batch_size
    model = ref.RefModel(fs)
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.use_flash_attention = True
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    data = {k: torch.rand((batch, 1, roi, roi, roi), generator=g) for k in ("image", "view1", "view2")}
    return (lambda: ref.ref_step(model, opt, data)), batch, f"MONAI SwinTransformer fs{fs} {roi}^3"


def qt_unet_row(roi: int, compiled: bool):
    from gpu import objective_step, ssl_batch

    from sslkit.engine.compile import compile_in_place, objective_heads, teacher_modules
    from sslkit.models import build_encoder
    from sslkit.objectives.composite import Composite

    torch.manual_seed(0)
    enc = build_encoder("qt_unet", spatial_dims=3, variant="base")
    comp = Composite.from_specs([
        {"name": "byol", "view": "rot_cutout", "plane": [0, 1], "hidden_dim": 4096, "out_dim": 256},
        {"name": "rotation", "view": "rot_cutout", "plane": [0, 1]},
        {"name": "inpainting", "view": "rot_cutout"},
    ], enc)
    if compiled:
        compile_in_place([enc, *objective_heads(comp), *teacher_modules(comp)], "default")
    opt = torch.optim.Adam(list(enc.parameters()) + list(comp.parameters()), lr=4e-5, fused=True)
    return objective_step(enc, comp, opt, ssl_batch(2, roi, torch.device("cpu"))), 2, f"QT-UNet-B byol+rotation+inpainting {roi}^3"


# ------------------------------------------------------------------------------------------------ timing


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_rows(rows: dict, warmup: int, steps: int) -> dict:
    """{name: {"first": s, "step": mean s}}: each row's first step, then warm-up and timed steps in turns."""
    out = {name: {"first": timed(fn)} for name, fn in rows.items()}
    for _ in range(warmup):
        for fn in rows.values():
            fn()
    times = {name: [] for name in rows}
    for _ in range(steps):
        for name, fn in rows.items():
            times[name].append(timed(fn))
    for name, ts in times.items():
        out[name]["step"] = sum(ts) / len(ts)
        out[name]["min"] = min(ts)
    return out


def warm_compile(a, cache: Path) -> dict:
    """A second process on the cache the first filled: its compiled row's first step and steady steps."""
    cmd = [sys.executable, __file__, "--warm-probe", "--recipe", a.recipe, "--threads", str(a.threads),
           "--cache-dir", str(cache)] + (["--demo-dir", a.demo_dir] if a.demo_dir else [])
    # the child is a process group of its own: not this one's rendezvous (its MASTER_PORT is taken by us)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("WARM ")]
    if res.returncode or not lines:
        return {"error": (res.stderr or res.stdout)[-2000:]}
    return json.loads(lines[-1][5:])


def warm_probe(a) -> None:
    from sslkit import run as R

    with tempfile.TemporaryDirectory() as tmp, R.StopSignals() as stop:
        row = SSLKitRow(a, Path(tmp), "default", stop)
        first = timed(row.step)
        steady = [timed(row.step) for _ in range(3)]
        row.close()
    print("WARM " + json.dumps({"first": first, "step": min(steady)}), flush=True)


def main(argv=None) -> dict:
    a = parse_args(argv)
    cache = Path(a.cache_dir or tempfile.mkdtemp(prefix="sslkit-inductor-cold-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    torch.set_num_threads(a.threads)
    if a.warm_probe:
        warm_probe(a)
        return {}
    from sslkit import run as R

    report = {"load_before": load(), "threads": a.threads, "recipe": a.recipe, "torch": torch.__version__}
    print(f"load average before: {report['load_before']}; {a.threads} threads; inductor cache {cache}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, R.StopSignals() as stop:
        eager, compiled = SSLKitRow(a, Path(tmp), "off", stop), SSLKitRow(a, Path(tmp), "default", stop)
        rows = {"sslkit": eager.step, "sslkit+compile": compiled.step}
        batch = {"sslkit": eager.batch, "sslkit+compile": compiled.batch}
        labels = {"sslkit": eager.label, "sslkit+compile": compiled.label}
        if not a.skip_ref:
            rows["monai_ref"], batch["monai_ref"], labels["monai_ref"] = monai_ref_row(a.recipe)
        res = run_rows(rows, a.warmup, a.steps)
        eager.close()
        compiled.close()
    if not a.skip_qt:
        qt = {}
        for name, flag in (("qt_unet_b", False), ("qt_unet_b+compile", True)):
            qt[name], batch[name], labels[name] = qt_unet_row(a.qt_roi, flag)
        res.update(run_rows(qt, 0, a.qt_steps))
    report["cold_compile_s"] = res["sslkit+compile"]["first"] - res["sslkit+compile"]["min"]
    report["warm"] = warm_compile(a, cache)
    if "first" in report["warm"]:
        report["warm_compile_s"] = report["warm"]["first"] - report["warm"]["step"]
    report["load_after"] = load()
    report["rows"] = {k: {**v, "samples_per_s": batch[k] / v["step"], "model": labels[k]} for k, v in res.items()}
    print_report(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def print_report(r: dict) -> None:
    print(f"{'row':<20} {'model':<52} {'s/step':>8} {'min s':>8} {'samples/s':>10} {'first s':>8}")
    for name, v in r["rows"].items():
        print(f"{name:<20} {v['model'][:52]:<52} {v['step']:8.3f} {v['min']:8.3f} {v['samples_per_s']:10.3f} "
              f"{v['first']:8.1f}")
    rows = r["rows"]
    for num, den in (("sslkit", "monai_ref"), ("sslkit+compile", "monai_ref"), ("sslkit+compile", "sslkit"),
                     ("qt_unet_b+compile", "qt_unet_b")):
        if num in rows and den in rows:
            print(f"{num} / {den}: {rows[num]['samples_per_s'] / rows[den]['samples_per_s']:.3f}x samples/s")
    print(f"compile time, sslkit step: cold {r['cold_compile_s']:.1f} s, warm "
          f"{r.get('warm_compile_s', float('nan')):.1f} s {'' if 'warm_compile_s' in r else r['warm']}")
    if "qt_unet_b+compile" in rows:
        q = rows["qt_unet_b+compile"]
        print(f"compile time, QT-UNet-B step: cold {q['first'] - q['min']:.1f} s")
    print(f"load average before {r['load_before']}, after {r['load_after']}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
