"""Self-supervised pretraining dataset: the store of preprocessed volumes -> deterministic crops, views, VoCo samples.

Preparation: every datalist entry is preprocessed once by `prepare_entry` (the one preprocessing stack,
`sslkit.data.preprocess`; `sslkit data prepare` calls the same function) and written to a `VolumeStore`
(`sslkit.data.store`: blosc2, `data.store_dtype` float16 | int16 | float32, chunks and blocks sized to the crop) in
`data.cache_dir` under its cache key. The key hashes the absolute path, size, mtime, the preprocessing parameters,
the store dtype and, with labels, the label's path, size and mtime, so later epochs and runs only read crops.

Items are addressed by `(index, epoch)`; all randomness comes from `numpy.random.default_rng([seed, epoch, index,
stream])`, so a resumed run sees exactly the same crops and views. Every crop reads only its window from the store
(`read_crop`): the image crop, the second view's shifted window, the label window, a VoCo region; 2-D runs read an
axial slice window (sizes (h, w, 1)).

With `data.with_labels` every entry's "label" map is preprocessed together with its image (same geometry, nearest
neighbour) and stored with it (exactly, as integers); each item's "label" is cut with the window of its "image" crop.

Data requests (what the objectives need, `Objective.data_requests()` merged by `Composite`; None means views):
    {"views": {}}                          "image", "view1", "view2" (and "label")
    {"voco": {"grid": n, "n_random": R}}   "voco_base" (G, C, *roi), "voco_random" (R, C, *roi),
                                           "voco_targets" (R, G) (`sslkit.data.multicrop`), G = n * n, and the
                                           crops' start corners "voco_base_starts" (G, dims), "voco_random_starts"
                                           (R, dims) int64; one item is one volume's sample.
    {"multicrop": {"n_global", "n_local", "local_size", "region", "global_scale", "local_scale"}}
                                           DINO / iBOT multi-crop (`sslkit.data.multicrop.crop_boxes`): a region of
                                           round(region x roi) voxels per axis is read once; "global_crops"
                                           (n_global, C, *roi) and "local_crops" (n_local, C, *round(local_size x
                                           roi)) are random boxes of it holding a volume fraction in global_scale /
                                           local_scale, resampled to their size, each then augmented by data.views
                                           (its own view seed); no "local_crops" when n_local is 0.
    {"masks": {"patch", "ratio", "prob", "count"}}
                                           "masks" (count, *roi / patch) bool: token masks over cells of `patch`
                                           voxels (`sslkit.data.multicrop.token_masks`); data.roi must be a multiple.
Every key is a pure function of (seed, epoch, index), so resumed runs and any number of ranks see the same items.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sslkit.config import DataConfig
from sslkit.data.multicrop import (crop_boxes, cut_windows, overlap_targets, resized_crops, token_masks,
                                    voco_region, voco_windows)
from sslkit.data.store import DTYPES, VolumeStore
from sslkit.errors import ConfigError, DataError, UserError, user_error_in

_CROP, _VIEW1, _VIEW2, _PROBE, _SHIFT, _VOCO, _MULTICROP, _MASKS = 0, 1, 2, 3, 4, 5, 6, 7  # rng sub-streams
REQUESTS = ("views", "voco", "multicrop", "masks")


# ------------------------------------------------------------------------------------------------ keys


def _file_stamp(path: Path) -> tuple[int, int]:
    """(total size, latest mtime_ns) of a file, or of the files directly in a folder (DICOM series)."""
    if path.is_dir():
        stats = [f.stat() for f in path.iterdir() if f.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def cache_key(path: str | Path, params: dict, label: str | Path | None = None, store_dtype: str | None = None) -> str:
    """sha1 of absolute path + size + mtime + preprocessing params (raises OSError if the path is missing).
    With `label` its absolute path, size and mtime join the hash (DataError if it is missing), so an edited label
    is stored again; with `store_dtype` the stored dtype does (a float32 run never reads float16 volumes)."""
    p = Path(path).resolve()
    size, mtime = _file_stamp(p)
    fields = {"path": str(p), "size": size, "mtime": mtime, "params": params}
    if label is not None:
        fields["label"] = _label_stamp(label)
    if store_dtype is not None:
        fields["store_dtype"] = store_dtype
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:24]


def _label_stamp(label: str | Path) -> dict:
    lp = Path(label).resolve()
    if not lp.exists():
        raise DataError(f"{label}: label file not found")
    size, mtime = _file_stamp(lp)
    return {"path": str(lp), "size": size, "mtime": mtime}


MIN_PARTITION_CROP = 64  # chunks and blocks are sized for crops of at least this edge (see store_crop_size)


def check_store_dtype(dtype: str) -> None:
    """ConfigError naming data.store_dtype unless it is float16, int16 or float32 (before any scan is read)."""
    if dtype not in DTYPES:
        raise ConfigError(f"data.store_dtype: '{dtype}' is not one of {', '.join(DTYPES)}")


def store_crop_size(roi, spatial_dims: int) -> list[int]:
    """The crop the store's chunks and blocks are sized for: max(roi, 64) per axis in 3-D; (max(h, 64), max(w, 64), 1)
    for a 2-D run's slice windows. Below 64 the store's rule (blocks of crop/4 rounded down to a power of two) gives
    8-voxel blocks, whose per-block cost made random crops 1.5x (32^3) to 2x (48^3) slower to read than with the
    16-voxel blocks of a 64 crop (measured on the demo scans at 2 mm, float16)."""
    sizes = [max(int(r), MIN_PARTITION_CROP) for r in roi]
    return sizes + [1] if spatial_dims == 2 else sizes


# ------------------------------------------------------------------------------------------------ one entry


def entry_label(item: dict, with_labels: bool) -> str | None:
    """The entry's label path with data.with_labels (DataError if it has none), else None."""
    if not with_labels:
        return None
    label = item.get("label")
    if not isinstance(label, str) or not label:
        raise DataError(f"{item['image']}: datalist entry has no 'label' but data.with_labels is true")
    return label


