"""Sliding-window validation, per-case / per-class reports (JSON, CSV, Markdown) and run comparison.

Metrics are computed on the pre-processed grid the model sees (orientation RAS, `data.spacing`, foreground
crop), distances in mm of that grid — the Swin-UNETR / MONAI tutorial practice. `predict` is the path that
returns label maps in the original scan geometry.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from sslkit.downstream.metrics import case_metrics, jsonable, summarize
from sslkit.errors import ConfigError


def class_names(cfg) -> list[str]:
    names = list(cfg.data.label_names)
    n = cfg.data.num_classes - 1
    return (names + [f"class_{i}" for i in range(len(names) + 1, n + 1)])[:n]


def subset_indices(n: int, k: int | None) -> list[int]:
    """k evenly spaced indices of range(n) (all when k is 0/None or >= n)."""
    if not k or k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


@torch.no_grad()
def infer_logits(model, image: torch.Tensor, cfg, device) -> torch.Tensor:
    """(B, C_in, *S) -> (B, num_classes, *S) logits by MONAI sliding-window inference (slice by slice for a 2D
    model on volumes, data.slices)."""
    from monai.inferers import sliding_window_inference

    if cfg.data.slices:
        from sslkit.downstream.slices import infer_by_slices

        return infer_by_slices(model, image, cfg, device)
    t = cfg.train
    return sliding_window_inference(image.to(device), list(cfg.data.roi), t.sw_batch_size, model,
                                    overlap=t.sw_overlap, mode=t.sw_mode)


@torch.no_grad()
def validate(model, dataset, cfg, device, cases: list[dict] | None = None,
             max_cases: int | None = None) -> tuple[dict, list[dict]]:
    """(summary, per_case) over a dataset of pre-processed {image, label} volumes (or `max_cases` of them)."""
    was_training = model.training
    model.eval()
    per_case = []
    for i in subset_indices(len(dataset), max_cases):
        item = dataset[i]
        img, lab = item["image"], item["label"]
        spacing = [float(s) for s in lab.pixdim] if hasattr(lab, "pixdim") else None
        logits = infer_logits(model, plain(img)[None], cfg, device)
        pred = logits.argmax(1)[0].cpu()
        m = case_metrics(pred, plain(lab)[0].round().long(), cfg.data.num_classes, spacing,
                         cfg.data.nsd_tolerance_mm)
        name = Path(str((cases[i]["label"] if cases else f"case_{i}"))).name
        per_case.append({"case": name, **m})
    model.train(was_training)
    return summarize(per_case, class_names(cfg)), per_case


def write_reports(summary: dict, per_case: list[dict], names: list[str], out_dir: Path, title: str) -> None:
    from sslkit.run import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", jsonable({"summary": summary, "class_names": names,
                                                          "per_case": per_case}), indent=2)
    with open(out_dir / "per_case.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case", "class", "dice", "hd95_mm", "asd_mm", "nsd"])
        for c in per_case:
            for j, n in enumerate(names):
                w.writerow([c["case"], n, _fmt(c["dice"][j]), _fmt(c["hd95"][j]), _fmt(c["asd"][j]),
                            _fmt(c["nsd"][j])])
    lines = [f"# {title}", "", f"{summary['n_cases']} cases; mean Dice {_fmt(summary['mean_dice'])}, "
             f"mean HD95 {_fmt(summary['mean_hd95'])} mm, mean ASD {_fmt(summary['mean_asd'])} mm, "
             f"mean NSD {_fmt(summary['mean_nsd'])}", "",
             "| class | Dice | HD95 (mm) | ASD (mm) | NSD | missed/spurious |", "|---|---|---|---|---|---|"]
    for n in names:
        r = summary["per_class"][n]
        lines.append(f"| {n} | {_fmt(r['dice'])} | {_fmt(r['hd95'])} | {_fmt(r['asd'])} | {_fmt(r['nsd'])} | "
                     f"{r['hd95_n_inf']} |")
    lines += ["", "## Per case (Dice)", "", "| case | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for c in per_case:
        lines.append(f"| {c['case']} | " + " | ".join(_fmt(v) for v in c["dice"]) + " |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf"
    return f"{v:.4f}"


def evaluate(run_dir: str | Path, ckpt: str | Path | None = None, out_dir: str | Path | None = None,
             data_root: str | None = None, device: str = "auto", max_cases: int | None = None) -> dict:
    """Evaluate a fine-tuning run's best model (or `ckpt`: a model file or checkpoint folder) on its validation
    cases, preprocessed by the model's own plan.

    Writes <out_dir or run_dir/eval>/metrics.json, per_case.csv, report.md; returns the summary dict.
    `data_root` replaces the recipe's data.root (e.g. the data moved); `max_cases` evaluates that many evenly
    spaced validation cases only (quick checks; the same subset as train.val_cases).
    """
    from monai.data import Dataset

    from sslkit.downstream.adapt import load_finetuned
    from sslkit.downstream.data import eval_transforms, list_cases
    from sslkit.run import pick_device

    run_dir = Path(run_dir)
    refuse_pretraining_run(run_dir, "evaluate")
    model, cfg, _, path = load_finetuned(ckpt or run_dir)
    if data_root:
        cfg.data.root = data_root
    dev = pick_device(device)
    model.to(dev)
    _, val = list_cases(cfg.data)
    summary, per_case = validate(model, Dataset(val, eval_transforms(cfg.data)), cfg, dev, val, max_cases)
    summary["checkpoint"] = str(path)
    write_reports(summary, per_case, class_names(cfg), Path(out_dir) if out_dir else run_dir / "eval",
                  f"{cfg.data.task or cfg.data.layout}: {run_dir.name}")
    return summary


def refuse_pretraining_run(run_dir: Path, command: str) -> None:
    """A one-line ConfigError when `run_dir` is a pretraining run (it has an encoder, not a segmenter)."""
    if (run_dir / "encoder.safetensors").is_file() or any((run_dir / "checkpoints").glob("step_*/student.safetensors")):
        raise ConfigError(f"{run_dir}: a pretraining run; `sslkit {command}` takes fine-tuning runs (fine-tune its "
                          f"encoder first: sslkit finetune --cfg RECIPE --encoder {run_dir})")


def compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Side-by-side per-class Dice / HD95 / ASD of evaluated runs (each needs <run>/eval/metrics.json).

    `out`: a `.md` path (a `.csv` with the same stem is written beside it) or a folder (compare.md/.csv).
    Returns the Markdown path.
    """
    runs = []
    for r in run_dirs:
        refuse_pretraining_run(Path(r), "compare")
        p = Path(r) / "eval" / "metrics.json"
        if not p.is_file():
            raise ConfigError(f"{p}: not found; run `sslkit evaluate {r}` first")
        runs.append((Path(r).name, json.loads(p.read_text(encoding="utf-8"))))
    out = Path(out)
    md = out if out.suffix == ".md" else out / "compare.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    names = []
    for _, m in runs:
        names += [n for n in m["class_names"] if n not in names]
    header = ["class"] + [f"{rn} {k}" for rn, _ in runs for k in ("Dice", "HD95", "ASD")]
    rows = []
    for n in names + ["mean"]:
        row = [n]
        for _, m in runs:
            s = m["summary"]
            r = s["per_class"].get(n) if n != "mean" else {"dice": s["mean_dice"], "hd95": s["mean_hd95"],
                                                            "asd": s["mean_asd"]}
            row += [_fmt(r[k]) if r else "-" for k in ("dice", "hd95", "asd")]
        rows.append(row)
    with open(md.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header] + rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += paired_differences(runs, names)
    lines += ["", "One training run per side: the differences above include seed-to-seed variation. `sslkit study` "
              "repeats the comparison over seeds and labelled budgets with paired bootstrap intervals "
              "(docs/study.md)."]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md


