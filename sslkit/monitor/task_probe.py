"""Task probe: does the encoder's representation separate the labels of the user's task, and is it getting better?

The collapse probe (`probe/spread`) says whether the encoder's features move with its input; this one says whether
they separate the anatomy a user cares about. A labelled datalist (decathlon JSON: `training` entries with `image` +
`label` are probe-train, `validation` entries probe-val; with one labelled scan and no validation list, its lower-x
half (RAS: left) is probe-train and its upper-x half probe-val) is preprocessed by the run's own plan once, at the
start of the run, and fixed crops are cut from it. At step 0 and every `every` optimizer steps:

    frozen encoder (eval, no grad)     crops (N, C, *roi) -> stage maps, each resized to one grid (roi / grid_stride)
                                       and concatenated: features (N, F, *grid)
    voxel classifier                   fitted on class-balanced voxels sampled from the probe-train grid (a seeded
                                       generator of its own: the training run's random streams are never touched);
                                       method `logistic`: multinomial logistic regression (L-BFGS, the objective of
                                       scikit-learn's LogisticRegression: sum of cross-entropies + ||W||^2 / (2 C))
                                       on standardised features; `knn`: votes of the k nearest voxels (Euclidean)
    Dice                               class scores upsampled (linear) to the crops' voxels, argmax, Dice per class
                                       over all probe-val voxels together, and their mean over foreground classes

Two reference lines are measured once (at step 0): the same probe on the randomly initialised encoder, and on the
input intensities alone with fixed filters (the intensity, Gaussian smoothing at 1, 2 and 4 voxels, gradient magnitude
at 1 and 2 voxels), so a user sees whether the encoder adds anything beyond intensity.

Metric names (metrics.jsonl, trackers, dashboard):
    task_probe/dice_mean, task_probe/dice/<class>                     every probe step (step 0 included)
    task_probe/ref_random/dice_mean, task_probe/ref_random/dice/<class>        once, in the step-0 row
    task_probe/ref_intensity/dice_mean, task_probe/ref_intensity/dice/<class>  once, in the step-0 row
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslkit import run as R
from sslkit.errors import ConfigError, DataError, user_error_in

PREFIX = "task_probe/"
REF_RANDOM = "task_probe/ref_random/"
REF_INTENSITY = "task_probe/ref_intensity/"
INTENSITY_SIGMAS = (1.0, 2.0, 4.0)      # Gaussian smoothing (voxels)
GRADIENT_SIGMAS = (1.0, 2.0)            # gradient magnitude of Gaussian-smoothed intensities (voxels)


# ------------------------------------------------------------------------------------------ the probe set


@dataclass
class ProbeSet:
    """Fixed labelled crops: images (N, C, *roi) float32, labels (N, *roi) int64 (-1 where a crop is padded)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    class_names: list[str]          # foreground classes 1..K-1
    source: str                     # the datalist, for messages

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1


def _key(name: str) -> str:
    return f"monitor.task_probe.{name}"


def read_probe_datalist(path: str | Path) -> tuple[list[dict], list[dict], list[str]]:
    """(probe-train entries, probe-val entries, class names from a "labels" mapping or []) of a decathlon JSON, with
    paths resolved against the JSON's folder. ConfigError (one line naming the file) when it cannot serve a probe."""
    from sslkit.data.datalist import read_datalist_json, resolve_entries

    p = Path(path).expanduser()
    try:
        raw = read_datalist_json(p, "task-probe datalist (a decathlon JSON with 'training' image + label pairs)")
        if not isinstance(raw, dict) or not raw.get("training"):
            raise DataError(f"{p} has no 'training' entries")
        lists = {k: resolve_entries(raw.get(k) or [], p.resolve().parent, f"{p} [{k}]", need_label=True)
                 for k in ("training", "validation")}
    except DataError as e:
        raise ConfigError(f"{_key('datalist')}: {e}") from None
    for where, entries in lists.items():
        for i, e in enumerate(entries):
            for k in ("image", "label"):
                if not Path(e[k]).exists():
                    raise ConfigError(f"{_key('datalist')}: {p} [{where}][{i}]: {k} file {e[k]} not found")
    labels = raw.get("labels")
    names = [str(labels[k]) for k in sorted(labels, key=int) if int(k) > 0] if isinstance(labels, dict) else []
    return lists["training"], lists["validation"], names


