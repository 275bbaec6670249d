"""Per-class segmentation metrics on label maps: Dice, HD95, average surface distance and normalised surface Dice
(MONAI functions).

Conventions (per foreground class c, pred P and ground truth G as masks):
  both non-empty    MONAI's values: compute_dice, compute_hausdorff_distance(percentile=95),
                    compute_average_surface_distance(symmetric=True); distances in mm when `spacing` is given.
  P empty, G not    Dice 0; HD95 = ASD = inf (a missed structure is infinitely far). MONAI 1.6 itself returns
  (or G empty, P    nan for HD95 and inf for ASD here; we make both inf so a miss is never silently dropped.
  not)
  both empty        Dice, HD95, ASD, NSD = nan (nothing to find; excluded from means).
NSD (normalised surface Dice, Nikolov et al. 2021; MONAI compute_surface_dice): the share of both boundaries that
lies within the class's tolerance (mm) of the other boundary; 0 for a missed or spurious structure.
Summaries average Dice with nanmean (a miss counts as 0) and distances over finite values, reporting the number
of infinite (missed / spurious) cases separately as `n_inf`.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch


def _onehot(labels, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    t = t.squeeze()
    if t.min() < 0 or t.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes})")
    # (*S) -> (1, C, *S)
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0).unsqueeze(0).float()


def case_metrics(pred, gt, num_classes: int, spacing: Sequence[float] | float | None = None,
                 nsd_tolerance: Sequence[float] | float = 2.0) -> dict[str, list]:
    """Label maps (same shape) -> {'dice', 'hd95', 'asd', 'nsd': [per class]} for classes 1..num_classes-1;
    `nsd_tolerance`: mm (one value, or one per foreground class)."""
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_surface_dice)

    p, g = _onehot(pred, num_classes), _onehot(gt, num_classes)
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape")
    sp = None if spacing is None else (float(spacing) if np.isscalar(spacing) else [float(s) for s in spacing])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p, g, include_background=False)[0].tolist()
        hd = compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=sp)[0].tolist()
        asd = compute_average_surface_distance(p, g, include_background=False, symmetric=True,
                                               spacing=sp)[0].tolist()
        tol = [float(t) for t in np.atleast_1d(nsd_tolerance)]
        tol = tol * (num_classes - 1) if len(tol) == 1 else tol
        nsd = compute_surface_dice(p, g, class_thresholds=tol, include_background=False, spacing=sp)[0].tolist()
    for i in range(num_classes - 1):
        pe, ge = not bool(p[0, i + 1].any()), not bool(g[0, i + 1].any())
        if pe and ge:
            dice[i], hd[i], asd[i], nsd[i] = math.nan, math.nan, math.nan, math.nan
        elif pe or ge:
            dice[i], hd[i], asd[i], nsd[i] = 0.0, math.inf, math.inf, 0.0
    return {"dice": dice, "hd95": hd, "asd": asd, "nsd": nsd}


def summarize(per_case: list[dict], class_names: Sequence[str]) -> dict:
    """Average `case_metrics` results over cases, per class and overall."""
    out: dict = {"per_class": {}, "n_cases": len(per_case)}
    allm = {"dice": [], "hd95": [], "asd": [], "nsd": []}
    for i, name in enumerate(class_names):
        row = {}
        for m in allm:
            if not all(m in c for c in per_case):  # reports written before NSD was measured
                continue
            v = np.array([c[m][i] for c in per_case], dtype=float)
            if m in ("dice", "nsd"):
                ok = v[~np.isnan(v)]
            else:
                ok = v[np.isfinite(v)]
                row[f"{m}_n_inf"] = int(np.isinf(v).sum())
            row[m] = float(ok.mean()) if ok.size else math.nan
            if ok.size:
                allm[m].append(row[m])
        out["per_class"][name] = row
    out["mean_dice"] = float(np.mean(allm["dice"])) if allm["dice"] else math.nan
    out["mean_hd95"] = float(np.mean(allm["hd95"])) if allm["hd95"] else math.nan
    out["mean_asd"] = float(np.mean(allm["asd"])) if allm["asd"] else math.nan
    out["mean_nsd"] = float(np.mean(allm["nsd"])) if allm["nsd"] else math.nan
    return out


def jsonable(x):
    """nan -> None, inf -> 'inf' so that the JSON is standard."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
