"""QT-UNet-B vs MONAI SwinUNETR(feature_size=48): forward+backward time and peak memory at the same crop.

Prints absolute figures and ratios (QT-UNet / SwinUNETR) on the CPU (fp32) and, when CUDA is available, on
the GPU under bf16 autocast.

    python benchmarks/qt_unet_vs_swin_unetr.py                       # CPU 1×1×64³, 3 repeats
    python benchmarks/qt_unet_vs_swin_unetr.py --crop 96 96 96 --repeats 5 --device cuda

CPU peak memory is the growth of the process's peak RSS over what the built model and input already used, i.e.
activations + gradients of a training step (coarse; each model runs in a fresh process for that reason);
GPU peak memory is torch.cuda.max_memory_allocated over the timed steps.
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


def build(name: str, in_channels: int, out_channels: int, spatial_dims: int) -> torch.nn.Module:
    if name == "qt_unet_b":
        from sslkit.models.qt_unet import qt_unet

        return qt_unet(variant="base", spatial_dims=spatial_dims, in_channels=in_channels,
                       out_channels=out_channels)
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=48,
                     spatial_dims=spatial_dims)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(name: str, device: str, crop: list[int], batch: int, in_channels: int, out_channels: int,
            repeats: int, warmup: int) -> dict:
    """Mean seconds per forward+backward step and peak memory (MiB) for one model on one device."""
    torch.manual_seed(0)
    model = build(name, in_channels, out_channels, len(crop)).to(device).train()
    x = torch.randn(batch, in_channels, *crop, device=device)
    use_bf16 = device == "cuda"

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            y = model(x)
        y.float().square().mean().backward()

    base_rss = _rss_mib()  # after building the model and the input
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib() - base_rss
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"model": name, "device": device, "sec": sec, "peak_mib": peak, "params_m": params}


def run_isolated(args, name: str, device: str) -> dict:
    """Run one measurement in a fresh interpreter so CPU peak RSS is not shared between the two models."""
    cmd = [sys.executable, __file__, "--_one", name, "--device", device, "--crop", *map(str, args.crop),
           "--batch", str(args.batch), "--in-channels", str(args.in_channels),
           "--out-channels", str(args.out_channels), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} on {device} failed:\n{proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, nargs="+", default=None,
                   help="spatial crop (2 or 3 ints, at least 64 each for SwinUNETR); default 64³ on CPU, 128³ on GPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, then CUDA if available")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._one:
        print(json.dumps(measure(args._one, args.device, args.crop, args.batch, args.in_channels,
                                 args.out_channels, args.repeats, args.warmup)))
        return

    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    user_crop = args.crop
    for dev in devices:
        args.crop = user_crop or ([64, 64, 64] if dev == "cpu" else [128, 128, 128])
        res = {n: run_isolated(args, n, dev) for n in ("qt_unet_b", "swin_unetr")}
        q, s = res["qt_unet_b"], res["swin_unetr"]
        prec = "bf16 autocast" if dev == "cuda" else "fp32"
        print(f"[{dev}, {prec}] crop {args.batch}×{args.in_channels}×{'×'.join(map(str, args.crop))}, "
              f"{args.repeats} timed forward+backward steps")
        for r in (q, s):
            print(f"  {r['model']:<10} params {r['params_m']:6.2f} M   {r['sec'] * 1000:9.1f} ms/step   "
                  f"peak {r['peak_mib']:8.0f} MiB")
        print(f"  ratio QT-UNet-B / SwinUNETR: time {q['sec'] / s['sec']:.2f}×   "
              f"peak memory {q['peak_mib'] / s['peak_mib']:.2f}×")


if __name__ == "__main__":
    main()
