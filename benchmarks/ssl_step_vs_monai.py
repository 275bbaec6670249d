"""Samples/s of one sslkit Swin-UNETR SSL step against a plain-PyTorch step on MONAI's SwinTransformer.

ours:      sslkit Encoder('swin_unetr') + Composite(rotation, simclr, inpainting on the shared 'rot_cutout'
           view, weights 1) + torch AdamW; the engine is not involved.
reference: monai.networks.nets.swin_unetr.SwinTransformer + three heads written here in plain PyTorch
           (rotation Linear, contrastive MLP + NT-Xent, transposed-conv reconstruction + L1), the same
           corruptions (per-sample rot90, noise / swap cutout) and the same crop and batch, AdamW.
Both encode each of the two views once per step. Prints samples/s for each and ours / reference.

    python benchmarks/ssl_step_vs_monai.py --roi 32 --batch 2 --feature-size 12 --steps 5
CPU runs fp32 by default; on CUDA the step runs under bf16 autocast.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roi", type=int, default=64, help="cubic crop size (multiple of 32)")
    p.add_argument("--batch", type=int, default=2, help="crops per step")
    p.add_argument("--feature-size", type=int, default=12, help="Swin feature size (48 = the paper's model)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: fp32 on CPU, bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ reference


def ref_rot(x: torch.Tensor):
    k = torch.randint(0, 4, (x.shape[0],), device=x.device)
    return torch.stack([torch.rot90(x[i], int(k[i]), dims=(-2, -1)) for i in range(x.shape[0])]), k


def ref_cutout(x: torch.Tensor, max_fraction=0.3, box_min=0.05, box_max=0.25):
    out = x.clone()
    n, spatial = x.shape[0], x.shape[2:]
    for i in range(n):
        for partner in (None, (i + 1) % n if n > 1 else None):
            budget = float(torch.rand(())) * max_fraction * math.prod(spatial)
            done = 0
            src = x[partner] if partner is not None else torch.rand_like(x[i])
            while done < budget:
                size = [int(torch.randint(max(1, round(box_min * s)), max(2, int(box_max * s)) + 1, ())) for s in spatial]
                st = [int(torch.randint(0, s - z + 1, ())) for s, z in zip(spatial, size)]
                box = (slice(None),) + tuple(slice(a, a + z) for a, z in zip(st, size))
                out[i][box] = src[box]
                done += math.prod(size)
    return out


class RefModel(nn.Module):
    def __init__(self, fs: int):
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.vit = SwinTransformer(in_chans=1, embed_dim=fs, window_size=(7, 7, 7), patch_size=(2, 2, 2),
                                   depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], spatial_dims=3)
        c = fs * 16
        self.rot = nn.Linear(c, 4)
        self.con = nn.Sequential(nn.Linear(c, 512), nn.LayerNorm(512), nn.ReLU(inplace=True), nn.Linear(512, 128))
        layers, ch = [], c
        for _ in range(5):
            nxt = max(16, ch // 2)
            layers += [nn.ConvTranspose3d(ch, nxt, 2, 2), nn.InstanceNorm3d(nxt, affine=True), nn.LeakyReLU(0.01)]
            ch = nxt
        self.rec = nn.Sequential(*layers, nn.Conv3d(ch, 1, 1))

    def forward(self, x):
        deep = self.vit(x)[-1]
        h = deep.flatten(2).mean(-1)
        return self.rot(h), self.con(h), self.rec(deep)


def ntxent(a, b, t=0.5):
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    sim = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def ref_step(model, opt, batch):
    outs = []
    for key in ("view1", "view2"):
        x_rot, k = ref_rot(batch[key])
        outs.append((ref_cutout(x_rot), x_rot, k))
    preds = [model(x) for x, _, _ in outs]
    loss = sum(F.cross_entropy(p[0].float(), o[2]) for p, o in zip(preds, outs)) / 2
    loss = loss + ntxent(preds[0][1], preds[1][1])
    loss = loss + sum(F.l1_loss(p[2].float(), o[1]) for p, o in zip(preds, outs)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


# ------------------------------------------------------------------------------------------ ours


def build_ours(fs: int):
    from sslkit.models import build_encoder
    from sslkit.objectives.composite import Composite

    enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=fs)
    comp = Composite.from_specs([
        {"name": "rotation", "view": "rot_cutout"},
        {"name": "simclr", "view": "rot_cutout", "temperature": 0.5, "hidden_dim": 512, "out_dim": 128},
        {"name": "inpainting", "view": "rot_cutout"},
    ], enc)
    return enc, comp


def our_step(enc, comp, opt, batch):
    out = comp(batch, enc)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out.loss


def time_interleaved(steps: dict, n_warm: int, n: int, device, autocast) -> dict:
    """Seconds per named step over n runs, the steps alternating (ours, reference, ours, ...) so that a
    machine shared with other jobs slows both alike."""
    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(n_warm):
        for fn in steps.values():
            run(fn)
    total = {k: 0.0 for k in steps}
    for _ in range(n):
        for k, fn in steps.items():
            total[k] += run(fn)
    return total


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    precision = a.precision if a.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    torch.manual_seed(0)
    shape = (a.batch, 1, a.roi, a.roi, a.roi)
    batch = {k: torch.rand(shape, device=device) for k in ("image", "view1", "view2")}
    batch["index"] = torch.arange(a.batch, device=device)

    enc, comp = build_ours(a.feature_size)
    enc.to(device), comp.to(device)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(comp.parameters()), lr=4e-4, weight_decay=0.1)
    ref = RefModel(a.feature_size).to(device)
    ropt = torch.optim.AdamW(ref.parameters(), lr=4e-4, weight_decay=0.1)
    t = time_interleaved({"ours": lambda: our_step(enc, comp, opt, batch),
                          "ref": lambda: ref_step(ref, ropt, batch)}, a.warmup, a.steps, device, autocast)
    t_ours, t_ref = t["ours"], t["ref"]

    s_ours, s_ref = a.batch * a.steps / t_ours, a.batch * a.steps / t_ref
    print(f"device {device.type} precision {precision} roi {a.roi}^3 batch {a.batch} feature_size {a.feature_size} "
          f"steps {a.steps}")
    print(f"sslkit     {s_ours:8.3f} samples/s  (encoder calls per step: {comp.last_encoder_calls})")
    print(f"reference  {s_ref:8.3f} samples/s")
    print(f"ratio sslkit/reference {s_ours / s_ref:.3f}")


if __name__ == "__main__":
    main()
