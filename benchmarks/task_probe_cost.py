"""What does the task probe cost a pretraining run? The same recipe with the probe off and on, in one process.

Runs the recipe twice as written (its checkpoint cadence included; store prepared beforehand, so neither run pays
for preprocessing the corpus), each from a fresh run directory, and prints the wall time of both, the probe's own
time (loading its scans once, every measurement and the two references, timed around them) and the ratio on / off. The default is the README's demo at its own cadence: BYOL on the demo
corpus, 120 steps, a probe at steps 0, 40, 80 and 120.

    python benchmarks/task_probe_cost.py                                   # the demo recipe as written
    python benchmarks/task_probe_cost.py --steps 60 --set monitor.task_probe.every=20   # shorter, same cadence
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _timed(cls, name: str, spent: list[float]):
    """Wrap cls.name (a class or a module) so each call's wall time is added to spent."""
    real = getattr(cls, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(cls, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default="pretrain_configs/demo_ct_byol.yaml", help="a recipe with monitor.task_probe")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from sslkit.config import load_config
    from sslkit.engine.trainer import pretrain
    from sslkit.monitor import task_probe

    overrides = list(args.overrides) + ([f"train.max_steps={args.steps}"] if args.steps else [])
    on = load_config(args.cfg, overrides)
    if not on.monitor.task_probe.datalist:
        raise SystemExit(f"{args.cfg}: no monitor.task_probe.datalist to measure")
    off = load_config(args.cfg, overrides + ["monitor.task_probe.datalist=null"])
    spent: list[float] = []
    loading: list[float] = []
    for name in ("measure", "references"):
        _timed(task_probe.TaskProbe, name, spent)
    _timed(task_probe, "load_probe_set", loading)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for cfg in (on, off):
            cfg.data.cache_dir = str(store)
        pretrain(load_config(args.cfg, overrides + ["train.max_steps=1", "monitor.task_probe.datalist=null",
                                                    f"data.cache_dir={store}"]), Path(tmp) / "warm", progress=False)
        times = {}
        for label, cfg in (("off", off), ("on", on)):
            t0 = time.perf_counter()
            pretrain(cfg, Path(tmp) / label, progress=False)
            times[label] = time.perf_counter() - t0
    tp = on.monitor.task_probe
    print(f"recipe {args.cfg}: {on.train.max_steps} steps, task probe every {tp.every} steps (and at step 0), "
          f"{tp.crops} crops per scan, {tp.voxels} voxels, method {tp.method}")
    print(f"probe off: {times['off']:.1f} s   probe on: {times['on']:.1f} s   loading its scans: "
          f"{sum(loading):.1f} s   probe calls: {len(spent)} taking {sum(spent):.1f} s")
    print(f"ratio on / off: {times['on'] / times['off']:.3f}   probe share of the run with it: "
          f"{(sum(spent) + sum(loading)) / times['on']:.1%}")


if __name__ == "__main__":
    main()
