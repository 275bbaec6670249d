"""Self-supervised pretraining dataset: cached preprocessed volumes -> deterministic random crops + two views.

`prepare()` preprocesses every scan once (MONAI preset from `transforms.py`) and stores it as
`<cache_dir>/<key>.npy` (float32, (C, X, Y, Z)) + `<key>.json`; the key hashes the absolute path, size, mtime
and the preprocessing parameters, so later epochs and runs only memory-map the arrays. Items are addressed by
`(index, epoch)`; all randomness comes from `numpy.random.default_rng([seed, epoch, index, stream])`, so a
resumed run sees exactly the same crops and views.
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


def cache_key(path: str | Path, params: dict) -> str:
    """sha1 of absolute path + size + mtime + preprocessing params (raises OSError if the path is missing)."""
    p = Path(path).resolve()
    size, mtime = _file_stamp(p)
    blob = json.dumps({"path": str(p), "size": size, "mtime": mtime, "params": params}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:24]


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


class PretrainDataset(Dataset):
    """Random crops of cached volumes with two augmented views each.

    len = valid volumes x crops_per_volume. `ds[(index, epoch)]` (or `ds[index]`, epoch 0) returns
    `{"image": (C, *roi), "view1": (C, *roi), "view2": (C, *roi), "index": int}` float32 tensors.
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
        self.volumes: list[dict] = []   # {"path", "npy", "shape"} per valid cached volume
        self.n_preprocessed = 0          # scans preprocessed (not taken from cache) by the last prepare()
        self._bad: set[int] = set()      # volume indices that failed at __getitem__ time (per process)
        self._logged: set[str] = set()

    # --------------------------------------------------------------------------------------- caching

    def prepare(self, progress: bool = True) -> "PretrainDataset":
        """Preprocess and cache every scan once; skip (and log) the ones that fail. Returns self."""
        from tqdm.auto import tqdm

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        transforms: dict[str, object] = {}
        self.volumes, self.n_preprocessed = [], 0
        for item in tqdm(self.items, desc="caching scans", unit="scan", disable=not progress):
            path = str(item["image"])
            try:
                cfg = self.item_config(item)
                params = preprocessing_params(cfg)
                key = cache_key(path, params)
                npy, meta = self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"
                if not (npy.exists() and meta.exists()):
                    if cfg.modality not in transforms:
                        transforms[cfg.modality] = preprocess_transforms(cfg)
                    self._preprocess_one(path, transforms[cfg.modality], npy, meta, params)
                    self.n_preprocessed += 1
                info = json.loads(meta.read_text(encoding="utf-8"))
                self.volumes.append({"path": path, "npy": str(npy), "shape": info["shape"]})
            except FileNotFoundError:
                self._record_skip(path, f"{path}: no such file or folder")
            except Exception as e:  # noqa: BLE001 - a bad scan must not stop the run; it is logged
                self._record_skip(path, _error_line(e))
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

    def _preprocess_one(self, path: str, transform, npy: Path, meta: Path, params: dict) -> None:
        out = transform({"image": path})["image"]       # (1, X, Y, Z) MetaTensor
        arr = np.ascontiguousarray(out.numpy(), dtype=np.float32)
        if arr.size == 0 or min(arr.shape[1:]) == 0:
            raise DataError(f"{path}: empty after preprocessing (no foreground in the intensity window)")
        tmp = npy.with_name(npy.stem + f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, npy)
        info = {"path": str(Path(path).resolve()), "shape": list(arr.shape), "params": params,
                "affine": np.asarray(out.affine).tolist()}
        tmpj = meta.with_name(meta.name + f".{os.getpid()}.tmp")
        tmpj.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmpj, meta)

    def _record_skip(self, path: str, error: str) -> None:
        """Append `{"path", "error"}` to skipped_log, once per path."""
        if path in self._logged:
            return
        self._logged.add(path)
        if self.skipped_log is None:
            return
        self.skipped_log.parent.mkdir(parents=True, exist_ok=True)
        if self.skipped_log.exists():  # another worker may have logged it already
            for line in self.skipped_log.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("path") == path:
                        return
                except json.JSONDecodeError:
                    continue
        with open(self.skipped_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"path": path, "error": error}) + "\n")

    # --------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.volumes) * self.crops_per_volume

    def _volume(self, vol: int) -> np.ndarray:
        """Memory-mapped cached array (C, X, Y, Z); falls back to the next good volume if this one fails."""
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
                return arr
            except Exception as e:  # noqa: BLE001 - substitute deterministically, log once
                self._bad.add(v)
                self._record_skip(self.volumes[v]["path"], f"cached volume unreadable: {type(e).__name__}: {e}"
                                  .splitlines()[0][:300])
        raise DataError(f"no readable cached volume left in {self.cache_dir}")

    def _rng(self, index: int, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index), stream])

    def _crop(self, arr: np.ndarray, rng: np.random.Generator, center: bool = False,
              shift_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(C, X, Y, Z) -> (C, *roi): random (or jittered-centre) window, zero-padded where the volume is smaller.
        2-D: pick an axial slice first, (C, X, Y, Z) -> (C, X, Y) -> (C, H, W).

        With `shift_rng` a second window is cut too, moved from the first by up to data.view_shift x roi per
        axis (overlapping crops for the second view). Returns (first, second); second is first without it."""
        if self.spatial_dims == 2:
            nz = arr.shape[3]
            z = int(rng.integers(nz // 4, max(nz // 4, 3 * nz // 4) + 1)) if center else int(rng.integers(0, nz))
            arr = arr[..., min(z, nz - 1)]
        sizes = arr.shape[1:]
        starts = []
        for s, r in zip(sizes, self.roi):
            hi = max(0, s - r)
            if center:
                jitter = max(0, min(hi // 2, r // 8))
                starts.append(hi // 2 + int(rng.integers(-jitter, jitter + 1)))
            else:
                starts.append(int(rng.integers(0, hi + 1)))
        first = self._window(arr, starts)
        if shift_rng is None or self.cfg.view_shift <= 0:
            return first, first
        moved = []
        for a, s, r in zip(starts, sizes, self.roi):
            m = int(round(self.cfg.view_shift * r))
            moved.append(int(np.clip(a + shift_rng.integers(-m, m + 1), 0, max(0, s - r))))
        return first, self._window(arr, moved)

    def _window(self, arr: np.ndarray, starts: list[int]) -> np.ndarray:
        sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(starts, self.roi))
        patch = np.array(arr[sl], dtype=np.float32, copy=True)  # copies only the window out of the memmap
        if patch.shape[1:] != self.roi:
            out = np.zeros((patch.shape[0],) + self.roi, dtype=np.float32)  # 0 = window minimum
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
        arr = self._volume(index // self.crops_per_volume)
        crop, crop2 = self._crop(arr, self._rng(index, epoch, _CROP),
                                 shift_rng=self._rng(index, epoch, _SHIFT))    # (C, *roi) each
        v1 = self._augment(crop, self._rng(index, epoch, _VIEW1))
        v2 = self._augment(crop2, self._rng(index, epoch, _VIEW2))
        return {"image": torch.from_numpy(crop), "view1": torch.from_numpy(v1),
                "view2": torch.from_numpy(v2), "index": index}

    def probe_crops(self, n: int) -> torch.Tensor:
        """A fixed probe set: n centre-ish crops cycling over volumes, seeded by `seed` only. (n, C, *roi)."""
        crops = []
        for i in range(n):
            rng = np.random.default_rng([self.seed, _PROBE, i])
            crops.append(self._crop(self._volume(i % len(self.volumes)), rng, center=True)[0])
        return torch.from_numpy(np.stack(crops))