def _preprocess(entry: dict, data_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(image (C, X, Y, Z) float32, label (X, Y, Z) int64) of one labelled entry, by the run's preprocessing."""
    from sslkit.data.preprocess import entry_modality, preprocess_transforms

    chain = preprocess_transforms(data_cfg, entry_modality(entry, data_cfg.modality), "label")
    try:
        out = chain({"image": entry["image"], "label": entry["label"]})
    except Exception as e:  # noqa: BLE001 - MONAI wraps the reader's DataError in a RuntimeError
        why = user_error_in(e) or f"{entry['image']}: {type(e).__name__}: {str(e).splitlines()[0]}"
        raise ConfigError(f"{_key('datalist')}: {why}") from None
    image = np.ascontiguousarray(out["image"].numpy(), dtype=np.float32)
    label = np.asarray(out["label"].numpy())[0]
    if not np.array_equal(label, np.round(label)) or label.min() < 0:
        raise ConfigError(f"{_key('datalist')}: {entry['label']}: holds non-integer or negative values (class "
                          "indices expected)")
    return image, label.astype(np.int64)


def _regions(train: list[dict], val: list[dict], data_cfg) -> tuple[list, list]:
    """Preprocessed (image, label) regions for probe-train and probe-val: the two lists, every third training case
    as validation when there is no validation list, or the two x-halves of a single scan."""
    if not val and len(train) >= 2:
        val, train = train[2::3], [e for i, e in enumerate(train) if i % 3 != 2]
    tr = [_preprocess(e, data_cfg) for e in train]
    if val:
        return tr, [_preprocess(e, data_cfg) for e in val]
    image, label = tr[0]
    mid = image.shape[1] // 2
    return [(image[:, :mid], label[:mid])], [(image[:, mid:], label[mid:])]


def _windows(label: np.ndarray, roi: list[int], n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """n window starts (Latin-hypercube stratified) inside the bounding box of the labelled voxels."""
    from sslkit.data.probe import stratified_starts

    nz = np.nonzero(label > 0)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    ranges = []
    for a, r in enumerate(roi):
        first = min(max(0, (lo[a] + hi[a]) // 2 - r // 2), max(0, label.shape[a] - r)) if hi[a] - lo[a] <= r \
            else lo[a]
        last = min(max(first, hi[a] - r), max(0, label.shape[a] - r))
        ranges.append((first, last))
    starts = stratified_starts([b - a for a, b in ranges], n, rng)
    return [tuple(a + s for (a, _), s in zip(ranges, st)) for st in starts]


def _cut(image: np.ndarray, label: np.ndarray, start, roi: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(C, *roi) image and (*roi) label windows; beyond the volume the image is 0 and the label -1 (ignored)."""
    img = np.zeros((image.shape[0], *roi), np.float32)
    lab = np.full(roi, -1, np.int64)
    src = tuple(slice(s, min(s + r, n)) for s, r, n in zip(start, roi, label.shape))
    dst = tuple(slice(0, sl.stop - sl.start) for sl in src)
    img[(slice(None), *dst)] = image[(slice(None), *src)]
    lab[dst] = label[src]
    return img, lab


def _crops(regions: list, roi3: list[int], per_region: int, rng: np.random.Generator, dims: int):
    images, labels = [], []
    for image, label in regions:
        for start in _windows(label, roi3, per_region, rng):
            img, lab = _cut(image, label, start, roi3)
            images.append(img[..., 0] if dims == 2 else img)     # 2-D runs: one axial slice (C, H, W)
            labels.append(lab[..., 0] if dims == 2 else lab)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def load_probe_set(probe_cfg, data_cfg, spatial_dims: int, seed: int) -> ProbeSet:
    """Read, preprocess and crop the probe's labelled scans once; ConfigError (one line naming the file and the
    problem) when the probe cannot run: no labels, a label on another grid, a class absent from probe-train or
    probe-val (or from their crops)."""
    train, val, names = read_probe_datalist(probe_cfg.datalist)
    names = list(probe_cfg.label_names) or names
    tr, va = _regions(train, val, data_cfg)
    top = max(int(lab.max()) for _, lab in tr + va)
    k = len(names) + 1 if names else top + 1
    if top >= k:
        raise ConfigError(f"{_key('label_names')}: {len(names)} names, but {probe_cfg.datalist} holds class {top}")
    if k < 2:
        raise ConfigError(f"{_key('datalist')}: {probe_cfg.datalist}: the labels hold no foreground class")
    names = names or [f"class_{c}" for c in range(1, k)]
    for where, regions in (("probe-train", tr), ("probe-val", va)):
        present = set().union(*(np.unique(lab).tolist() for _, lab in regions))
        missing = [names[c - 1] for c in range(1, k) if c not in present]
        if missing:
            raise ConfigError(f"{_key('datalist')}: {probe_cfg.datalist}: class {', '.join(missing)} is absent from "
                              f"{where}; every class must appear in both")
    roi = list(probe_cfg.crop_size or data_cfg.roi)
    roi3 = roi + [1] * (3 - len(roi))
    rng = np.random.default_rng([int(seed), 7_717])
    xt, yt = _crops(tr, roi3, probe_cfg.crops, rng, spatial_dims)
    xv, yv = _crops(va, roi3, probe_cfg.crops, rng, spatial_dims)
    missing = [names[c - 1] for c in range(1, k) if not bool((yv == c).any())]
    if missing:
        raise ConfigError(f"{_key('crops')}: the {len(xv)} probe-val crops of {probe_cfg.datalist} miss class "
                          f"{', '.join(missing)}; raise monitor.task_probe.crops or crop_size")
    return ProbeSet(xt, yt, xv, yv, names, str(probe_cfg.datalist))


# ------------------------------------------------------------------------------------------ features


def _resize(x: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *grid): area average where the map is finer than the grid, linear where coarser."""
    if list(x.shape[2:]) == list(grid):
        return x
    if all(s >= g for s, g in zip(x.shape[2:], grid)):
        return F.adaptive_avg_pool3d(x, grid) if x.ndim == 5 else F.adaptive_avg_pool2d(x, grid)
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=grid, mode=mode, align_corners=False)


@torch.no_grad()
def encoder_features(encoder: nn.Module, crops: torch.Tensor, grid: list[int], chunk: int = 2) -> torch.Tensor:
    """Every stage map of the encoder, resized to `grid` and concatenated: (N, C_in, *roi) -> (N, sum C_i, *grid),
    float32 on the CPU. Eval mode and no grad; each module's train/eval mode is restored."""
    modes = {m: m.training for m in encoder.modules()}
    param = next(encoder.parameters())
    encoder.eval()
    try:
        out = []
        for part in crops.split(chunk):
            maps = encoder(part.to(param.device, param.dtype))
            out.append(torch.cat([_resize(m.float(), grid) for m in maps], 1).cpu())
        return torch.cat(out)
    finally:
        for m, mode in modes.items():
            m.training = mode


def intensity_features(crops: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Fixed filters of the input, the intensity-only reference: per channel the intensity, Gaussian smoothing at
    INTENSITY_SIGMAS and gradient magnitude at GRADIENT_SIGMAS (voxels), averaged onto `grid`. (N, 6 C, *grid)."""
    from scipy import ndimage

    x = crops.numpy().astype(np.float64)
    maps = []
    for img in x.reshape(-1, *x.shape[2:]):                       # one (N * C) spatial array at a time
        filters = [img] + [ndimage.gaussian_filter(img, s, mode="nearest") for s in INTENSITY_SIGMAS]
        filters += [ndimage.gaussian_gradient_magnitude(img, s, mode="nearest") for s in GRADIENT_SIGMAS]
        maps.append(np.stack(filters))
    feats = torch.from_numpy(np.stack(maps)).float()              # (N * C, 6, *S)
    feats = feats.reshape(x.shape[0], -1, *x.shape[2:])           # (N, C * 6, *S)
    return _resize(feats, grid)


def label_grid(labels: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Labels (N, *S) at the cells of `grid` (nearest cell centre): (N, *grid)."""
    return F.interpolate(labels[:, None].float(), size=grid, mode="nearest-exact")[:, 0].long()


# ------------------------------------------------------------------------------------------ classifiers


def balanced_sample(labels: torch.Tensor, num_classes: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Indices into labels (M,) with up to n // K voxels of each class (all of a class that has fewer), drawn without
    replacement by `gen`; voxels labelled -1 (padding) are never drawn."""
    per = max(1, n // num_classes)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() > per:
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:per]]
        picks.append(idx)
    return torch.cat(picks)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(x - mean) / std with the statistics of `train` (std floor 1e-6), applied to train and others."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 1.0,
                 max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS (float32): minimises sum_i CE(x_i W + b, y_i) + ||W||^2 / (2 c)
    (scikit-learn's LogisticRegression objective; the bias is not penalised). x (n, F), y (n,). Returns (W (F, K),
    b (K,)). At the probe's default c = 0.001 on standardised features it converges in well under max_iter. The
    gradient is written out (softmax minus one-hot), not taken by autograd: half the probe's cost was autograd's
    bookkeeping around two small matrix products."""
    x, n = x.float().contiguous(), x.shape[0]
    x_t = x.T.contiguous()
    w = torch.zeros(x.shape[1], num_classes)
    b = torch.zeros(num_classes)
    one_hot = F.one_hot(y, num_classes).float()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():  # the objective above divided by n, and its gradient
        log_p = torch.log_softmax(x @ w + b, 1)
        loss = -(log_p * one_hot).sum() / n + (w * w).sum() / (2.0 * c * n)
        residual = (log_p.exp() - one_hot) / n
        w.grad, b.grad = x_t @ residual + w / (c * n), residual.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return w, b


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, num_classes: int, k: int,
               chunk: int = 4096) -> torch.Tensor:
    """Class scores (M, K) of x (M, F): the share of each class among the k nearest training voxels (Euclidean
    distance between standardised features; train (n, F), labels (n,))."""
    out = []
    for part in x.split(chunk):
        idx = torch.cdist(part, train_x).topk(min(k, train_x.shape[0]), dim=1, largest=False).indices  # (m, k)
        votes = torch.zeros(part.shape[0], num_classes)
        out.append(votes.scatter_add_(1, train_y[idx], torch.full(idx.shape, 1.0 / idx.shape[1])))
    return torch.cat(out)


def dice_per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class over all voxels together (voxels labelled -1 ignored); nan when a class is in
    neither the prediction nor the labels."""
    keep = labels >= 0
    p, g = pred[keep], labels[keep]
    out = []
    for c in range(1, num_classes):
        inter = float(((p == c) & (g == c)).sum())
        total = float((p == c).sum() + (g == c).sum())
        out.append(2.0 * inter / total if total else math.nan)
    return out


# ------------------------------------------------------------------------------------------ the probe


class TaskProbe:
    """The probe of one run: its fixed crops, classifier settings and random stream.

        probe = TaskProbe(load_probe_set(cfg.monitor.task_probe, cfg.data, dims, seed), cfg.monitor.task_probe, seed)
        metrics = probe.measure(encoder)               # {"task_probe/dice_mean": ..., "task_probe/dice/<c>": ...}
        refs = probe.references(random_encoder)        # the two reference lines, once
    Each measurement draws its voxels from a generator seeded by (seed, measurement count): the same encoder gives
    the same figures, and no global random stream moves."""

    def __init__(self, data: ProbeSet, cfg, seed: int):
        self.data, self.cfg, self.seed = data, cfg, seed
        roi = list(data.train_images.shape[2:])
        self.grid = [max(1, r // cfg.grid_stride) for r in roi]

    def measure(self, encoder: nn.Module, prefix: str = PREFIX) -> dict[str, float]:
        d = self.data
        return self._score(encoder_features(encoder, d.train_images, self.grid),
                           encoder_features(encoder, d.val_images, self.grid), prefix)

    def references(self, random_encoder: nn.Module | None) -> dict[str, float]:
        """The intensity-only line, and the random-encoder line when `random_encoder` is given."""
        d = self.data
        out = self._score(intensity_features(d.train_images, self.grid), intensity_features(d.val_images, self.grid),
                          REF_INTENSITY)
        if random_encoder is not None:
            out.update(self.measure(random_encoder, REF_RANDOM))
        return out

    def _score(self, train_f: torch.Tensor, val_f: torch.Tensor, prefix: str) -> dict[str, float]:
        d, k = self.data, self.data.num_classes
        y = label_grid(d.train_labels, self.grid).flatten()                        # (N * G,)
        xt = train_f.movedim(1, -1).reshape(-1, train_f.shape[1])                 # (N, F, *grid) -> (N * G, F)
        xv = val_f.movedim(1, -1).reshape(-1, val_f.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        idx = balanced_sample(y, k, self.cfg.voxels, gen)
        xs, xv = standardise(xt[idx], xv)
        if self.cfg.method == "knn":
            scores = knn_scores(xs, y[idx], xv, k, self.cfg.knn_k)
        else:
            w, b = fit_logistic(xs, y[idx], k, self.cfg.c)
            scores = xv @ w + b
        return self.dice_metrics(scores, prefix)

    def dice_metrics(self, voxel_scores: torch.Tensor, prefix: str = PREFIX) -> dict[str, float]:
        """Dice figures of class scores (N * G, K) at the grid cells of the probe-val crops, in the crops' order."""
        d = self.data
        n, k = d.val_images.shape[0], d.num_classes
        scores = voxel_scores.reshape(n, *self.grid, k).movedim(-1, 1)              # (N, K, *grid)
        mode = "trilinear" if scores.ndim == 5 else "bilinear"
        full = F.interpolate(scores, size=list(d.val_labels.shape[1:]), mode=mode, align_corners=False)
        dice = dice_per_class(full.argmax(1), d.val_labels, k)
        out = {f"{prefix}dice/{name}": v for name, v in zip(d.class_names, dice)}
        finite = [v for v in dice if not math.isnan(v)]
        out[f"{prefix}dice_mean"] = float(np.mean(finite)) if finite else math.nan
        return out


def probe_encoder(objectives, student_encoder: nn.Module) -> nn.Module:
    """The encoder the probe embeds with: the teacher's where an objective keeps an EMA teacher of the encoder, else
    the student's."""
    for teacher in objectives.teachers().values():
        try:
            return teacher["encoder"]
        except KeyError:
            continue
    return student_encoder


def probe_record(run_dir: Path, upto: int | None = None) -> dict:
    """{"task_probe": {"last": {...}, "best": {...}, "references": {...}}} from a run's metrics.jsonl (its rows up
    to step `upto`), for the plan and model card of its exported encoder ({} when the run had no task probe)."""
    rows = [r for r in R.read_jsonl(Path(run_dir) / "metrics.jsonl")
            if "task_probe/dice_mean" in r and (upto is None or r["step"] <= upto)]
    if not rows:
        return {}

    def figures(row: dict) -> dict:
        return {"step": row["step"], **{k[len(PREFIX):]: v for k, v in row.items()
                                        if k.startswith(PREFIX) and not k.startswith((REF_RANDOM, REF_INTENSITY))}}

    finite = [r for r in rows if r["step"] > 0 and math.isfinite(r["task_probe/dice_mean"])]
    best = max(finite, key=lambda r: r["task_probe/dice_mean"]) if finite else None
    refs = {name: rows[0].get(f"{prefix}dice_mean") for name, prefix in (("random", REF_RANDOM),
                                                                          ("intensity", REF_INTENSITY))}
    return {"task_probe": {"last": figures(rows[-1]), "best": figures(best) if best else None,
                           "references": {k: v for k, v in refs.items() if v is not None}}}


def probe_summary(run_dir: Path) -> str | None:
    """Two lines for the end of a run: the task probe's mean Dice at every probe step and the two references, or
    None without a task probe."""
    rows = [r for r in R.read_jsonl(Path(run_dir) / "metrics.jsonl") if PREFIX + "dice_mean" in r]
    if not rows:
        return None
    curve = ", ".join(f"step {r['step']} {r[PREFIX + 'dice_mean']:.3f}" for r in rows)
    refs = [(name, rows[0].get(f"{prefix}dice_mean")) for name, prefix in (("random init", REF_RANDOM),
                                                                           ("intensity only", REF_INTENSITY))]
    ref_text = "; ".join(f"{name} {v:.3f}" for name, v in refs if v is not None)
    return f"  task probe mean Dice: {curve}\n  references (step 0): {ref_text}"