def _label_array(label, image_shape: tuple, path: str) -> np.ndarray:
    """Preprocessed label (1, X, Y, Z) float class values -> int32, checked against the image's shape."""
    lab = np.asarray(label.numpy() if hasattr(label, "numpy") else label)
    if tuple(lab.shape) != tuple(image_shape):
        raise DataError(f"{path}: label is {tuple(lab.shape)} after preprocessing but its image is {image_shape}")
    if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
        raise DataError(f"{path}: label holds non-integer values (class indices expected, not probabilities)")
    return np.ascontiguousarray(lab, dtype=np.int32)


def _voxel_sizes(affine: np.ndarray) -> list[float]:
    """Column norms of the affine's linear part: the preprocessed voxel size per axis (mm)."""
    n = affine.shape[0] - 1
    return [round(float(v), 6) for v in np.linalg.norm(affine[:n, :n], axis=0)]


def _preprocess_into(store: VolumeStore, key: str, path: str, label: str | None, transform, params: dict,
                     modality: str, cfg: DataConfig, crop_size: list[int]) -> dict:
    """Run the preprocessing chain on one entry and write the result under `key`; returns the sidecar."""
    out = transform({"image": path} if label is None else {"image": path, "label": label})
    img = out["image"]                                # (C, X, Y, Z) MetaTensor
    arr = np.ascontiguousarray(img.numpy(), dtype=np.float32)
    if arr.size == 0 or min(arr.shape[1:]) == 0:
        raise DataError(f"{path}: empty after preprocessing (no foreground in the intensity window)")
    affine = np.asarray(img.affine, dtype=np.float64)
    meta = {"source": str(Path(path).resolve()), "modality": modality, "params": params,
            "affine": affine.tolist(), "spacing": _voxel_sizes(affine)}
    lab = None
    if label is not None:
        lab = _label_array(out["label"], arr.shape, label)  # (1, X, Y, Z) int32
        meta["label"] = str(Path(label).resolve())
    return store.write(key, arr, meta, dtype=cfg.store_dtype, label=lab, crop_size=crop_size)


