"""AutoSAM decoder vs CNN head vs linear head on a frozen SAM-shaped encoder, same data and budget (issue 8).

Each head is trained by `sslkit finetune` on the slices of ONE labelled volume of the demo ACDC-layout corpus
(MNI152 GM/WM, left hemisphere) and validated on the other volume (3D Dice on the re-stacked slices). Prints,
per head: the untrained Dice (same seed, before any step), the best validation Dice, trainable parameters and
the mean CPU step time at the recipe's image size. With --encoder (a pretraining run dir, e.g. from
demo_sam_mae_emix_shed.yaml) the frozen encoder is the pretrained one; otherwise it is randomly initialised.

    python benchmarks/sam_heads_demo.py --encoder runs/sam_ssl --steps 120
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sslkit.downstream.adapt import adapt, build_model, load_encoder
from sslkit.downstream.config import load_downstream_config
from sslkit.downstream.data import make_datasets
from sslkit.downstream.evaluate import validate
from sslkit.downstream.train import finetune

RECIPE = "downstream/demo_acdc_autosam.yaml"


def untrained_dice(cfg, encoder: str | None) -> float:
    torch.manual_seed(cfg.train.seed)  # finetune builds its model the same way: this is its step-0 model
    model = build_model(cfg)
    if encoder:
        load_encoder(model, encoder)
    data = make_datasets(cfg.data)
    return validate(model, data.val, cfg, torch.device("cpu"), data.val_cases)[0]["mean_dice"]


def run_head(head: str, steps: int, encoder: str | None, out: Path) -> dict:
    over = [f"model.args.head={head}", f"train.max_steps={steps}", f"train.val_every={max(1, steps // 3)}"]
    cfg = load_downstream_config(RECIPE, over)
    before = untrained_dice(cfg, encoder)
    res = finetune(cfg, out / head, encoder_path=encoder, progress=False)
    rows = [json.loads(x) for x in (out / head / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    times = [r["step_time"] for r in rows if "step_time" in r][2:]  # skip warm-up steps
    model = build_model(cfg)
    a = adapt(model, cfg.adapt, cfg.optim.lr)
    n_train = sum(p.numel() for g in a.param_groups for p in g["params"])
    return {"head": head, "untrained_dice": before, "best_dice": res["best_dice"], "best_step": res["best_step"],
            "trainable": n_train, "step_s": sum(times) / len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default=None, help="pretraining run dir or encoder.safetensors (default: random)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--heads", default="autosam,cnn,linear")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_head(h, args.steps, args.encoder, Path(tmp)) for h in args.heads.split(",")]
    print(f"\nencoder: {args.encoder or 'random init'}; {args.steps} steps of 8 slices; CPU, 2 threads")
    print("| head | untrained Dice | best Dice (step) | trainable params | s/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['untrained_dice']:.3f} | {r['best_dice']:.3f} ({r['best_step']}) | "
              f"{r['trainable'] / 1e6:.2f} M | {r['step_s']:.3f} |")


if __name__ == "__main__":
    main()
