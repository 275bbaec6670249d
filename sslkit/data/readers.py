"""Read one scan from disk into a `Scan`: NIfTI (nibabel), NRRD / MHA / MHD (SimpleITK), DICOM series folders.

Every reader returns the voxel array in (X, Y, Z) (or (X, Y)) index order, the order nibabel and MONAI use,
with a 4x4 RAS affine. Problems a user can cause raise `DataError` with one line naming the file and the problem:
a missing path, a corrupt or truncated file, a `.nii.gz` that is not gzip-compressed, a 2-D image where a volume
is needed, NaN / inf voxels, a DICOM series with missing slices, uneven spacing, mixed orientations or two
different images at one position.

Documented behaviours (a warning line each, once per process):
- a DICOM folder holding several series is read as the series with the most files (a tie is a DataError);
- DICOM files that are byte-identical copies of another slice are left out.
NaN / inf voxels are never replaced: a label map or a loss over voxels whose value is unknown would be a guess
(there is no neutral value: 0 is water in CT, -1000 HU air), so `predict`, `evaluate` and `finetune` refuse such a
scan with a line giving the count, the fraction and the box of the bad voxels, and pretraining leaves it out and
records it in skipped.jsonl.
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


def simpleitk():
    """SimpleITK with ITK's own warnings off: they are C++ lines on stderr (e.g. "Non uniform sampling") that
    repeat what the checks here say in one line, or say nothing a user can act on."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _read_nifti(path: Path) -> Scan:
    import nibabel as nib

    _check_compression(path)
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.get_fdata(dtype=np.float32))  # (X, Y, Z[, T...])
    except (EOFError, OSError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DataError(f"{path}: truncated or corrupt NIfTI ({_short(e)})") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return Scan(path, arr, np.asarray(img.affine, dtype=np.float64), zooms)


def _check_compression(path: Path) -> None:
    """A `.gz` file must start with the gzip magic bytes; an empty file is refused before nibabel sees it."""
    try:
        with open(path, "rb") as f:
            head = f.read(348)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if not head:
        raise DataError(f"{path}: empty file (0 bytes)")
    if path.name.lower().endswith(".gz") and head[:2] != b"\x1f\x8b":
        plain = head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00")
        hint = "it is an uncompressed NIfTI: rename it .nii" if plain else "not a NIfTI file either"
        raise DataError(f"{path}: named .gz but not gzip-compressed ({hint})")


def _sitk_to_scan(path: Path, img) -> Scan:
    """SimpleITK image (LPS world, array (Z, Y, X)) -> Scan (RAS affine, array (X, Y, Z))."""
    sitk = simpleitk()

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
    sitk = simpleitk()

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: truncated or corrupt image file ({_short(e)})") from None
    return _sitk_to_scan(path, img)


def _read_dicom_series(path: Path) -> Scan:
    """Read the series `check_dicom_series` chooses in a DICOM folder (its slices ordered along the normal, byte-
    identical copies left out) with SimpleITK's ImageSeriesReader; its warnings are printed once."""
    sitk = simpleitk()

    series = check_dicom_series(path)
    for line in series.warnings:
        warn_once(line)
    reader = sitk.ImageSeriesReader()
    try:
        reader.SetFileNames([str(f) for f in series.files])
        img = reader.Execute()
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable DICOM series ({_short(e)})") from None
    return _sitk_to_scan(path, img)


# ------------------------------------------------------------------------------------------- DICOM series

SLICE_TOLERANCE = 0.05   # a slice step may differ from the series' step by 5 % (+ 0.001 mm) and count as regular


@dataclass
class DicomSeries:
    """The series a DICOM folder is read as: `files` ordered along the slice normal; `warnings`: one line each
    (other series in the folder, byte-identical copies left out)."""

    folder: Path
    uid: str
    files: list[Path]
    warnings: list[str]


def check_dicom_series(folder: str | Path) -> DicomSeries:
    """Choose and check the series of a DICOM folder from the file headers only (no pixel data is read).

    - Several series in one folder: the one with the most files is used, with a warning naming it and counting
      the others; a tie between the largest is a DataError (which one was meant is unknown).
    - Slices at the same position along the normal n = row x column of ImageOrientationPatient: files that are
      byte-identical copies are left out with a warning; different images at one position (two acquisitions
      or echoes in one series) are a DataError.
    - Positions p_i = ImagePositionPatient_i . n must step by one spacing s = min_i (p_(i+1) - p_i): a step of
      k*s (k >= 2) is a DataError naming the k - 1 missing slices, any other uneven step a DataError too
      (a reader would otherwise spread the slices evenly and give every voxel behind the gap a wrong position).
    - Slices with different orientations are a DataError.
    - Several files of which some lack position / orientation tags (secondary captures, 2-D images) are a
      DataError: nothing says where their slices lie. A single (multi-frame) file is not checked.
    Not detectable from positions: every other slice missing (the steps stay even). SpacingBetweenSlices
    (0018,0088) is not trusted to tell, as common writers (GDCM) fill it with 1 when they do not know it.
    """
    sitk = simpleitk()

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    try:
        ids = list(reader.GetGDCMSeriesIDs(str(folder)))
        groups = {uid: [Path(f) for f in reader.GetGDCMSeriesFileNames(str(folder), uid)] for uid in ids}
    except RuntimeError as e:
        raise DataError(f"{folder}: unreadable DICOM series ({_short(e)})") from None
    groups = {uid: files for uid, files in groups.items() if files}
    if not groups:
        raise DataError(f"{folder}: no readable DICOM series in this folder")
    uid, warnings = _choose_series(folder, groups)
    files, more = _order_slices(folder, groups[uid])
    return DicomSeries(folder, uid, files, warnings + more)


def _choose_series(folder: Path, groups: dict[str, list[Path]]) -> tuple[str, list[str]]:
    by_size = sorted(groups, key=lambda u: len(groups[u]), reverse=True)
    uid = by_size[0]
    if len(by_size) == 1:
        return uid, []
    if len(groups[by_size[1]]) == len(groups[uid]):
        raise DataError(f"{folder}: holds {len(groups)} DICOM series, the largest {len(groups[uid])} files each; "
                        "which one is meant is unclear: put each series in its own folder")
    others = ", ".join(str(len(groups[u])) for u in by_size[1:])
    return uid, [f"{folder}: holds {len(groups)} DICOM series; using series {uid} ({len(groups[uid])} files), "
                 f"ignoring {len(groups) - 1} other(s) of {others} file(s); put each series in its own folder "
                 "to use them"]


def _slice_geometry(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient (3,), ImageOrientationPatient (6,)) of one DICOM file's header; None without them."""
    sitk = simpleitk()

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.SetImageIO("GDCMImageIO")
    try:
        r.ReadImageInformation()
        if not (r.HasMetaDataKey("0020|0032") and r.HasMetaDataKey("0020|0037")):
            return None
        pos = np.array([float(v) for v in r.GetMetaData("0020|0032").split("\\")], dtype=np.float64)
        iop = np.array([float(v) for v in r.GetMetaData("0020|0037").split("\\")], dtype=np.float64)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"{path}: unreadable DICOM header ({_short(e)})") from None
    if pos.shape != (3,) or iop.shape != (6,):
        return None
    return pos, iop


