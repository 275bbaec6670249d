"""The one preprocessing stack (MONAI dictionary transforms), used by pretraining, fine-tuning, evaluate and predict.

    load (sslkit readers: validated, channel first) -> [label on the image's grid] -> orientation RAS
    -> spacing (`spacing`; a value <= 0 keeps that axis) -> intensity scheme of the scan's modality
    -> crop to the foreground (voxels > 0)

Intensity schemes, one per modality (the plan records them):
    ct   window   clip `intensity_range` (HU) -> [0, 1]
    mri  percentile  `mri_percentiles` (default 0.5 .. 99.5) -> [0, 1], clipped          (default)
         zscore      (x - mean) / std over all voxels, per channel (AutoSAM practice)
         zscore_nonzero  the same over non-zero voxels, zeros kept (MSD / nnU-Net practice)
The foreground crop follows the window / percentile scaling (so "> 0" means above the window's floor); with a
z-score it runs first, on the raw intensities. Output: image (C, X, Y, Z) (2-D scans: (C, X, Y)) float32 MetaTensor
whose applied operations `monai.transforms.Invertd` undoes; a label (if any) follows the same geometry with
nearest-neighbour interpolation and never the intensity steps.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from sslkit.data.readers import load_scan
from sslkit.errors import DataError

PREPROCESS_VERSION = 2  # part of the cache key: bump when the chain changes what it produces


class LoadScand(MapTransform):
    """Load each key's path (or list of paths, one per channel) with `sslkit.data.readers.load_scan` into a
    channel-first MetaTensor (C, X, Y[, Z]) with its RAS affine; meta "spacing" holds the scan's own voxel size.

    Unlike MONAI's LoadImaged this validates (2-D, NaN, truncated) and raises DataError naming the file."""

    def __init__(self, keys: Sequence[Hashable], spatial_dims: int = 3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            scans = [load_scan(p, require_3d=self.spatial_dims == 3, channels=True) for p in paths]
            first = scans[0]
            for s in scans[1:]:
                if s.array.shape[:self.spatial_dims] != first.array.shape[:self.spatial_dims] or \
                        not np.allclose(s.affine, first.affine, atol=1e-2):
                    raise DataError(f"{s.path}: not on the grid of {first.path} (channels of one image must be)")
            arrays = [_channel_first(s.array, self.spatial_dims) for s in scans]
            arr = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            meta = {"filename_or_obj": str(first.path), "spacing": np.asarray(first.spacing[:self.spatial_dims]),
                    "original_channel_dim": 0}
            affine = _affine_of_dims(first.affine, self.spatial_dims)
            d[key] = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine), meta=meta)
        return d


