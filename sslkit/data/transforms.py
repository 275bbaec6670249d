"""Preprocessing presets built from MONAI dictionary transforms.

load (sslkit readers, validated) -> channel first -> Orientation RAS -> Spacing(cfg.spacing) ->
  CT:  ScaleIntensityRange(cfg.intensity_range -> [0, 1], clip)
  MRI: ScaleIntensityRangePercentiles(0.5 .. 99.5 -> [0, 1], clip)
-> CropForeground (voxels > 0).
Modality "2d" preprocesses the volume the same way (CT window, in-plane spacing) and is used slice-wise
(axial slices) by the datasets. The output image is (C, X, Y, Z) float32 in [0, 1]. A label map, when given,
must lie on the image's grid and follows the same geometry (nearest-neighbour), never the intensity steps.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from sslkit.config import DataConfig
from sslkit.data.readers import load_scan
from sslkit.errors import DataError

MRI_PERCENTILES = (0.5, 99.5)


class LoadScand(MapTransform):
    """Load each key's path with `sslkit.data.readers.load_scan` into a MetaTensor (X, Y, Z) with its affine.

    Unlike MONAI's LoadImaged this validates (2-D, NaN, truncated) and raises DataError naming the file."""

    def __init__(self, keys: Sequence[Hashable], require_3d: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.require_3d = require_3d

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            scan = load_scan(d[key], require_3d=self.require_3d)
            meta = {"filename_or_obj": str(scan.path), "spacing": np.asarray(scan.spacing)}
            d[key] = MetaTensor(torch.from_numpy(scan.array), affine=torch.as_tensor(scan.affine), meta=meta)
        return d


class CheckSameGrid(MapTransform):
    """The label must lie on the image's voxel grid (same shape, affine within `atol`); else DataError naming both
    files. The label then takes the image's exact affine, so rounding in a label header cannot make the resampled
    label one voxel larger or smaller than the image."""

    def __init__(self, image_key: str = "image", label_key: str = "label", atol: float = 1e-2):
        super().__init__([image_key, label_key])
        self.image_key, self.label_key, self.atol = image_key, label_key, atol

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img, lab = d[self.image_key], d[self.label_key]
        fi, fl = img.meta.get("filename_or_obj", "image"), lab.meta.get("filename_or_obj", "label")
        if tuple(img.shape) != tuple(lab.shape):
            raise DataError(f"label {fl} has shape {tuple(lab.shape)} but image {fi} has shape {tuple(img.shape)}")
        if not torch.allclose(img.affine.double(), lab.affine.double(), atol=self.atol):
            raise DataError(f"label {fl} has another voxel-to-world affine (orientation / spacing / origin) than "
                            f"image {fi}")
        meta = {k: v for k, v in lab.meta.items() if k != "affine"}
        d[self.label_key] = MetaTensor(lab.as_tensor(), affine=img.affine.clone(), meta=meta)
        return d


def _positive(x):
    """Foreground selector for CropForeground (module level so the transform pickles)."""
    return x > 0


def spacing_for(cfg: DataConfig) -> tuple[float, ...]:
    """Target voxel spacing (X, Y, Z) mm. A 2-value spacing (2-D runs) keeps the scan's own z spacing (-1)."""
    sp = [float(s) for s in cfg.spacing]
    if len(sp) == 2:
        sp.append(-1.0)  # MONAI Spacing: non-positive -> keep the original spacing on that axis
    return tuple(sp[:3])


def intensity_transform(cfg: DataConfig, keys: Sequence[str]):
    """CT (and 2d): fixed window -> [0, 1]; MRI: robust percentile window -> [0, 1]; both clipped."""
    if cfg.modality == "mri":
        lo, hi = MRI_PERCENTILES
        return ScaleIntensityRangePercentilesd(keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
    a_min, a_max = (float(v) for v in cfg.intensity_range)
    return ScaleIntensityRanged(keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)


def preprocess_transforms(cfg: DataConfig, label_key: str | None = None) -> Compose:
    """The deterministic preprocessing chain for `{"image": path[, label_key: path]}` dictionaries.

    Output: image (1, X, Y, Z) float32 MetaTensor in [0, 1] at `cfg.spacing`, RAS, foreground-cropped; the label
    (if any) must share the image's grid (DataError naming both files otherwise) and goes through the same geometry
    with nearest-neighbour interpolation (float32 class values; the caller casts)."""
    keys = ["image"] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    same_grid = [CheckSameGrid("image", label_key)] if label_key else []
    return Compose([
        LoadScand(keys),                                                   # (X, Y, Z)
        *same_grid,
        EnsureChannelFirstd(keys, channel_dim="no_channel"),               # -> (1, X, Y, Z)
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=spacing_for(cfg), mode=modes),
        intensity_transform(cfg, ["image"]),
        CropForegroundd(keys, source_key="image", select_fn=_positive, margin=0, allow_smaller=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=True),
    ])


def preprocessing_params(cfg: DataConfig) -> dict:
    """Everything that changes the preprocessed array; part of the cache key."""
    return {
        "version": 1,
        "modality": cfg.modality,
        "spacing": list(spacing_for(cfg)),
        "intensity_range": [float(v) for v in cfg.intensity_range] if cfg.modality != "mri" else None,
        "percentiles": list(MRI_PERCENTILES) if cfg.modality == "mri" else None,
        "orientation": "RAS",
        "crop_foreground": True,
    }