def _order_slices(folder: Path, files: list[Path]) -> tuple[list[Path], list[str]]:
    """The files of one series ordered by position along the normal, byte-identical copies left out; DataError
    for images sharing a position, uneven steps (missing slices) or mixed orientations."""
    if len(files) < 2:
        return files, []
    geometry = [_slice_geometry(f) for f in files]
    unplaced = sum(g is None for g in geometry)
    if unplaced:
        raise DataError(f"{folder}: {unplaced} of {len(files)} DICOM files have no ImagePositionPatient / "
                        "ImageOrientationPatient (secondary captures or 2-D images?): no slice geometry to stack "
                        "them into a volume")
    iops = np.stack([g[1] for g in geometry])
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise DataError(f"{folder}: slices with different orientations (ImageOrientationPatient) in one series; "
                        "a localizer or reformat among the slices?")
    normal = np.cross(iops[0, :3], iops[0, 3:])
    along = np.array([float(g[0] @ normal) for g in geometry])  # (N,) mm along the normal
    order = np.argsort(along, kind="stable")
    files, along = [files[i] for i in order], along[order]
    files, along, warnings = _drop_identical_copies(folder, files, along)
    if len(files) >= 3:
        _check_even_steps(folder, files, along)
    return files, warnings


def _drop_identical_copies(folder: Path, files: list[Path], along: np.ndarray):
    keep, dropped = [0], []
    for i in range(1, len(files)):
        if abs(along[i] - along[keep[-1]]) > 1e-3:
            keep.append(i)
        elif _same_bytes(files[i], files[keep[-1]]):
            dropped.append(files[i].name)
        else:
            raise DataError(f"{folder}: {files[keep[-1]].name} and {files[i].name} are different images at the same "
                            f"position ({along[i]:.2f} mm along the slice normal): two acquisitions in one series? "
                            "keep one of them")
    warnings = [f"{folder}: {len(dropped)} file(s) are byte-identical copies of another slice and are left out "
                f"({', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''})"] if dropped else []
    return [files[i] for i in keep], along[keep], warnings


def _same_bytes(a: Path, b: Path) -> bool:
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


def _check_even_steps(folder: Path, files: list[Path], along: np.ndarray) -> None:
    """DataError unless consecutive positions `along` (N,) (ascending, mm) step by one spacing."""
    steps = np.diff(along)  # (N-1,) > 0 once copies are gone
    step = float(steps.min())
    uneven = np.flatnonzero(np.abs(steps - step) > SLICE_TOLERANCE * step + 1e-3)
    if uneven.size == 0:
        return
    i = int(uneven[np.argmax(steps[uneven])])
    where = (f"{steps[i]:.2f} mm between {files[i].name} ({along[i]:.2f} mm) and {files[i + 1].name} "
             f"({along[i + 1]:.2f} mm) along the slice normal, where slices are {step:.2f} mm apart")
    ratios = steps[uneven] / step
    if np.all(np.abs(ratios - np.round(ratios)) <= SLICE_TOLERANCE):
        missing = int(np.round(ratios).sum() - ratios.size)
        gaps = f"{uneven.size} gaps, the largest " if uneven.size > 1 else "a gap of "
        raise DataError(f"{folder}: {missing} missing slice(s): {gaps}{where}")
    raise DataError(f"{folder}: uneven slice spacing: {where}; resample the series to a regular grid first")


