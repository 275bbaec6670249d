"""One-call GPU benchmark of sslkit's SSL training step: a table of samples/s, peak memory and model FLOP
utilisation (MFU), eager and compiled, against MONAI's reference (issue 24).

Rows (each in its own try/except: a failing row prints its error and the table goes on):
  monai_ref        MONAI SwinTransformer (use_flash_attention=True) + plain-PyTorch SSL heads and losses
                   (rotation, contrastive, reconstruction: benchmarks/ssl_step_vs_monai.py), AdamW
  sslkit           sslkit's Swin-UNETR encoder (window attention through SDPA in training too) + Composite
                   (rotation, simclr, inpainting on the shared rot_cutout view), AdamW
  sslkit_ckpt      the same with model.activation_checkpointing
  qt_unet_b        QT-UNet-B encoder + the thesis objectives (byol, rotation, inpainting on rot_cutout), Adam
  qt_unet_b_flex   the same, window attention through FlexAttention (CUDA only)
each eager and, for the `+compile` rows, with the model (encoder, or the reference's whole network) under
torch.compile(dynamic=False); corruptions, objectives' heads and losses stay eager in both. Swin rows: feature
size 48, 96^3 crops, batch 2; QT-UNet-B: 128^3, batch 2 (halved on out-of-memory); bf16 autocast on CUDA,
fp32 on the CPU. Synthetic batches already on the device: data loading is not measured here.

MFU = FLOPs of one step (torch.utils.flop_counter.FlopCounterMode on the eager step, forward + backward) x
steps/s / the device's dense bf16 peak (989 TFLOP/s for an H100 SXM; --peak-tflops for a device not listed).
"compile s" is the first step's time beyond a steady step. Rows run in priority order; once --budget-s has
passed, the rest print as skipped.

    python benchmarks/gpu.py                  # on a GPU machine: < 5 minutes, no installs, no network
    python benchmarks/gpu.py --smoke          # CPU, tiny sizes, compile through dynamo only (CI, < 30 s)

The table goes to stdout, and as JSON to --json, or $OUT/gpu_benchmark.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so the specific names come first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1))

# priority order: a row starts only inside --budget-s (a cold inductor compile of one model takes 1-2 minutes)
ROWS = ("monai_ref", "sslkit", "sslkit+compile", "qt_unet_b", "qt_unet_b+compile", "monai_ref+compile",
        "sslkit_ckpt", "qt_unet_b_flex+compile")


@dataclass
class Row:
    name: str
    model: str = ""
    crop: str = ""
    batch: int = 0
    ms_per_step: float | None = None
    samples_per_s: float | None = None
    peak_mem_gib: float | None = None
    tflop_per_step: float | None = None
    tflops_achieved: float | None = None
    mfu: float | None = None
    compile_s: float | None = None
    status: str = "ok"
    notes: list[str] = field(default_factory=list)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized run of every row (tiny models, dynamo only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--swin-roi", type=int, default=None, help="Swin crop edge (default 96; smoke 32)")
    p.add_argument("--qt-roi", type=int, default=None, help="QT-UNet-B crop edge (default 128; smoke 32)")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune", "reduce-overhead"])
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; smoke: eager, i.e. dynamo's graph capture)")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="start no row after this many seconds (the rows left print as skipped; run them with --rows)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--json", default=None, help="write the table here (default $OUT/gpu_benchmark.json)")
    a = p.parse_args(argv)
    a.steps = a.steps or (1 if a.smoke else 10)
    a.warmup = a.warmup or (1 if a.smoke else 3)
    a.swin_roi = a.swin_roi or (32 if a.smoke else 96)
    a.qt_roi = a.qt_roi or (32 if a.smoke else 128)
    a.compile_backend = a.compile_backend or ("eager" if a.smoke else "inductor")
    unknown = set(a.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    return a


# ----------------------------------------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ steps


def ssl_batch(batch: int, roi: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (batch, 1, roi, roi, roi)
    out = {k: torch.rand(shape, generator=g).to(device) for k in ("image", "view1", "view2")}
    out["index"] = torch.arange(batch, device=device)
    return out


def swin_arch(a) -> dict:
    """Swin-UNETR's encoder (feature size 48, window 7, depths 2, 2, 2, 2); smoke: narrow and shallow, with a
    window that fits a 32^3 crop's 16^3 map."""
    if a.smoke:
        return {"feature_size": 12, "window_size": 4, "depths": (1, 1, 1, 1)}
    return {"feature_size": 48, "window_size": 7, "depths": (2, 2, 2, 2)}


