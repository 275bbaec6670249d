"""Self-supervised pretraining dataset: cached preprocessed volumes -> deterministic random crops + two views.

`prepare()` preprocesses every scan once (MONAI preset from `transforms.py`) and stores it as
`<cache_dir>/<key>.npy` (float32, (C, X, Y, Z)) + `<key>.json`; the key hashes the absolute path, size, mtime
and the preprocessing parameters, so later epochs and runs only memory-map the arrays. Items are addressed by
`(index, epoch)`; all randomness comes from `numpy.random.default_rng([seed, epoch, index, stream])`, so a
resumed run sees exactly the same crops and views.

With `data.with_labels` every entry's "label" map is preprocessed together with its image (same geometry, nearest
neighbour) and cached as `<key>.label.npy` (int32, (1, X, Y, Z)); the key then also hashes the label's path, size
and mtime. Each item's "label" is cut with exactly the window of its "image" crop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sslkit.config import DataConfig
from sslkit.data.transforms import preprocess_transforms, preprocessing_params
from sslkit.errors import DataError, UserError

_CROP, _VIEW1, _VIEW2, _PROBE, _SHIFT = 0, 1, 2, 3, 4  # rng sub-streams


def _file_stamp(path: Path) -> tuple[int, int]:
    """(total size, latest mtime_ns) of a file, or of the files directly in a folder (DICOM series)."""
    if path.is_dir():
        stats = [f.stat() for f in path.iterdir() if f.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def cache_key(path: str | Path, params: dict, label: str | Path | None = None) -> str:
    """sha1 of absolute path + size + mtime + preprocessing params (raises OSError if the path is missing).
    With `label` its absolute path, size and mtime join the hash (DataError if it is missing), so an edited label
    re-caches; keys without a label are the same as before labels existed."""
    p = Path(path).resolve()
    size, mtime = _file_stamp(p)
    fields = {"path": str(p), "size": size, "mtime": mtime, "params": params}
    if label is not None:
        fields["label"] = _label_stamp(label)
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:24]


def _label_stamp(label: str | Path) -> dict:
    lp = Path(label).resolve()
    if not lp.exists():
        raise DataError(f"{label}: label file not found")
    size, mtime = _file_stamp(lp)
    return {"path": str(lp), "size": size, "mtime": mtime}


def _save_npy(arr: np.ndarray, npy: Path) -> None:
    """Write atomically (a reader never sees half an array)."""
    tmp = npy.with_name(npy.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, npy)


def _label_array(label, image_shape: tuple, path: str) -> np.ndarray:
    """Preprocessed label (1, X, Y, Z) float class values -> int32, checked against the image's shape."""
    lab = np.asarray(label.numpy() if hasattr(label, "numpy") else label)
    if tuple(lab.shape) != tuple(image_shape):
        raise DataError(f"{path}: label is {tuple(lab.shape)} after preprocessing but its image is {image_shape}")
    if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
        raise DataError(f"{path}: label holds non-integer values (class indices expected, not probabilities)")
    return np.ascontiguousarray(lab, dtype=np.int32)