# ------------------------------------------------------------------------------------------- warnings

_WARNED: set[str] = set()


def warn_once(line: str) -> None:
    """Print `sslkit: warning: <line>` on stderr once per process (a scan read twice warns once)."""
    import sys

    if line not in _WARNED:
        _WARNED.add(line)
        print(f"sslkit: warning: {line}", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    """One line of an exception message (ITK messages span many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "Description" in ln or "rror" in ln), lines[-1] if lines else "")
    msg = msg.split("Description:", 1)[-1].strip()
    return (msg or type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------- validation


def validate(scan: Scan, require_3d: bool = True, channels: bool = False) -> Scan:
    """Drop trailing singleton axes, then check dimensionality and finiteness. Returns the scan.

    require_3d: a volume is needed (else a 2-D image (X, Y) is needed); channels: a 3-D scan may carry channels
    on a 4th axis (X, Y, Z, C), as multi-modal NIfTI files do (MSD BraTS)."""
    arr = scan.array
    while arr.ndim > 3 and arr.shape[-1] == 1:  # (X, Y, Z, 1) -> (X, Y, Z)
        arr = arr[..., 0]
    if not require_3d and arr.ndim == 3 and arr.shape[-1] == 1:  # a 2-D image stored as (X, Y, 1)
        arr = arr[..., 0]
    if arr.size == 0:
        raise DataError(f"{scan.path}: empty image of shape {tuple(arr.shape)}")
    spatial = arr.shape[:3] if (channels and arr.ndim == 4) else arr.shape
    if len(spatial) > 3:
        raise DataError(f"{scan.path}: {arr.ndim}-D image of shape {tuple(arr.shape)}; "
                        "one 3-D volume per file is needed")
    is_2d = len(spatial) < 3 or sum(s > 1 for s in spatial) < 3
    if require_3d and is_2d:
        raise DataError(f"{scan.path}: 2-D image of shape {tuple(arr.shape)} where a 3-D volume is needed")
    if not require_3d and len(spatial) != 2:
        raise DataError(f"{scan.path}: image of shape {tuple(arr.shape)} where a 2-D image is needed")
    if not np.isfinite(arr).all():
        raise DataError(_nonfinite_line(scan.path, ~np.isfinite(arr), len(spatial)))
    _check_affine(scan.path, scan.affine, len(spatial))
    scan.array = arr
    scan.spacing = tuple(scan.spacing[: len(spatial)])
    return scan


def _check_affine(path: Path, affine: np.ndarray, spatial_dims: int) -> None:
    """DataError unless the voxel axes map to independent world directions: a zero voxel size or two axes along one
    direction (a broken qform / sform) leave no orientation or spacing to resample by."""
    a = np.asarray(affine, dtype=np.float64)
    axes = a[:3, :spatial_dims]
    if not np.isfinite(a).all() or np.linalg.matrix_rank(axes, tol=1e-6 * max(float(np.abs(axes).max()), 1e-12)) \
            < spatial_dims:
        sizes = ", ".join(f"{v:.3g}" for v in np.linalg.norm(axes, axis=0))
        raise DataError(f"{path}: its voxel-to-world affine is singular (voxel sizes {sizes} mm, axes not "
                        "independent): the header's orientation / spacing is broken; fix it (e.g. its qform / sform) "
                        "before using the scan")


def _nonfinite_line(path: Path, bad: np.ndarray, spatial_dims: int) -> str:
    """One line on the NaN / inf voxels of a scan: count, fraction, bounding box (spatial axes)."""
    n, size = int(bad.sum()), bad.size
    if n == size:
        return f"{path}: all {size:,} voxels are NaN/inf; nothing to read"
    if bad.ndim > spatial_dims:  # channels on the last axis
        bad = bad.any(axis=tuple(range(spatial_dims, bad.ndim)))
    box = []
    for ax, name in zip(range(spatial_dims), "xyz"):
        hit = np.flatnonzero(bad.any(axis=tuple(a for a in range(spatial_dims) if a != ax)))
        box.append(f"{name} {hit[0]}..{hit[-1]}")
    return (f"{path}: {n:,} NaN/inf voxels ({100 * n / size:.2g}% of the image, within {', '.join(box)}); "
            "undefined voxels are not replaced by a guess: set them to the background value first")


def load_scan(path: str | Path, require_3d: bool = True, channels: bool = False) -> Scan:
    """Load and validate one scan (NIfTI, NRRD, MHA/MHD, or a DICOM series folder).

    Returns Scan with `array` float32 (X, Y, Z) ((X, Y, Z, C) with channels=True and a multi-channel file; (X, Y)
    when require_3d=False).
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
    return validate(scan, require_3d=require_3d, channels=channels)
