"""Read one scan from disk into a `Scan`: NIfTI (nibabel), NRRD / MHA / MHD (SimpleITK), DICOM series folders.

Every reader returns the voxel array in (X, Y, Z) (or (X, Y)) index order, the order nibabel and MONAI use,
with a 4x4 RAS affine. Problems a user can cause (missing path, corrupt or truncated file, a 2-D image where
a volume is needed, NaN / inf voxels) raise `DataError` with one line naming the file and the problem.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslkit.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# LPS (ITK / DICOM world) -> RAS (NIfTI / MONAI world)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Scan:
    """One image. `array`: float32 (X, Y, Z) or (X, Y); `affine`: 4x4 voxel -> RAS mm; `spacing`: mm per axis."""

    path: Path
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Case-insensitive check of (possibly double) suffixes like '.nii.gz'."""
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def is_dicom_file(path: Path) -> bool:
    """True if `path` is a file with the DICOM preamble ('DICM' at byte 128) or a .dcm suffix."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_series_dir(path: str | Path) -> bool:
    """True if `path` is a folder that directly holds at least one DICOM image file (not DICOMDIR alone)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any(is_dicom_file(f) for f in p.iterdir() if f.name.upper() != "DICOMDIR")


# ------------------------------------------------------------------------------------------- readers


def _read_nifti(path: Path) -> Scan:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asarray(img.get_fdata(dtype=np.float32))  # (X, Y, Z[, T...])
    except (EOFError, OSError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DataError(f"{path}: truncated or corrupt NIfTI ({_short(e)})") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return Scan(path, arr, np.asarray(img.affine, dtype=np.float64), zooms)


def _sitk_to_scan(path: Path, img) -> Scan:
    """SimpleITK image (LPS world, array (Z, Y, X)) -> Scan (RAS affine, array (X, Y, Z))."""
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: has {img.GetNumberOfComponentsPerPixel()} components per voxel "
                        "(colour / vector image); a scalar scan is needed")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (Z, Y, X) -> transpose below
    arr = np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1]))  # (X, Y, Z)
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * spacing[None, :]
    lps[:dim, 3] = img.GetOrigin()
    return Scan(path, arr, _LPS_TO_RAS @ lps, tuple(float(s) for s in spacing))


def _read_itk(path: Path) -> Scan:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: truncated or corrupt image file ({_short(e)})") from None
    return _sitk_to_scan(path, img)


def _read_dicom_series(path: Path) -> Scan:
    """Read the largest series in a DICOM folder with SimpleITK's ImageSeriesReader."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        ids = reader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise DataError(f"{path}: no readable DICOM series in this folder")
        files = max((reader.GetGDCMSeriesFileNames(str(path), i) for i in ids), key=len)
        reader.SetFileNames(files)
        img = reader.Execute()
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable DICOM series ({_short(e)})") from None
    return _sitk_to_scan(path, img)


def _short(e: BaseException) -> str:
    """One line of an exception message (ITK messages span many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "Description" in ln or "rror" in ln), lines[-1] if lines else "")
    msg = msg.split("Description:", 1)[-1].strip()
    return (msg or type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------- validation


def validate(scan: Scan, require_3d: bool = True) -> Scan:
    """Drop trailing singleton axes beyond 3, then check dimensionality and finiteness. Returns the scan."""
    arr = scan.array
    while arr.ndim > 3 and arr.shape[-1] == 1:  # (X, Y, Z, 1) -> (X, Y, Z)
        arr = arr[..., 0]
    if arr.ndim > 3:
        raise DataError(f"{scan.path}: {arr.ndim}-D image of shape {tuple(arr.shape)}; "
                        "one 3-D volume per file is needed")
    if arr.size == 0:
        raise DataError(f"{scan.path}: empty image of shape {tuple(arr.shape)}")
    is_2d = arr.ndim < 3 or sum(s > 1 for s in arr.shape) < 3
    if require_3d and is_2d:
        raise DataError(f"{scan.path}: 2-D image of shape {tuple(arr.shape)} where a 3-D volume is needed")
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{scan.path}: {n_bad} NaN/inf voxels")
    scan.array = arr
    scan.spacing = tuple(scan.spacing[: arr.ndim])
    return scan


def load_scan(path: str | Path, require_3d: bool = True) -> Scan:
    """Load and validate one scan (NIfTI, NRRD, MHA/MHD, or a DICOM series folder).

    Returns Scan with `array` float32 (X, Y, Z) (or (X, Y) when require_3d=False and the file is 2-D).
    Raises DataError (one line naming the file) for anything unusable.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        if not is_dicom_series_dir(p):
            raise DataError(f"{p}: folder holds no DICOM series")
        scan = _read_dicom_series(p)
    elif has_suffix(p, NIFTI_SUFFIXES):
        scan = _read_nifti(p)
    elif has_suffix(p, ITK_SUFFIXES) or is_dicom_file(p):
        scan = _read_itk(p)
    else:
        raise DataError(f"{p}: unsupported file type (expected .nii, .nii.gz, .nrrd, .mha, .mhd "
                        "or a DICOM series folder)")
    return validate(scan, require_3d=require_3d)