def _error_line(e: BaseException) -> str:
    """One line for the skipped log: the UserError inside MONAI's wrapping RuntimeError if there is one."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, UserError):
            return str(cause)
        if cause.__cause__ is None:
            break
        cause = cause.__cause__
    inner = cause or e
    return (f"{type(inner).__name__}: {inner}".splitlines() or [""])[0][:300]


Window = tuple[int | None, list[int]]  # (axial slice z in 2-D runs, else None; window start per axis)


class PretrainDataset(Dataset):
    """Random crops of cached volumes with two augmented views each.

    len = valid volumes x crops_per_volume. `ds[(index, epoch)]` (or `ds[index]`, epoch 0) returns
    `{"image": (C, *roi), "view1": (C, *roi), "view2": (C, *roi), "index": int}` float32 tensors, plus
    `"label": (1, *roi)` int64 with data.with_labels (aligned with "image", not with the augmented views).
    spatial_dims 2 / modality "2d": a random axial slice, crops (C, H, W).
    """

    def __init__(self, items: list[dict], data_cfg: DataConfig, cache_dir: Path, seed: int,
                 skipped_log: Path | None = None):
        self.items = list(items)
        self.cfg = data_cfg
        self.cache_dir = Path(cache_dir)
        self.seed = int(seed)
        self.skipped_log = Path(skipped_log) if skipped_log is not None else None
        self.roi = tuple(int(r) for r in data_cfg.roi)
        self.spatial_dims = 2 if (data_cfg.spatial_dims == 2 or data_cfg.modality == "2d") else 3
        if len(self.roi) != self.spatial_dims:
            raise UserError(f"data.roi: {list(self.roi)} needs {self.spatial_dims} sizes")
        self.crops_per_volume = max(1, int(data_cfg.crops_per_volume))
        self.with_labels = bool(data_cfg.with_labels)
        self.volumes: list[dict] = []   # {"path", "npy", "shape"[, "label", "label_npy"]} per valid cached volume
        self.n_preprocessed = 0          # scans preprocessed (not taken from cache) by the last prepare()
        self._bad: set[int] = set()      # volume indices that failed at __getitem__ time (per process)
        self._logged: set[tuple] = set()  # (path, label) already in skipped_log

    # --------------------------------------------------------------------------------------- caching

    def prepare(self, progress: bool = True) -> "PretrainDataset":
        """Preprocess and cache every scan once; skip (and log) the ones that fail. Returns self."""
        from tqdm.auto import tqdm

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        transforms: dict[str, object] = {}
        self.volumes, self.n_preprocessed = [], 0
        for item in tqdm(self.items, desc="caching scans", unit="scan", disable=not progress):
            path, label = str(item["image"]), None
            try:
                label = self._label_of(item)
                cfg = self.item_config(item)
                params = preprocessing_params(cfg)
                key = cache_key(path, params, label)
                npy, meta = self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"
                label_npy = self.cache_dir / f"{key}.label.npy" if label is not None else None
                if not (npy.exists() and meta.exists() and (label_npy is None or label_npy.exists())):
                    if cfg.modality not in transforms:
                        transforms[cfg.modality] = preprocess_transforms(cfg, "label" if self.with_labels else None)
                    self._preprocess_one(path, transforms[cfg.modality], npy, meta, params, label, label_npy)
                    self.n_preprocessed += 1
                info = json.loads(meta.read_text(encoding="utf-8"))
                volume = {"path": path, "npy": str(npy), "shape": info["shape"]}
                if label_npy is not None:
                    volume.update(label=label, label_npy=str(label_npy))
                self.volumes.append(volume)
            except FileNotFoundError:
                self._record_skip(path, f"{path}: no such file or folder", label)
            except Exception as e:  # noqa: BLE001 - a bad scan (or label) must not stop the run; it is logged
                self._record_skip(path, _error_line(e), label)
        if not self.volumes:
            where = f" (see {self.skipped_log})" if self.skipped_log else ""
            raise DataError(f"no usable scans among {len(self.items)} datalist entries{where}")
        return self

    def item_config(self, item: dict) -> DataConfig:
        """The DataConfig for one entry: an entry's own "modality" (ct | mri) picks its intensity preset, so one
        corpus can mix CT and MRI; otherwise data.modality applies."""
        mod = str(item.get("modality", "")).lower()
        if mod in ("ct", "mri") and mod != self.cfg.modality:
            return dataclasses.replace(self.cfg, modality=mod)
        return self.cfg

    def _label_of(self, item: dict) -> str | None:
        """The entry's label path with data.with_labels (DataError if it has none), else None."""
        if not self.with_labels:
            return None
        label = item.get("label")
        if not isinstance(label, str) or not label:
            raise DataError(f"{item['image']}: datalist entry has no 'label' but data.with_labels is true")
        return label

    def _preprocess_one(self, path: str, transform, npy: Path, meta: Path, params: dict,
                        label: str | None = None, label_npy: Path | None = None) -> None:
        out = transform({"image": path} if label is None else {"image": path, "label": label})
        img = out["image"]                                # (1, X, Y, Z) MetaTensor
        arr = np.ascontiguousarray(img.numpy(), dtype=np.float32)
        if arr.size == 0 or min(arr.shape[1:]) == 0:
            raise DataError(f"{path}: empty after preprocessing (no foreground in the intensity window)")
        info = {"path": str(Path(path).resolve()), "shape": list(arr.shape), "params": params,
                "affine": np.asarray(img.affine).tolist()}
        if label is not None:
            lab = _label_array(out["label"], arr.shape, label)  # (1, X, Y, Z) int32
            _save_npy(lab, label_npy)
            info.update(label=str(Path(label).resolve()), label_values=np.unique(lab).tolist())
        _save_npy(arr, npy)
        tmpj = meta.with_name(meta.name + f".{os.getpid()}.tmp")  # written last: it marks a complete entry
        tmpj.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmpj, meta)

    def _record_skip(self, path: str, error: str, label: str | None = None) -> None:
        """Append `{"path"[, "label"], "error"}` to skipped_log, once per (path, label)."""
        if (path, label) in self._logged:
            return
        self._logged.add((path, label))
        if self.skipped_log is None:
            return
        self.skipped_log.parent.mkdir(parents=True, exist_ok=True)
        if self.skipped_log.exists():  # another worker may have logged it already
            for line in self.skipped_log.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    if row.get("path") == path and row.get("label") == label:
                        return
                except json.JSONDecodeError:
                    continue
        row = {"path": path, "error": error} if label is None else {"path": path, "label": label, "error": error}
        with open(self.skipped_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # --------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.volumes) * self.crops_per_volume

    def _volume(self, vol: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Memory-mapped cached arrays: image (C, X, Y, Z) and, with labels, label (1, X, Y, Z) (else None); falls
        back to the next good volume if this one fails, so image and label always come from the same volume."""
        if not self.volumes:
            raise RuntimeError("PretrainDataset.prepare() must run before indexing")
        n = len(self.volumes)
        for k in range(n):
            v = (vol + k) % n
            if v in self._bad:
                continue
            try:
                arr = np.load(self.volumes[v]["npy"], mmap_mode="r")
                if arr.ndim != 4 or not np.isfinite(arr[(0,) + tuple(s // 2 for s in arr.shape[1:])]):
                    raise ValueError(f"cached array has shape {arr.shape}")
                return arr, self._cached_label(v, arr.shape)
            except Exception as e:  # noqa: BLE001 - substitute deterministically, log once
                self._bad.add(v)
                self._record_skip(self.volumes[v]["path"], f"cached volume unreadable: {type(e).__name__}: {e}"
                                  .splitlines()[0][:300], self.volumes[v].get("label"))
        raise DataError(f"no readable cached volume left in {self.cache_dir}")

    def _cached_label(self, v: int, image_shape: tuple) -> np.ndarray | None:
        if "label_npy" not in self.volumes[v]:
            return None
        lab = np.load(self.volumes[v]["label_npy"], mmap_mode="r")
        if lab.shape != (1,) + tuple(image_shape[1:]):
            raise ValueError(f"cached label has shape {lab.shape}, its image {image_shape}")
        return lab

    def _rng(self, index: int, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index), stream])

    def _draw_window(self, shape: tuple, rng: np.random.Generator, center: bool = False) -> Window:
        """Where a crop of a (C, X, Y, Z) volume goes: a random (or jittered-centre) window of roi; 2-D runs pick
        an axial slice first. The window may reach past a small volume (the cut is zero-padded)."""
        sizes = shape[1:]
        z = None
        if self.spatial_dims == 2:
            nz = shape[3]
            z = int(rng.integers(nz // 4, max(nz // 4, 3 * nz // 4) + 1)) if center else int(rng.integers(0, nz))
            z, sizes = min(z, nz - 1), shape[1:3]
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
        """The second view's window: moved from `window` by up to data.view_shift x roi per axis, inside the volume."""
        z, starts = window
        sizes = shape[1:3] if z is not None else shape[1:]
        moved = []
        for a, s, r in zip(starts, sizes, self.roi):
            m = int(round(self.cfg.view_shift * r))
            moved.append(int(np.clip(a + rng.integers(-m, m + 1), 0, max(0, s - r))))
        return z, moved

    def _cut(self, arr: np.ndarray, window: Window, dtype=np.float32) -> np.ndarray:
        """(C, X, Y, Z) -> (C, *roi) at `window`; 2-D: (C, X, Y, Z) -> (C, X, Y) -> (C, H, W). Zero-padded (image
        window minimum, label background) where the volume is smaller."""
        z, starts = window
        if z is not None:
            arr = arr[..., z]
        sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(starts, self.roi))
        patch = np.array(arr[sl], dtype=dtype, copy=True)  # copies only the window out of the memmap
        if patch.shape[1:] != self.roi:
            out = np.zeros((patch.shape[0],) + self.roi, dtype=dtype)
            out[(slice(None),) + tuple(slice(0, s) for s in patch.shape[1:])] = patch
            patch = out
        return patch

    def _augment(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One view: per-axis flips (p=view_flip_prob), intensity scale/shift, Gaussian noise. Shape kept."""
        c = self.cfg
        flip_axes = tuple(ax for ax in range(1, x.ndim) if rng.random() < c.view_flip_prob)
        y = np.flip(x, axis=flip_axes) if flip_axes else x
        scale = 1.0 + rng.uniform(-c.view_intensity_scale, c.view_intensity_scale)
        shift = rng.uniform(-c.view_intensity_shift, c.view_intensity_shift)
        y = y * scale + shift
        if c.view_noise_std > 0:
            y = y + rng.normal(0.0, c.view_noise_std, size=y.shape)
        return np.ascontiguousarray(y, dtype=np.float32)

    def __getitem__(self, key) -> dict:
        index, epoch = (key if isinstance(key, (tuple, list)) else (key, 0))
        index, epoch = int(index), int(epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        arr, lab = self._volume(index // self.crops_per_volume)
        window = self._draw_window(arr.shape, self._rng(index, epoch, _CROP))
        crop = self._cut(arr, window)                                            # (C, *roi)
        crop2 = crop
        if self.cfg.view_shift > 0:  # overlapping, not identical, crops for the two views
            crop2 = self._cut(arr, self._shift_window(window, arr.shape, self._rng(index, epoch, _SHIFT)))
        v1 = self._augment(crop, self._rng(index, epoch, _VIEW1))
        v2 = self._augment(crop2, self._rng(index, epoch, _VIEW2))
        item = {"image": torch.from_numpy(crop), "view1": torch.from_numpy(v1), "view2": torch.from_numpy(v2),
                "index": index}
        if lab is not None:
            item["label"] = torch.from_numpy(self._cut(lab, window, np.int64))  # (1, *roi), same window as image
        return item

    def probe_crops(self, n: int) -> torch.Tensor:
        """A fixed probe set: n centre-ish crops cycling over volumes, seeded by `seed` only. (n, C, *roi)."""
        crops = []
        for i in range(n):
            rng = np.random.default_rng([self.seed, _PROBE, i])
            arr = self._volume(i % len(self.volumes))[0]
            crops.append(self._cut(arr, self._draw_window(arr.shape, rng, center=True)))
        return torch.from_numpy(np.stack(crops))