def prepare_entry(item: dict, label: str | None, cfg: DataConfig, store: VolumeStore, crop_size: list[int],
                  transforms: dict, stored: dict | None = None) -> tuple[dict, bool]:
    """Find or make the stored volume of one datalist entry: ({"path", "key", "shape", "modality"[, "label"]},
    preprocessed now?). Raises on a bad entry (missing file, unreadable scan, label off the grid, ...).

    `transforms`: this process's {(modality, labelled): chain} cache; `stored`: {key: sidecar} of the store when
    the caller listed it once (else the store is asked per key)."""
    from sslkit.data.preprocess import entry_modality, preprocess_transforms, preprocessing_params

    path = str(item["image"])
    modality = entry_modality(item, cfg.modality)
    params = preprocessing_params(cfg, modality)
    key = cache_key(path, params, label, cfg.store_dtype)
    info = stored.get(key) if stored is not None else (store.info(key) if store.has(key) else None)
    made = info is None
    if made:
        chain = (modality, label is not None)
        if chain not in transforms:
            transforms[chain] = preprocess_transforms(cfg, modality, "label" if label is not None else None)
        info = _preprocess_into(store, key, path, label, transforms[chain], params, modality, cfg, crop_size)
    volume = {"path": path, "key": key, "shape": list(info["shape"]), "modality": modality}
    if label is not None:
        volume["label"] = label
    return volume, made


def _error_line(e: BaseException) -> str:
    """One line for the skipped log: the UserError inside MONAI's wrapping RuntimeError if there is one."""
    user = user_error_in(e)
    if user is not None:
        return str(user)
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return (f"{type(inner).__name__}: {inner}".splitlines() or [""])[0][:300]


def _first_problems(rows: list[dict], shown: int = 3) -> str:
    """'FILE: why; FILE: why; ... and N more' for skip rows (the first `shown`)."""
    lines = [r["error"] if r["error"].startswith(r["path"]) else f"{r['path']}: {r['error']}" for r in rows[:shown]]
    more = f"; and {len(rows) - shown} more" if len(rows) > shown else ""
    return "; ".join(lines) + more


def skip_row(path: str, label: str | None, error: str) -> dict:
    """A skipped.jsonl row: {"path", "error"}, or {"path", "label", "error"} for a labelled entry."""
    return {"path": path, "error": error} if label is None else {"path": path, "label": label, "error": error}


def try_prepare_entry(item: dict, cfg: DataConfig, store: VolumeStore, crop_size: list[int], transforms: dict,
                      stored: dict | None = None) -> tuple[dict | None, dict | None, bool]:
    """(volume, None, preprocessed now?) for a good entry; (None, skip row, False) for a bad one."""
    path, label = str(item["image"]), None
    try:
        label = entry_label(item, cfg.with_labels)
        volume, made = prepare_entry(item, label, cfg, store, crop_size, transforms, stored)
        return volume, None, made
    except FileNotFoundError:
        return None, skip_row(path, label, f"{path}: no such file or folder"), False
    except Exception as e:  # noqa: BLE001 - a bad scan (or label) must not stop the run; it is logged
        return None, skip_row(path, label, _error_line(e)), False


def logged_rows(log: Path) -> set[tuple]:
    """(path, label) of the rows already in a skipped.jsonl (unreadable lines ignored)."""
    if not log.exists():
        return set()
    seen = set()
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            seen.add((row.get("path"), row.get("label")))
        except (json.JSONDecodeError, AttributeError):
            continue
    return seen


def append_skip_row(log: Path, row: dict) -> None:
    """Append `row` to `log` unless a row for its (path, label) is there already (another worker logged it)."""
    if (row["path"], row.get("label")) in logged_rows(log):
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def normalise_requests(requests: dict | None) -> dict:
    """The data requests of the objectives (module docstring); None -> {"views": {}}. ValueError on unknown
    names or bad VoCo sizes (they come from objective code, not from the user)."""
    requests = {"views": {}} if requests is None else dict(requests)
    unknown = set(requests) - set(REQUESTS)
    if unknown or not requests:
        raise ValueError(f"data requests {sorted(requests)}: use one or more of {', '.join(REQUESTS)}")
    if "voco" in requests:
        v = requests["voco"]
        grid, n_random = int(v["grid"]), int(v["n_random"])
        if grid < 1 or n_random < 1:
            raise ValueError(f"voco data request needs grid >= 1 and n_random >= 1, got {v}")
        requests["voco"] = {"grid": grid, "n_random": n_random}
    if "multicrop" in requests:
        requests["multicrop"] = _multicrop_request(requests["multicrop"])
    if "masks" in requests:
        requests["masks"] = _masks_request(requests["masks"])
    return requests