def monai_reference(a, device, compiled: bool):
    """(step function, label, batch, crop) of the MONAI reference SSL step."""
    import ssl_step_vs_monai as ref
    from monai.networks.nets.swin_unetr import SwinTransformer, WindowAttention

    arch = swin_arch(a)
    fs = arch["feature_size"]
    model = ref.RefModel(fs)
    if a.smoke:
        model.vit = SwinTransformer(in_chans=1, embed_dim=fs, window_size=(arch["window_size"],) * 3,
                                    patch_size=(2, 2, 2), depths=list(arch["depths"]), num_heads=[3, 6, 12, 24],
                                    spatial_dims=3)
    model.to(device)
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.use_flash_attention = True  # MONAI takes SDPA only with autograd off: inference, not this step
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    run = compile_module(model, a) if compiled else model
    batch = ssl_batch(a.batch, a.swin_roi, device)
    return (lambda: ref.ref_step(run, opt, batch)), f"MONAI SwinTransformer fs{fs}", a.batch, a.swin_roi


def sslkit_swin(a, device, compiled: bool, checkpointing: bool = False):
    from sslkit.models import build_encoder
    from sslkit.objectives.composite import Composite

    arch = swin_arch(a)
    fs = arch["feature_size"]
    enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, activation_checkpointing=checkpointing,
                        **arch)
    comp = Composite.from_specs([
        {"name": "rotation", "view": "rot_cutout"},
        {"name": "simclr", "view": "rot_cutout", "temperature": 0.5, "hidden_dim": 512, "out_dim": 128},
        {"name": "inpainting", "view": "rot_cutout"},
    ], enc)
    enc.to(device), comp.to(device)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(comp.parameters()), lr=4e-4, weight_decay=0.1)
    run = compile_module(enc, a) if compiled else enc
    batch = ssl_batch(a.batch, a.swin_roi, device)
    label = f"sslkit swin_unetr fs{fs}" + (" +ckpt" if checkpointing else "")
    return objective_step(run, comp, opt, batch), label, a.batch, a.swin_roi


def sslkit_qt_unet(a, device, compiled: bool, batch: int, attention: str = "sdpa"):
    from sslkit.models import build_encoder
    from sslkit.models.qt_unet import QTUNetEncoder
    from sslkit.models.window_attention import set_attention_backend
    from sslkit.objectives.composite import Composite

    if a.smoke:
        enc = QTUNetEncoder(spatial_dims=3, embed_dim=12, window_size=4)
        set_attention_backend(enc, attention)
        hidden, out = 64, 32
    else:
        enc = build_encoder("qt_unet", spatial_dims=3, variant="base", attention=attention)
        hidden, out = 4096, 256
    comp = Composite.from_specs([
        {"name": "byol", "view": "rot_cutout", "plane": [0, 1], "hidden_dim": hidden, "out_dim": out,
         "head_norm": "batch" if batch > 1 else "layer"},  # BatchNorm needs 2 samples
        {"name": "rotation", "view": "rot_cutout", "plane": [0, 1]},
        {"name": "inpainting", "view": "rot_cutout"},
    ], enc)
    enc.to(device), comp.to(device)
    opt = torch.optim.Adam(list(enc.parameters()) + list(comp.parameters()), lr=4e-5)
    run = compile_module(enc, a) if compiled else enc
    data = ssl_batch(batch, a.qt_roi, device)
    label = f"sslkit qt_unet {'C12 (smoke)' if a.smoke else 'base'}" + (f" {attention}" if attention != "sdpa" else "")
    return objective_step(run, comp, opt, data), label, batch, a.qt_roi


def objective_step(encoder_call, comp, opt, batch):
    """A closure running one optimizer step of the objectives `comp` on a fixed batch (EMA teachers included)."""
    steps = [0]

    def step():
        out = comp(batch, encoder_call)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        steps[0] += 1
        comp.on_optimizer_step(steps[0], 10 ** 6)  # EMA teachers (byol)
        return out.loss

    return step


def compile_module(module, a):
    kw = {"dynamic": False, "backend": a.compile_backend}
    if a.compile_backend == "inductor":
        kw["mode"] = a.compile_mode
    return torch.compile(module, **kw)


# ---------------------------------------------------------------------------------------------- measure


