"""What `sslkit data index` learns about a scan before listing it: whether the readers take it (the same checks, and
the same reason, as pretraining's reader), whether it is a label map rather than an image, and its modality.

Modality, in order of trust:
  header       a DICOM series' Modality tag (CT / MR), a MetaImage's Modality field, or words in a NIfTI's
               description field ("CT", "MR", "T1", "FLAIR", ...)
  intensities  CT is in Hounsfield units: a floor near -1024 (air) and at least 1 % of the voxels at or below
               -500 HU (air, lung), most often with soft tissue (-100..100 HU) too; MRI intensities are
               non-negative arbitrary units
A header the intensities do not contradict, or the intensities alone when they are clearly one or the other, are
taken as sure. Otherwise the guess is marked unsure (the index then says so in one warning line): a header the
intensities contradict, or no header and intensities that look like neither (negative, but not down to air).

A label map (a segmentation, an atlas, a tissue map) is an integer-valued volume of few distinct values
(2..LABEL_MAX_VALUES) that is piecewise constant: most neighbouring voxels inside it are equal (0.89-0.95 for the
demo corpus's label maps and atlases, 0.09 or less for its CT and MRI scans, 8-bit ones included). It is left out
with that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslkit.errors import DataError

LABEL_MAX_VALUES = 1024    # an atlas has up to a few hundred labels (FreeSurfer's aparc+aseg ~110)
LABEL_MIN_EQUAL = 0.6      # share of equal neighbouring voxels (where either is non-zero) of a label map
SAMPLE_VOXELS = 1 << 22    # statistics use an even subsample of this many voxels at most
LOW_HU, SOFT_TISSUE_HU = -500.0, (-100.0, 100.0)
MIN_FRACTION = 0.01        # share of voxels a CT needs at or below LOW_HU (and, to be sure, at soft tissue)

_CT_WORDS = re.compile(r"\b(ct|cta|cect|computed tomography|hounsfield)\b")
_MR_WORDS = re.compile(r"\b(mr|mri|mra|t1w?|t2w?|t2\*|flair|pdw?|dwi|adc|bold|mprage|spgr|epi|swi)\b")


@dataclass
class Modality:
    """A scan's modality ("ct" | "mri"), how it was found, and whether that is sure."""

    name: str
    why: str
    sure: bool