def _scale_range(value, what: str) -> list[float]:
    lo, hi = (float(v) for v in value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{what} {list(value)} must satisfy 0 < low <= high <= 1")
    return [lo, hi]


def _multicrop_request(m: dict) -> dict:
    out = {"n_global": int(m["n_global"]), "n_local": int(m["n_local"]), "local_size": float(m["local_size"]),
           "region": float(m["region"]), "global_scale": _scale_range(m["global_scale"], "multicrop global_scale"),
           "local_scale": _scale_range(m["local_scale"], "multicrop local_scale")}
    if out["n_global"] < 1 or out["n_local"] < 0 or not 0 < out["local_size"] <= 1 or out["region"] < 1:
        raise ValueError(f"multicrop data request needs n_global >= 1, n_local >= 0, 0 < local_size <= 1 and "
                         f"region >= 1, got {m}")
    return out


def _masks_request(m: dict) -> dict:
    out = {"patch": int(m["patch"]), "ratio": [float(r) for r in m["ratio"]], "prob": float(m["prob"]),
           "count": int(m["count"])}
    lo, hi = out["ratio"]
    if out["patch"] < 1 or out["count"] < 1 or not 0 <= lo <= hi <= 1 or not 0 <= out["prob"] <= 1:
        raise ValueError(f"masks data request needs patch >= 1, count >= 1, 0 <= ratio low <= high <= 1 and "
                         f"prob in [0, 1], got {m}")
    return out


Window = tuple[int | None, list[int]]  # (axial slice z in 2-D runs, else None; window start per axis)


class PretrainDataset(Dataset):
    """Random crops of stored volumes with two augmented views each (and / or VoCo samples, see `requests`).

    len = valid volumes x crops_per_volume. `ds[(index, epoch)]` (or `ds[index]`, epoch 0) returns
    `{"image": (C, *roi), "view1": (C, *roi), "view2": (C, *roi), "index": int}` float32 tensors, plus
    `"label": (1, *roi)` int64 with data.with_labels (aligned with "image", not with the augmented views), plus the
    VoCo keys when requested (module docstring). spatial_dims 2 (a 2-D model): a random axial slice of the volume,
    crops (C, H, W).
    """

    def __init__(self, items: list[dict], data_cfg: DataConfig, cache_dir: Path, seed: int,
                 skipped_log: Path | None = None, spatial_dims: int = 3, requests: dict | None = None):
        check_store_dtype(data_cfg.store_dtype)
        self.items = list(items)
        self.cfg = data_cfg
        self.cache_dir = Path(cache_dir)
        self.store = VolumeStore(self.cache_dir)
        self.seed = int(seed)
        self.skipped_log = Path(skipped_log) if skipped_log is not None else None
        self.roi = tuple(int(r) for r in data_cfg.roi)
        self.spatial_dims = spatial_dims
        if len(self.roi) != self.spatial_dims:
            raise UserError(f"data.roi: {list(self.roi)} needs {self.spatial_dims} sizes")
        self.crops_per_volume = max(1, int(data_cfg.crops_per_volume))
        self.with_labels = bool(data_cfg.with_labels)
        self.requests = normalise_requests(requests)
        patch = self.requests.get("masks", {}).get("patch")
        if patch and any(r % patch for r in self.roi):
            raise ConfigError(f"data.roi: {list(self.roi)} is not a multiple of the {patch}-voxel mask cells the "
                              f"objectives mask tokens by")
        self.volumes: list[dict] = []    # {"path", "key", "shape", "modality"[, "label"]} per valid stored volume
        self.n_preprocessed = 0          # scans preprocessed (not found in the store) by this process
        self._bad: set[int] = set()      # volume indices that failed at read time (per process)
        self._logged: set[tuple] = set()  # (path, label) already in skipped_log

    # --------------------------------------------------------------------------------------- preparing

    @property
    def crop_size(self) -> list[int]:
        return store_crop_size(self.roi, self.spatial_dims)

    def prepare(self, progress: bool = True, failures: dict[int, dict] | None = None,
                log_skips: bool = True) -> "PretrainDataset":
        """Open every entry's stored volume, preprocessing (and storing) the ones missing; skip and log the bad
        ones (`log_skips`). `failures` {entry index: skip row}: entries another process already found bad (they are
        logged, not retried). Returns self."""
        from tqdm.auto import tqdm

        failures = failures or {}
        stored = self.store.infos()  # one listing of the store folder
        transforms: dict = {}
        self.volumes, n_made, bad = [], 0, []
        for i, item in enumerate(tqdm(self.items, desc="preparing scans", unit="scan", disable=not progress)):
            volume, row, made = (None, failures[i], False) if i in failures else \
                try_prepare_entry(item, self.cfg, self.store, self.crop_size, transforms, stored)
            n_made += made
            if volume is not None:
                self.volumes.append(volume)
            else:
                bad.append(row)
                if log_skips:
                    self._record_skip(row)
        self.n_preprocessed += n_made
        where = f" (every one in {self.skipped_log})" if self.skipped_log else ""
        if not self.volumes:
            raise DataError(f"no usable scans among {len(self.items)} datalist entries: {_first_problems(bad)}{where}")
        if bad and log_skips:
            print(f"sslkit: warning: {len(bad)} of {len(self.items)} scans left out as unreadable: "
                  f"{_first_problems(bad, 1)}{where}", file=sys.stderr, flush=True)
        return self

    def prepare_part(self, part: int, parts: int, progress: bool = True) -> dict[int, dict]:
        """Preprocess the missing entries i with i % parts == part into the store (one process's share of a
        parallel preparation); returns {entry index: skip row} of its bad entries, logging nothing."""
        from tqdm.auto import tqdm

        stored = self.store.infos()
        transforms: dict = {}
        failures: dict[int, dict] = {}
        mine = range(part, len(self.items), parts)
        for i in tqdm(mine, desc=f"preparing scans (part {part + 1}/{parts})", unit="scan", disable=not progress):
            volume, row, made = try_prepare_entry(self.items[i], self.cfg, self.store, self.crop_size, transforms,
                                                  stored)
            self.n_preprocessed += made
            if row is not None:
                failures[i] = row
        return failures

    def corpus_summary(self) -> dict:
        """What the run trains on, for the plan: {"scans", "modalities": {modality: count}, "skipped"}."""
        mods: dict[str, int] = {}
        for v in self.volumes:
            mods[v["modality"]] = mods.get(v["modality"], 0) + 1
        return {"scans": len(self.volumes), "modalities": dict(sorted(mods.items())),
                "skipped": len(self.items) - len(self.volumes)}

    def _record_skip(self, row: dict) -> None:
        """Append a skip row to skipped_log, once per (path, label)."""
        ident = (row["path"], row.get("label"))
        if ident in self._logged:
            return
        self._logged.add(ident)
        if self.skipped_log is not None:
            append_skip_row(self.skipped_log, row)

    # --------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.volumes) * self.crops_per_volume

    def stored_volume(self, vol: int) -> np.ndarray:
        """The whole stored image of volume `vol` as the dataset reads it: float32 (C, X, Y, Z)."""
        return self.store.read_volume(self.volumes[vol]["key"])

    def stored_label(self, vol: int) -> np.ndarray:
        """The whole stored label of volume `vol`: int64 (1, X, Y, Z)."""
        v = self.volumes[vol]
        return self.store.read_label_crop(v["key"], [0, 0, 0], v["shape"][1:])

    def _substituting(self, vol: int, read):
        """read(v) on volume `vol`, or on the next readable volume when the stored one is corrupt or gone (logged
        once, remembered per process), so every key of an item comes from one volume."""
        if not self.volumes:
            raise RuntimeError("PretrainDataset.prepare() must run before indexing")
        n = len(self.volumes)
        for k in range(n):
            v = (vol + k) % n
            if v in self._bad:
                continue
            try:
                return read(v)
            except (DataError, OSError) as e:  # substitute deterministically, log once
                self._bad.add(v)
                info = self.volumes[v]
                self._record_skip(skip_row(info["path"], info.get("label"),
                                           f"stored volume unreadable: {type(e).__name__}: {e}".splitlines()[0][:300]))
        raise DataError(f"no readable stored volume left in {self.cache_dir}")

    def _rng(self, index: int, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index), stream])

    def _draw_slice(self, nz: int, rng: np.random.Generator, center: bool = False) -> int:
        z = int(rng.integers(nz // 4, max(nz // 4, 3 * nz // 4) + 1)) if center else int(rng.integers(0, nz))
        return min(z, nz - 1)

    def _draw_window(self, shape: tuple, rng: np.random.Generator, center: bool = False) -> Window:
        """Where a crop of a (C, X, Y, Z) volume goes: a random (or jittered-centre) window of roi; 2-D runs pick
        an axial slice first. The window may reach past a small volume (the cut is zero-padded)."""
        sizes = shape[1:]
        z = None
        if self.spatial_dims == 2:
            z, sizes = self._draw_slice(shape[3], rng, center), shape[1:3]
        starts = []
        for s, r in zip(sizes, self.roi):
            hi = max(0, s - r)
            if center:
                jitter = max(0, min(hi // 2, r // 8))
                starts.append(hi // 2 + int(rng.integers(-jitter, jitter + 1)))
            else:
                starts.append(int(rng.integers(0, hi + 1)))
        return z, starts

    def _shift_window(self, window: Window, shape: tuple, rng: np.random.Generator) -> Window:
        """The second view's window: moved from `window` by up to data.views.shift x roi per axis, inside the volume."""
        z, starts = window
        sizes = shape[1:3] if z is not None else shape[1:]
        moved = []
        for a, s, r in zip(starts, sizes, self.roi):
            m = int(round(self.cfg.views.shift * r))
            moved.append(int(np.clip(a + rng.integers(-m, m + 1), 0, max(0, s - r))))
        return z, moved

    def _read(self, vol: int, window: Window, sizes=None, label: bool = False) -> np.ndarray:
        """(C, *sizes) window of volume `vol` (sizes default roi; label: int64 (1, *sizes)), zero-padded past the
        volume. 2-D: the window of axial slice z, read as (.., .., 1)."""
        z, starts = window
        sizes = list(sizes or self.roi)
        read = self.store.read_label_crop if label else self.store.read_crop
        key = self.volumes[vol]["key"]
        if z is None:
            return read(key, starts, sizes)
        return read(key, list(starts) + [z], sizes + [1])[..., 0]

    def _read_crops(self, v: int, index: int, epoch: int) -> dict[str, np.ndarray]:
        """Every array an item of volume v needs, read from the store (all reads happen here, so a corrupt volume
        fails before any view is drawn)."""
        shape = tuple(self.volumes[v]["shape"])
        out: dict[str, np.ndarray] = {}
        if "views" in self.requests:
            window = self._draw_window(shape, self._rng(index, epoch, _CROP))
            out["image"] = self._read(v, window)                                        # (C, *roi)
            out["image2"] = out["image"]
            if self.cfg.views.shift > 0:  # overlapping, not identical, crops for the two views
                out["image2"] = self._read(v, self._shift_window(window, shape, self._rng(index, epoch, _SHIFT)))
            if self.with_labels:
                out["label"] = self._read(v, window, label=True)                         # (1, *roi) int64
        if "voco" in self.requests:
            out.update(self._read_voco(v, shape, self._rng(index, epoch, _VOCO)))
        if "multicrop" in self.requests:
            out.update(self._read_multicrop(v, shape, self._rng(index, epoch, _MULTICROP)))
        return out

    def _read_multicrop(self, v: int, shape: tuple, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Un-augmented DINO crops (module docstring): the region is read once (zero-padded past the volume) and
        every crop is a resampled box of it. 2-D: an axial slice is drawn first."""
        req = self.requests["multicrop"]
        z = self._draw_slice(shape[3], rng) if self.spatial_dims == 2 else None
        spatial = shape[1:3] if z is not None else shape[1:]
        region = [max(1, int(round(r * req["region"]))) for r in self.roi]
        origin = [int(rng.integers(0, max(0, s - r) + 1)) for s, r in zip(spatial, region)]
        arr = self._read(v, (z, origin), region)                                    # (C, *region)
        starts, sizes = crop_boxes(region, req["n_global"], req["global_scale"], rng)
        out = {"global_crops": resized_crops(arr, starts, sizes, self.roi)}         # (G, C, *roi)
        if req["n_local"]:
            local_roi = [max(1, int(round(r * req["local_size"]))) for r in self.roi]
            starts, sizes = crop_boxes(region, req["n_local"], req["local_scale"], rng)
            out["local_crops"] = resized_crops(arr, starts, sizes, local_roi)       # (L, C, *local_roi)
        return out

    def _augmented_crops(self, crops: dict, epoch: int, index: int) -> None:
        """data.views applied to every multi-crop crop in place, crop k (globals first) seeded by
        (seed, epoch, index, multicrop stream, k)."""
        from sslkit.data.views import make_view

        k = 0
        for name in ("global_crops", "local_crops"):
            if name in crops:
                views = []
                for crop in crops[name]:
                    views.append(make_view(crop, self.cfg.views, (self.seed, epoch, index, _MULTICROP, k)))
                    k += 1
                crops[name] = np.stack(views)

    def _masks(self, epoch: int, index: int) -> np.ndarray:
        req = self.requests["masks"]
        grid = [r // req["patch"] for r in self.roi]
        return token_masks(grid, req["count"], req["ratio"], req["prob"], self._rng(index, epoch, _MASKS))

    def _read_voco(self, v: int, shape: tuple, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One VoCo sample (`sslkit.data.multicrop.voco_windows`): the region the base crops tile is read once and
        every crop is cut from it (random crops lie inside the region). 2-D: an axial slice is drawn first."""
        req = self.requests["voco"]
        z = self._draw_slice(shape[3], rng) if self.spatial_dims == 2 else None
        spatial = shape[1:3] if z is not None else shape[1:]
        base, rand = voco_windows(spatial, self.roi, req["grid"], req["n_random"], rng)  # (G, dims), (R, dims)
        origin = base.min(axis=0)
        region = self._read(v, (z, origin.tolist()), voco_region(spatial, self.roi, req["grid"]).tolist())
        return {"voco_base": cut_windows(region, base - origin, self.roi),          # (G, C, *roi)
                "voco_random": cut_windows(region, rand - origin, self.roi),        # (R, C, *roi)
                "voco_targets": overlap_targets(rand, base, self.roi),              # (R, G)
                "voco_base_starts": base, "voco_random_starts": rand}

    def __getitem__(self, key) -> dict:
        from sslkit.data.views import make_view

        index, epoch = (key if isinstance(key, (tuple, list)) else (key, 0))
        index, epoch = int(index), int(epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        crops = self._substituting(index // self.crops_per_volume, lambda v: self._read_crops(v, index, epoch))
        item: dict = {"index": index}
        if "image" in crops:
            v1 = make_view(crops["image"], self.cfg.views, (self.seed, epoch, index, _VIEW1))
            v2 = make_view(crops["image2"], self.cfg.views, (self.seed, epoch, index, _VIEW2))
            item.update(image=torch.from_numpy(crops["image"]), view1=torch.from_numpy(v1),
                        view2=torch.from_numpy(v2))
        self._augmented_crops(crops, epoch, index)
        if "masks" in self.requests:
            crops["masks"] = self._masks(epoch, index)
        for k, arr in crops.items():
            if k not in ("image", "image2"):
                item[k] = torch.from_numpy(np.ascontiguousarray(arr))
        return item

    def probe_crops(self, n: int) -> torch.Tensor:
        """A fixed probe set: n centre-ish crops cycling over volumes, seeded by `seed` only. (n, C, *roi)."""
        crops = []
        for i in range(n):
            def centre_crop(v: int, i=i) -> np.ndarray:
                rng = np.random.default_rng([self.seed, _PROBE, i])
                return self._read(v, self._draw_window(tuple(self.volumes[v]["shape"]), rng, center=True))

            crops.append(self._substituting(i % len(self.volumes), centre_crop))
        return torch.from_numpy(np.stack(crops))


def cache_dir_of(cfg, run_dir: Path) -> Path:
    """data.cache_dir (a store prepared by `sslkit data prepare`, or one pretraining fills), else
    <run_dir>/../.cache/sslkit."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(run_dir).parent / ".cache" / "sslkit"