def count_flops(step, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, autocast(device):
        step()
    sync(device)
    return float(counter.get_total_flops())


def measure(row: Row, step, device, a, flops: float | None, peak: float | None) -> None:
    def timed(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            with autocast(device):
                step()
        sync(device)
        return time.perf_counter() - t

    first = timed(1)
    if a.warmup > 1:
        timed(a.warmup - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(a.steps) / a.steps
    row.ms_per_step = sec * 1000
    row.samples_per_s = row.batch / sec
    if device.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if "+compile" in row.name:
        row.compile_s = max(0.0, first - sec)
    if flops:
        row.tflop_per_step = flops / 1e12
        row.tflops_achieved = flops / sec / 1e12
        row.mfu = row.tflops_achieved / peak if peak else None


def run_row(name: str, a, device, peak, flop_cache: dict) -> Row:
    row = Row(name)
    compiled = name.endswith("+compile")
    base = name.removesuffix("+compile")
    try:
        if base == "qt_unet_b_flex" and device.type != "cuda":
            row.status = "skipped: FlexAttention has no backward on the CPU"
            return row
        if base.startswith("qt_unet_b"):
            attention = "flex" if base.endswith("flex") else "sdpa"
            row.batch = a.batch
            while True:
                try:
                    _run_built(row, sslkit_qt_unet(a, device, compiled, row.batch, attention), base, a, device,
                               peak, flop_cache)
                    break
                except torch.cuda.OutOfMemoryError:
                    if row.batch == 1:
                        raise
                    row.notes.append(f"out of memory at batch {row.batch}")
                    row.batch //= 2
                    _free(device)
        elif base == "monai_ref":
            _run_built(row, monai_reference(a, device, compiled), base, a, device, peak, flop_cache)
        else:
            _run_built(row, sslkit_swin(a, device, compiled, checkpointing=base == "sslkit_ckpt"), base, a,
                       device, peak, flop_cache)
    except Exception as e:  # one failing row must not lose the table
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        row.status = f"error: {type(e).__name__}: {first_line}"
        traceback.print_exc(file=sys.stderr)
    finally:
        _free(device)
    return row


def _run_built(row: Row, built, base: str, a, device, peak, flop_cache: dict) -> None:
    step, label, batch, roi = built
    row.model, row.batch, row.crop = label, batch, f"{roi}^3"
    # model FLOPs: the flex and checkpointed rows do the same model's work (recomputation is not counted)
    key = ({"sslkit_ckpt": "sslkit", "qt_unet_b_flex": "qt_unet_b"}.get(base, base), batch)
    if key not in flop_cache and not row.name.endswith("+compile") and base == key[0]:
        flop_cache[key] = count_flops(step, device)  # one eager step, also a warm-up
    measure(row, step, device, a, flop_cache.get(key), peak)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ report


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = (f"{'row':<24} {'model':<30} {'crop':>6} {'batch':>5} {'ms/step':>9} {'samples/s':>10} "
            f"{'peak GiB':>9} {'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<24} {r.model[:30]:<30} {r.crop:>6} {r.batch:>5} {_fmt(r.ms_per_step, '.1f'):>9} "
                     f"{_fmt(r.samples_per_s, '.3f'):>10} {_fmt(r.peak_mem_gib, '.2f'):>9} "
                     f"{_fmt(r.tflop_per_step, '.3f'):>10} {_fmt(r.tflops_achieved, '.1f'):>8} "
                     f"{_fmt(None if r.mfu is None else 100 * r.mfu, '.1f'):>6} {_fmt(r.compile_s, '.1f'):>9}  "
                     f"{r.status}{' (' + '; '.join(r.notes) + ')' if r.notes else ''}")
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[str]:
    by = {r.name: r for r in rows if r.samples_per_s}
    out = []
    for num, den in (("sslkit", "monai_ref"), ("sslkit+compile", "monai_ref"), ("monai_ref+compile", "monai_ref"),
                     ("sslkit+compile", "sslkit"), ("qt_unet_b+compile", "qt_unet_b"),
                     ("qt_unet_b_flex+compile", "qt_unet_b+compile")):
        if num in by and den in by:
            out.append(f"{num} / {den}: {by[num].samples_per_s / by[den].samples_per_s:.2f}x samples/s")
    if "sslkit_ckpt" in by and "sslkit" in by and by["sslkit"].peak_mem_gib:
        out.append(f"activation checkpointing: peak memory {by['sslkit_ckpt'].peak_mem_gib:.2f} vs "
                   f"{by['sslkit'].peak_mem_gib:.2f} GiB, "
                   f"{by['sslkit_ckpt'].samples_per_s / by['sslkit'].samples_per_s:.2f}x samples/s")
    return out


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("monai", "timm", "lightly", "sslkit"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # a missing wheel shows in the header, and in the rows that need it
            out[mod] = f"missing ({type(e).__name__})"
    return out


def main(argv=None) -> list[Row]:
    a = parse_args(argv)
    t0 = time.perf_counter()
    device = pick_device(a.device)
    if a.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # small ops on a shared CPU: one thread is faster than two spinning
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_tflops(device, a.peak_tflops)
    info = {"device": device_name(device), "peak_bf16_tflops": peak, "precision":
            "bf16 autocast" if device.type == "cuda" else "fp32", "smoke": a.smoke, "steps": a.steps,
            "warmup": a.warmup, "compile": f"{a.compile_backend}/{a.compile_mode}", **versions()}
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows, flop_cache = [], {}
    for name in [r for r in ROWS if r in a.rows.split(",")]:
        if time.perf_counter() - t0 > a.budget_s:
            rows.append(Row(name, status=f"skipped: past the {a.budget_s:.0f} s budget"))
            continue
        t = time.perf_counter()
        rows.append(run_row(name, a, device, peak, flop_cache))
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {rows[-1].status} ({time.perf_counter() - t:.1f} s)",
              flush=True)
    print()
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if peak is None:
        print("MFU: no bf16 peak known for this device (pass --peak-tflops)")
    if a.smoke:
        print("smoke run: tiny models and dynamo's eager backend test the script; its ratios mean nothing")
    print(f"total {time.perf_counter() - t0:.1f} s")
    path = a.json or (os.path.join(os.environ["OUT"], "gpu_benchmark.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows],
                                          "ratios": ratios(rows)}, indent=1))
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