def sample(array: np.ndarray) -> np.ndarray:
    """An even subsample (at most SAMPLE_VOXELS) of a scan's finite voxels, flattened."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // SAMPLE_VOXELS)
    values = flat[::step]
    return values[np.isfinite(values)]


def equal_neighbours(array: np.ndarray) -> float:
    """Share of pairs of neighbouring voxels along the first axis that are equal, among pairs where either is
    non-zero (1.0 for an all-zero array); read on every k-th row of the other axes of a large array."""
    arr = np.asarray(array)
    k = max(1, int(np.sqrt(arr.size / SAMPLE_VOXELS)))
    arr = arr[(slice(None),) + (slice(None, None, k),) * (arr.ndim - 1)]
    a, b = arr[:-1], arr[1:]
    either = (a != 0) | (b != 0)
    return float(np.mean(a[either] == b[either])) if either.any() else 1.0


def label_map_reason(array: np.ndarray, values: np.ndarray) -> str | None:
    """Why a scan (`values`: its sampled voxels) looks like a label map; None when it looks like an image."""
    if values.size == 0 or not np.array_equal(values, np.round(values)):
        return None
    distinct = np.unique(values)
    if not 2 <= distinct.size <= LABEL_MAX_VALUES:
        return None
    equal = equal_neighbours(array)
    if equal < LABEL_MIN_EQUAL:
        return None
    shown = ", ".join(f"{v:g}" for v in distinct[:6]) + (", ..." if distinct.size > 6 else "")
    return (f"looks like a label map, not a scan: integer voxels of {distinct.size} distinct values ({shown}), "
            f"{equal:.0%} of neighbouring voxels equal; left out")


def intensity_modality(values: np.ndarray) -> Modality:
    """The modality the intensity statistics of sampled voxels point to."""
    if values.size == 0:
        return Modality("mri", "no finite voxels", False)
    lo, hi = float(values.min()), float(values.max())
    low = float(np.mean(values <= LOW_HU))
    soft = float(np.mean((values >= SOFT_TISSUE_HU[0]) & (values <= SOFT_TISSUE_HU[1])))
    if low >= MIN_FRACTION:
        why = f"minimum {lo:.0f}, {low:.0%} of voxels at or below {LOW_HU:.0f} HU, {soft:.0%} at soft tissue"
        return Modality("ct", why, soft >= MIN_FRACTION)
    if lo >= -1e-3 * max(abs(hi), 1.0):
        return Modality("mri", f"non-negative intensities 0..{hi:.4g} (arbitrary units)", True)
    return Modality("mri", f"intensities {lo:.4g}..{hi:.4g}: neither CT (none down to air) nor raw MRI", False)


def header_modality(path: Path) -> tuple[str | None, str]:
    """(ct | mri | None, where it was read) from a scan's header: DICOM Modality, MetaImage Modality, NIfTI
    description. None where the header does not say (or names another modality)."""
    from sslkit.data.readers import NIFTI_SUFFIXES, has_suffix

    if has_suffix(path, NIFTI_SUFFIXES):
        import nibabel as nib

        text = nib.load(str(path)).header.get("descrip", b"")
        text = (text.item() if hasattr(text, "item") else text)
        text = text.decode("latin-1", "replace") if isinstance(text, bytes) else str(text)
        words = text.strip().lower()
        if _CT_WORDS.search(words):
            return "ct", f"NIfTI description '{text.strip()}'"
        if _MR_WORDS.search(words):
            return "mri", f"NIfTI description '{text.strip()}'"
        return None, ""
    tag = _itk_modality(path)
    if tag is None:
        return None, ""
    kind = {"CT": "ct", "MR": "mri", "MET_MOD_CT": "ct", "MET_MOD_MR": "mri"}.get(tag.strip().upper())
    return kind, f"Modality {tag.strip()}"


def _itk_modality(path: Path) -> str | None:
    """The Modality of a DICOM series folder (its first file) or a MetaImage header, read without pixel data."""
    from sslkit.data.readers import check_dicom_series, simpleitk

    sitk = simpleitk()

    first = check_dicom_series(path).files[0] if path.is_dir() else path
    r = sitk.ImageFileReader()
    r.SetFileName(str(first))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return None
    for key in ("0008|0060", "Modality"):
        if r.HasMetaDataKey(key):
            return r.GetMetaData(key)
    return None


def infer_modality(path: Path, values: np.ndarray) -> Modality:
    """The scan's modality from its header and its sampled voxels (module docstring)."""
    said, where = header_modality(path)
    seen = intensity_modality(values)
    if said is None:
        return seen
    if said == seen.name or not seen.sure:  # intensities that agree, or say nothing clear: the header decides
        return Modality(said, f"{where}; {seen.why}", True)
    return Modality(said, f"{where}, but {seen.why}", False)


def inspect_scan(path: str | Path) -> dict:
    """The datalist entry of one scan, {"image", "modality"}, after the checks pretraining's reader makes; a
    DataError (one line naming the file) for a scan the reader refuses or a label map. The entry carries
    "modality_unsure": why, when the modality is a guess."""
    from sslkit.data.readers import load_scan

    p = Path(path)
    scan = load_scan(p, require_3d=True, channels=True)  # as pretraining reads it (LoadScand)
    values = sample(scan.array)
    label = label_map_reason(scan.array, values)
    if label is not None:
        raise DataError(f"{p}: {label}")
    mod = infer_modality(p, values)
    entry = {"image": str(p), "modality": mod.name}
    if not mod.sure:
        entry["modality_unsure"] = mod.why
    return entry
