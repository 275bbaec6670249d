"""Does `sslkit predict` on a whole new scan agree with what `sslkit evaluate` reports on the validation volume?

For a fine-tuning run on the MNI152 grey / white matter demo (trained on the left hemisphere, validated on the
right one), prints: the evaluate Dice on the validation hemisphere, the Dice of `predict` on the full-brain demo
scan (`demo_data/mri_mni152_t1.nii.gz`) against its label map in the scan's own 1 mm grid, the same restricted to
the right (validation) hemisphere, and the warning lines predict printed.

    python benchmarks/predict_vs_evaluate.py --run runs/gm_wm_byol --demo demo_data
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


def dice(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    p, g = pred == k, gt == k
    return float(2 * (p & g).sum() / max(p.sum() + g.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a fine-tuning run directory of an MNI GM/WM recipe")
    ap.add_argument("--demo", default="demo_data", help="the demo corpus folder")
    args = ap.parse_args()
    from sslkit.downstream.evaluate import evaluate
    from sslkit.downstream.predict import predict

    run, demo = Path(args.run), Path(args.demo)
    summary = evaluate(run, device="cpu")
    per_class = {k: v["dice"] for k, v in summary["per_class"].items()}
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
        out = predict(run, demo / "mri_mni152_t1.nii.gz", tmp, device="cpu")[0]
        pred = np.asarray(nib.load(str(out)).dataobj)
    img = nib.load(str(demo / "mri_mni152_gmwm.nii.gz"))
    gt = np.asarray(img.dataobj)
    mid = int(round(np.linalg.solve(img.affine, [0, 0, 0, 1])[0]))
    right = np.zeros(gt.shape, bool)
    right[mid:] = True
    names = list(per_class)
    print("evaluate (validation hemisphere, 2 mm grid): " + ", ".join(f"{n} {v:.3f}" for n, v in per_class.items())
          + f"; mean {summary['mean_dice']:.3f}")
    full = [dice(pred, gt, k + 1) for k in range(len(names))]
    half = [dice(np.where(right, pred, 0), np.where(right, gt, 0), k + 1) for k in range(len(names))]
    print("predict, full brain (1 mm grid):          " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, full))
          + f"; mean {np.mean(full):.3f}")
    print("predict, right hemisphere of it:          " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, half))
          + f"; mean {np.mean(half):.3f}")
    print("predict said: " + (err.getvalue().strip() or "(nothing)"))


if __name__ == "__main__":
    main()
