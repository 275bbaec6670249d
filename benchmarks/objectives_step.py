"""Step time of each self-supervised objective relative to BYOL, on the same encoder, crop and batch, in one run.

One step = the objective's forward on a synthetic batch holding what its data requests ask for (two views; DINO /
iBOT: n_global crops of roi and n_local crops of roi/2; masks), backward, AdamW step over encoder + heads, and the
optimizer-step hook (the EMA teacher update). The engine and the data pipeline are not involved. Objectives are
timed in interleaved rounds (every objective once per round, so slow drifts of a shared machine hit them alike);
each objective's time is the median over rounds, and the ratio is against BYOL's median.

    python benchmarks/objectives_step.py --roi 32 --batch 2 --feature-size 12 --rounds 5
    python benchmarks/objectives_step.py --roi 96 --batch 2 --feature-size 48 --device cuda   # the papers' size

Heads are the demo recipes' sizes unless --paper-heads (the published widths: DINO 65536 prototypes, SMIT / iBOT
8192, VICReg / Barlow Twins 8192-wide expanders). Pass --objectives to time a subset (byol is always timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roi", type=int, default=32, help="cubic crop size (multiple of 32)")
    p.add_argument("--batch", type=int, default=2, help="samples per step")
    p.add_argument("--feature-size", type=int, default=12, help="Swin-UNETR feature size (48: the papers' model)")
    p.add_argument("--depths", type=int, nargs=4, default=[2, 2, 2, 2])
    p.add_argument("--n-local", type=int, default=4, help="DINO / iBOT local crops per sample")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step per objective each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--objectives", nargs="+", default=["simclr", "vicreg", "barlow_twins", "dino", "ibot", "smit"])
    p.add_argument("--paper-heads", action="store_true", help="the published head widths")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p.parse_args(argv)


def specs(paper: bool, n_local: int) -> dict[str, dict]:
    """Objective options: the demo recipes' heads, or the papers'."""
    distill = ({"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256} if paper else
               {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64})
    wide = {"hidden_dim": 8192, "out_dim": 8192} if paper else {"hidden_dim": 512, "out_dim": 512}
    return {
        "byol": {"name": "byol", **({"hidden_dim": 4096, "out_dim": 256} if paper else
                                    {"hidden_dim": 512, "out_dim": 128}), "head_norm": "batch"},
        "simclr": {"name": "simclr"},
        "vicreg": {"name": "vicreg", **wide},
        "barlow_twins": {"name": "barlow_twins", **wide},
        "dino": {"name": "dino", **distill, "n_local": n_local},
        "ibot": {"name": "ibot", **distill, "n_local": n_local, **({"out_dim": 8192, "patch_out_dim": 8192} if paper
                                                                  else {"patch_out_dim": 1024})},
        "smit": {"name": "smit", **distill, **({"out_dim": 8192} if paper else {})},
    }


def synthetic_batch(requests: dict, batch: int, roi: int, device) -> dict:
    """Random tensors with the keys and shapes the data pipeline would give for these requests."""
    crop = (1, roi, roi, roi)
    out = {}
    if "views" in requests:
        out.update(view1=torch.rand(batch, *crop, device=device), view2=torch.rand(batch, *crop, device=device),
                   image=torch.rand(batch, *crop, device=device))
    if "multicrop" in requests:
        m = requests["multicrop"]
        local = max(1, round(roi * m["local_size"]))
        out["global_crops"] = torch.rand(batch, m["n_global"], *crop, device=device)
        if m["n_local"]:
            out["local_crops"] = torch.rand(batch, m["n_local"], 1, local, local, local, device=device)
    if "masks" in requests:
        m = requests["masks"]
        cells = roi // m["patch"]
        out["masks"] = torch.rand(batch, m["count"], cells, cells, cells, device=device) < m["ratio"][1]
    return out


class Bench:
    """One objective on its own copy of the encoder (same seed, so every objective starts from the same weights)."""

    def __init__(self, spec: dict, args, device):
        from sslkit.models import build_encoder
        from sslkit.objectives.registry import build_objective

        torch.manual_seed(0)
        self.encoder = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=args.feature_size,
                                     depths=args.depths, window_size=4).to(device)
        self.objective = build_objective(spec, self.encoder).to(device)
        for teacher in self.objective.teachers().values():
            teacher.to(device)
        params = [p for p in [*self.encoder.parameters(), *self.objective.parameters()] if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.batch = synthetic_batch(self.objective.data_requests(), args.batch, args.roi, device)
        self.steps = 0
        self.times: list[float] = []

    def step(self, device, timed: bool) -> None:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.objective(self.batch, self.encoder)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.steps += 1
        self.objective.on_optimizer_step(self.steps, 1000)
        sync()
        if timed:
            self.times.append(time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    names = ["byol"] + [n for n in args.objectives if n != "byol"]
    all_specs = specs(args.paper_heads, args.n_local)
    benches = {n: Bench(all_specs[n], args, device) for n in names}
    for r in range(args.warmup + args.rounds):
        for bench in benches.values():
            bench.step(device, timed=r >= args.warmup)
    ref = statistics.median(benches["byol"].times)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), Swin-UNETR feature size {args.feature_size}, "
          f"depths {args.depths}, {args.batch} x {args.roi}^3, {args.rounds} rounds, "
          f"{'paper' if args.paper_heads else 'demo'} heads")
    print(f"{'objective':<14}{'ms / step':>11}{'vs byol':>9}   crops encoded per step (student + teacher)")
    for name, bench in benches.items():
        med = statistics.median(bench.times)
        print(f"{name:<14}{med * 1e3:>11.1f}{med / ref:>8.2f}x   {_crops(bench, args.batch)}")


def _crops(bench: Bench, batch: int) -> str:
    b = bench.batch
    if "global_crops" in b:
        g, loc = b["global_crops"].shape[1], b["local_crops"].shape[1] if "local_crops" in b else 0
        return f"{g * batch} global + {loc * batch} local (1/8 the voxels) + {g * batch} teacher"
    teacher = 2 * batch if bench.objective.teachers() else 0
    return f"{2 * batch} + {teacher} teacher"


if __name__ == "__main__":
    main()