def _case_dice(metrics: dict) -> dict[str, dict[str, float]]:
    """{case: {class: Dice}} of an evaluated run's metrics.json."""
    names = metrics["class_names"]
    return {c["case"]: {n: c["dice"][j] for j, n in enumerate(names)} for c in metrics.get("per_case", [])}


def paired_differences(runs: list[tuple[str, dict]], names: list[str]) -> list[str]:
    """Markdown lines: per class, each run's Dice minus the first run's on the same validation cases (mean over
    the cases both evaluated, and on how many cases it is higher / lower); [] for a single run."""
    if len(runs) < 2:
        return []
    (ref_name, ref), others = runs[0], runs[1:]
    base = _case_dice(ref)
    header = ["class"] + [h for rn, _ in others for h in (f"{rn} - {ref_name}: mean dDice", "higher / lower")]
    lines = ["", f"Paired difference to {ref_name} (Dice per class, case by case on the validation cases both "
             "runs evaluated):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in names + ["mean"]:
        row = [n]
        for _, m in others:
            diffs = []
            for case, dice in _case_dice(m).items():
                a, b = base.get(case, {}), dice
                ok = [k for k in (names if n == "mean" else [n]) if _finite(a.get(k)) and _finite(b.get(k))]
                if ok:
                    diffs.append(float(np.mean([b[k] - a[k] for k in ok])))
            if diffs:
                up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
                row += [f"{np.mean(diffs):+.4f}", f"{up} / {down} of {len(diffs)} cases"]
            else:
                row += ["-", "no common cases"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
