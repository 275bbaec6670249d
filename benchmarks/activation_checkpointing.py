"""Peak memory and time of a BYOL step with and without activation checkpointing (model.activation_checkpointing).

The step: sslkit's Swin-UNETR encoder (feature size 48 by default) + the BYOL objective (LayerNorm heads, so a
batch of 1 trains), forward of both views through the student and the EMA teacher, backward; 96^3 crops, batch 1.
Each setting runs in a fresh interpreter; its peak memory is the growth of the process's peak RSS over what the
built model, objective and batch already held (activations and gradients of the step). On CUDA the same is read
from torch.cuda.max_memory_allocated.

    python benchmarks/activation_checkpointing.py                       # CPU, 96^3, feature size 48
    python benchmarks/activation_checkpointing.py --roi 64 --feature-size 24 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roi", type=int, default=96, help="cubic crop edge")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--_one", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(a, checkpointing: bool) -> dict:
    from sslkit.models import build_encoder
    from sslkit.objectives.composite import Composite

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=a.feature_size,
                        activation_checkpointing=checkpointing).to(device).train()
    comp = Composite.from_specs([{"name": "byol", "head_norm": "layer"}], enc).to(device).train()
    shape = (a.batch, 1, a.roi, a.roi, a.roi)
    batch = {k: torch.rand(shape, device=device) for k in ("image", "view1", "view2")}
    batch["index"] = torch.arange(a.batch, device=device)
    base = _peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    t = time.perf_counter()
    loss = comp(batch, enc).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = _peak_rss_mib()
    return {"checkpointing": checkpointing, "sec": time.perf_counter() - t, "base_mib": base,
            "step_mib": peak - base, "loss": float(loss)}


def run_isolated(a, setting: str) -> dict:
    cmd = [sys.executable, __file__, "--_one", setting, "--roi", str(a.roi), "--batch", str(a.batch),
           "--feature-size", str(a.feature_size), "--device", a.device, "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"activation checkpointing {setting} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    a = parse_args(argv)
    if a._one:
        print(json.dumps(measure(a, a._one == "on")))
        return
    off, on = run_isolated(a, "off"), run_isolated(a, "on")
    print(f"BYOL step, swin_unetr feature size {a.feature_size}, {a.batch}x1x{a.roi}^3, {a.device} fp32, "
          f"forward (student + teacher, 2 views) + backward")
    for r in (off, on):
        print(f"  checkpointing {'on ' if r['checkpointing'] else 'off'}  step memory {r['step_mib']:8.0f} MiB"
              f"   {r['sec']:7.1f} s   loss {r['loss']:.6f}")
    saved = off["step_mib"] - on["step_mib"]
    print(f"  saving {saved:.0f} MiB ({100 * saved / off['step_mib']:.0f}% of the step's memory); "
          f"time x{on['sec'] / off['sec']:.2f}; same loss: {abs(on['loss'] - off['loss']) < 1e-5}")


if __name__ == "__main__":
    main()