def _channel_first(arr: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(X, Y[, Z]) -> (1, ...); (X, Y, Z, C) (multi-channel NIfTI, e.g. MSD BraTS) -> (C, X, Y, Z)."""
    if arr.ndim == spatial_dims:
        return arr[None]
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def _affine_of_dims(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """4x4 affine for 3-D scans; the in-plane 3x3 part for 2-D images (MONAI's 2-D convention)."""
    if spatial_dims == 3:
        return affine
    a = np.eye(3)
    a[:2, :2], a[:2, 2] = affine[:2, :2], affine[:2, 3]
    return a


class CheckSameGrid(MapTransform):
    """The label must lie on the image's voxel grid (same spatial shape, one channel, affine within `atol`); else
    DataError naming both files. The label then takes the image's exact affine, so rounding in a label header
    cannot make the resampled label one voxel larger or smaller than the image."""

    def __init__(self, image_key: str = "image", label_key: str = "label", atol: float = 1e-2):
        super().__init__([image_key, label_key])
        self.image_key, self.label_key, self.atol = image_key, label_key, atol

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img, lab = d[self.image_key], d[self.label_key]
        fi, fl = img.meta.get("filename_or_obj", "image"), lab.meta.get("filename_or_obj", "label")
        if tuple(img.shape[1:]) != tuple(lab.shape[1:]) or lab.shape[0] != 1:
            raise DataError(f"label {fl} has shape {tuple(lab.shape[1:])} (channels {lab.shape[0]}) but image {fi} "
                            f"has shape {tuple(img.shape[1:])}")
        if not torch.allclose(img.affine.double(), lab.affine.double(), atol=self.atol):
            raise DataError(f"label {fl} has another voxel-to-world affine (orientation / spacing / origin) than "
                            f"image {fi}")
        meta = {k: v for k, v in lab.meta.items() if k != "affine"}
        d[self.label_key] = MetaTensor(lab.as_tensor(), affine=img.affine.clone(), meta=meta)
        return d


def _positive(x):
    """Foreground selector for CropForeground (module level so the transform pickles)."""
    return x > 0


def target_spacing(cfg, spatial_dims: int) -> list[float] | None:
    """Spacing per axis for MONAI's Spacing (non-positive keeps that axis), None to keep the scan's spacing."""
    if not cfg.spacing:
        return None
    sp = [float(s) for s in cfg.spacing]
    return sp + [-1.0] * (spatial_dims - len(sp))


def scheme_of(cfg, modality: str) -> str:
    """The intensity scheme a modality gets under this config: window (CT), or cfg.mri_norm (MRI)."""
    return "window" if modality == "ct" else cfg.mri_norm


def intensity_transform(cfg, modality: str, key: str = "image"):
    """The modality's intensity scheme as one MONAI transform (channel-wise for multi-channel images)."""
    scheme = scheme_of(cfg, modality)
    if scheme == "window":
        lo, hi = (float(v) for v in cfg.intensity_range)
        return ScaleIntensityRanged(key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if scheme == "percentile":
        lo, hi = (float(v) for v in cfg.mri_percentiles)
        return ScaleIntensityRangePercentilesd(key, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True,
                                               channel_wise=True)
    return NormalizeIntensityd(key, nonzero=scheme == "zscore_nonzero", channel_wise=True)


def preprocess_transforms(cfg, modality: str | None = None, label_key: str | None = None,
                          spatial_dims: int = 3) -> Compose:
    """The deterministic preprocessing chain for `{"image": path(s)[, label_key: path]}` dictionaries.

    `cfg`: any config with the PreprocessConfig keys; `modality`: ct | mri (default cfg.modality);
    `spatial_dims`: of the scans (3 for volumes, also when a 2-D model reads their slices)."""
    modality = modality or cfg.modality
    keys = ["image"] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    steps: list = [LoadScand(keys, spatial_dims)]
    if label_key:
        steps.append(CheckSameGrid("image", label_key))
    steps.append(Orientationd(keys, axcodes="RAS"[:spatial_dims], labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    spacing = target_spacing(cfg, spatial_dims)
    if spacing is not None:
        steps.append(Spacingd(keys, pixdim=spacing, mode=modes))
    crop = [CropForegroundd(keys, source_key="image", select_fn=_positive, margin=0, allow_smaller=True)] \
        if cfg.crop_foreground else []
    intensity = [intensity_transform(cfg, modality)]
    steps += (crop + intensity) if scheme_of(cfg, modality).startswith("zscore") else (intensity + crop)
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True))
    return Compose(steps)


def preprocessing_params(cfg, modality: str | None = None, spatial_dims: int = 3) -> dict:
    """Everything that changes the preprocessed array of a scan of `modality`; part of the cache key."""
    modality = modality or cfg.modality
    scheme = scheme_of(cfg, modality)
    params = {"version": PREPROCESS_VERSION, "modality": modality, "scheme": scheme, "orientation": "RAS",
              "spacing": target_spacing(cfg, spatial_dims), "crop_foreground": bool(cfg.crop_foreground)}
    if scheme == "window":
        params["window"] = [float(v) for v in cfg.intensity_range]
    elif scheme == "percentile":
        params["percentiles"] = [float(v) for v in cfg.mri_percentiles]
    return params


def entry_modality(entry: dict, default: str) -> str:
    """A datalist entry's own "modality" (ct | mri) when it has one, else `default`: one corpus can mix both."""
    mod = str(entry.get("modality", "")).lower()
    return mod if mod in ("ct", "mri") else default
