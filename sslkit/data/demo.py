"""A small demo corpus of real scans already on this machine (no network).

Contents of `<out_dir>` (all gzip NIfTI, RAS affines with the true voxel spacing):
- `ct_head.nii.gz`        InVesalius "Cranium" head CT (ProMED CT 0051), (X, Y, Z) = 256 x 256 x 108,
                          spacing 0.957 x 0.957 x 1.5 mm, HU (int16).
- `ct_head_label.nii.gz`  its two InVesalius masks as one map: 0 background, 1 = mask_0 (threshold 226..3071 HU,
                          bone), 2 = mask_1 only (threshold -142..2986 HU minus bone: soft tissue).
- `mri_colin27_t1.nii.gz` Colin27 T1 (MRIcron ch2), 181 x 217 x 181, 1 mm; label `mri_colin27_aal.nii.gz`
                          (AAL atlas, 116 regions, same grid).
- `mri_mni152_t1.nii.gz`  MNI152 2009a T1 bundled with nilearn, 197 x 233 x 189, 1 mm; label
                          `mri_mni152_gmwm.nii.gz` (0 background, 1 grey matter, 2 white matter: argmax of the
                          bundled GM / WM probability maps against background).
- `dicom/ct_series/`      a real 5-slice CT DICOM series from pydicom's test files (16 x 16, 0.49 x 0.49 x 2.5 mm)
                          and `ct_dicom_series.nii.gz`, its SimpleITK conversion (listed under "dicom", not in
                          "training": too small to crop).
- `datalist.json`         decathlon style: "training" (every volume for SSL, each with "modality"),
                          "labelled" (image/label pairs; label meanings differ per scan), "labelled_mni_gmwm" (the
                          MNI152 T1 + grey / white matter pair only: one label meaning, for `data.with_labels`
                          pretraining), "labelled_ct_head" (the head CT + bone / soft tissue pair only), "dicom" (the DICOM series folder and its conversion).
InVesalius CT and Colin27 are required; the other sources are skipped when absent.

Downstream demo layouts are written from the same sources (`build_mni_gm_wm`, `build_mni_acdc`,
`build_ct_head_halves`): one scan split at the midline into a left half (training) and a right half (validation).
`build_mni_slabs` cuts the MNI152 left hemisphere into cases for the grey / white matter study; `build_brain_regions`
writes `regions/`: AAL regions merged into 6 structures, trained on Colin27 and validated on the MNI152 T1.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import plistlib
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from sslkit.data.datalist import write_datalist
from sslkit.errors import DataError

INVESALIUS_CT = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
COLIN27_DIR = Path("/usr/share/mricron/templates")
DATALIST_NAME = "datalist.json"
# Lists of "labelled" entries that share one label meaning (list name -> label file name): a labelled pretraining
# recipe names one with data.datalist_key.
LABEL_SUBSETS = {"labelled_mni_gmwm": "mri_mni152_gmwm.nii.gz", "labelled_ct_head": "ct_head_label.nii.gz"}


_BUILD_LOCK = Path(tempfile.gettempdir()) / "sslkit-demo-build.lock"
_held = 0  # re-entrancy depth of this process's hold on _BUILD_LOCK (builders call each other)


@contextlib.contextmanager
def _build_lock():
    """One process at a time writes demo files on this machine: fine-tunes started together (a study's workers,
    parallel tests) would otherwise write the same files at once and read each other's half-written ones."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    fd = os.open(_BUILD_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held = 1
        yield
    finally:
        _held = 0
        os.close(fd)  # releases the lock


def _one_builder_at_a_time(builder):
    @functools.wraps(builder)
    def locked(*args, **kwargs):
        with _build_lock():
            return builder(*args, **kwargs)

    return locked


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(path.name.replace(".nii.gz", f".tmp-{os.getpid()}.nii.gz"))
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def _centred_affine(spacing_ras: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Diagonal affine (signed spacing per axis) with the volume centre at world (0, 0, 0)."""
    aff = np.diag(list(spacing_ras) + [1.0])
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return aff


# ------------------------------------------------------------------------------------------ sources


def _safe_extract(tf: tarfile.TarFile, dest: str) -> None:
    """Extract only regular files and folders with relative names inside `dest`. Python >= 3.11.4 also applies
    its "data" filter; Debian's 3.11.2 has no extraction filters, hence the explicit member check."""
    for m in tf.getmembers():
        name = Path(m.name)
        if name.is_absolute() or ".." in name.parts or not (m.isfile() or m.isdir()):
            raise DataError(f"{tf.name}: refusing tar member {m.name!r} (not a plain relative file or folder)")
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tf.extractall(dest, **kwargs)


def _invesalius_ct(out: Path) -> tuple[Path, Path]:
    """Cranium.inv3 (tar.gz of plists + raw memmaps) -> ct_head.nii.gz + ct_head_label.nii.gz.

    The matrix is (z, y, x) int16. Looking at the data: z runs inferior -> superior (skull base at z=0), y runs
    posterior -> anterior (InVesalius flips DICOM rows; frontal sinus at high y), x follows the DICOM column
    direction (patient right -> left). So in RAS: x -> -R, y -> +A, z -> +S.
    """
    if not INVESALIUS_CT.is_file():
        raise DataError(f"{INVESALIUS_CT}: InVesalius example missing (apt-get install invesalius-examples)")
    with tempfile.TemporaryDirectory() as td:
        with tarfile.open(INVESALIUS_CT, "r:gz") as tf:
            _safe_extract(tf, td)
        main_plist = next(Path(td).rglob("main.plist"))
        root = main_plist.parent
        main = plistlib.loads(main_plist.read_bytes())
        shape = tuple(main["matrix"]["shape"])                       # (z, y, x)
        vol = np.fromfile(root / main["matrix"]["filename"], dtype=main["matrix"]["dtype"]).reshape(shape)
        sx, sy, sz = (float(s) for s in main["spacing"])             # (x, y, z) mm
        masks = {}
        for idx, name in main.get("masks", {}).items():
            m = plistlib.loads((root / name).read_bytes())
            mshape = tuple(m["mask_shape"])                          # (z+1, y+1, x+1)
            raw = np.fromfile(root / m["mask_file"], dtype=np.uint8).reshape(mshape)
            masks[int(idx)] = raw[1:, 1:, 1:] >= 127                 # first plane/row/col is bookkeeping
    ct = np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(np.int16)   # (z, y, x) -> (X, Y, Z)
    affine = _centred_affine(np.array([-sx, sy, sz]), ct.shape)
    label = np.zeros(shape, dtype=np.uint8)                          # (z, y, x)
    if 1 in masks:
        label[masks[1]] = 2
    if 0 in masks:
        label[masks[0]] = 1
    label = np.ascontiguousarray(label.transpose(2, 1, 0))
    return (_save_nifti(ct, affine, out / "ct_head.nii.gz"),
            _save_nifti(label, affine, out / "ct_head_label.nii.gz"))


def _colin27(out: Path) -> tuple[Path, Path | None]:
    src = COLIN27_DIR / "ch2.nii.gz"
    if not src.is_file():
        raise DataError(f"{src}: Colin27 template missing (apt-get install mricron-data)")
    img_path = out / "mri_colin27_t1.nii.gz"
    shutil.copyfile(src, img_path)
    aal = COLIN27_DIR / "aal.nii.gz"
    if not aal.is_file():
        return img_path, None
    import nibabel as nib

    a, b = nib.load(str(src)), nib.load(str(aal))
    if a.shape != b.shape or not np.allclose(a.affine, b.affine):
        return img_path, None
    lab_path = out / "mri_colin27_aal.nii.gz"
    shutil.copyfile(aal, lab_path)
    return img_path, lab_path


def _mni152(out: Path) -> tuple[Path, Path] | None:
    """nilearn's bundled MNI152 2009a T1 (1 mm) and its grey / white matter label map (argmax of the bundled GM /
    WM probability maps against background); None when nilearn is not installed."""
    try:
        from nilearn import datasets
        t1 = datasets.load_mni152_template(resolution=1)
        gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    except Exception:  # noqa: BLE001 - optional source
        return None
    arr = np.asarray(t1.dataobj, dtype=np.float32)
    probs = np.stack([np.clip(1.0 - gm - wm, 0, 1), gm, wm])         # (3, X, Y, Z): bg, GM, WM
    label = np.argmax(probs, axis=0).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    return (_save_nifti(arr, np.asarray(t1.affine), out / "mri_mni152_t1.nii.gz"),
            _save_nifti(label, np.asarray(t1.affine), out / "mri_mni152_gmwm.nii.gz"))


def _pydicom_ct_series(out: Path) -> tuple[Path, Path] | None:
    """Copy pydicom's 5-slice CT test series (dicomdirtests/98892001/CT5N) and convert it with SimpleITK."""
    try:
        import pydicom.data
        base = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    except Exception:  # noqa: BLE001 - optional source
        return None
    if not base.is_dir():
        return None
    import SimpleITK as sitk

    dst = out / "dicom" / "ct_series"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in base.iterdir() if p.is_file())):
        shutil.copyfile(f, dst / f"slice_{i:03d}.dcm")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dst)))
    img = reader.Execute()
    nii = out / "ct_dicom_series.nii.gz"
    sitk.WriteImage(img, str(nii), useCompression=True)
    return dst, nii


# --------------------------------------------------------------------------------------- the corpus


def _complete(out: Path) -> bool:
    dl = out / DATALIST_NAME
    if not dl.is_file():
        return False
    try:
        doc = json.loads(dl.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    for lst in doc.values():
        for e in lst if isinstance(lst, list) else []:
            for k in ("image", "label"):
                if isinstance(e, dict) and k in e and not (out / e[k]).exists():
                    return False
    return True


def _label_subsets(labelled: list) -> dict[str, list]:
    """{list name: the entries of `labelled` whose label file is that list's} (empty when the source is absent)."""
    return {key: [e for e in labelled if Path(e["label"]).name == name] for key, name in LABEL_SUBSETS.items()}


def _add_missing_subsets(out: Path) -> None:
    """A corpus built before a subset list existed gains it here, without rebuilding the scans."""
    dl = out / DATALIST_NAME
    doc = json.loads(dl.read_text(encoding="utf-8"))
    missing = {k: v for k, v in _label_subsets(doc.get("labelled", [])).items() if k not in doc}
    if missing:
        write_datalist({**doc, **missing}, dl, base_dir=out)


@_one_builder_at_a_time
def build_demo_corpus(out_dir: Path) -> Path:
    """Build (once) the demo corpus in `out_dir` and return its datalist.json path. Idempotent: a complete
    corpus is left as it is (it only gains lists added to the builder since, see LABEL_SUBSETS)."""
    out = Path(out_dir).expanduser().resolve()
    if _complete(out):
        _add_missing_subsets(out)
        _downstream_demos(out)
        return out / DATALIST_NAME
    out.mkdir(parents=True, exist_ok=True)
    training, labelled, dicom = [], [], []

    ct, ct_lab = _invesalius_ct(out)
    training.append({"image": str(ct), "modality": "ct"})
    labelled.append({"image": str(ct), "label": str(ct_lab), "modality": "ct",
                     "classes": {"0": "background", "1": "bone (mask_0)", "2": "soft tissue (mask_1 only)"}})

    colin, colin_lab = _colin27(out)
    training.append({"image": str(colin), "modality": "mri"})
    if colin_lab is not None:
        labelled.append({"image": str(colin), "label": str(colin_lab), "modality": "mri",
                         "classes": "AAL atlas (116 regions)"})

    mni = _mni152(out)
    if mni is not None:
        training.append({"image": str(mni[0]), "modality": "mri"})
        labelled.append({"image": str(mni[0]), "label": str(mni[1]), "modality": "mri",
                         "classes": {"0": "background", "1": "grey matter", "2": "white matter"}})

    series = _pydicom_ct_series(out)
    if series is not None:
        dicom.append({"image": str(series[0]), "modality": "ct", "format": "dicom_series"})
        dicom.append({"image": str(series[1]), "modality": "ct", "format": "nifti_from_dicom"})

    doc = {"name": "sslkit demo corpus", "description": __doc__.split("\n\n")[0],
           "training": training, "labelled": labelled, **_label_subsets(labelled), "dicom": dicom}
    path = write_datalist(doc, out / DATALIST_NAME, base_dir=out)
    _downstream_demos(out)
    return path


def _downstream_demos(out: Path) -> None:
    """The downstream demo layouts written from the corpus (hemispheres, the slab studies' cases), once."""
    if (out / "mri_mni152_t1.nii.gz").is_file():
        build_mni_slabs(out)
        if (out / "mri_colin27_aal.nii.gz").is_file() and COLIN27_BRAIN.is_file() and AAL_NAMES.is_file():
            build_brain_regions(out)


# ------------------------------------------------------------------------------------ downstream demo layouts


def _write_halves(img: np.ndarray, seg: np.ndarray, aff: np.ndarray, mid: int, files: dict) -> None:
    """Split a volume at voxel x = mid into left / right NIfTI image + label files (affines keep world
    positions). files: {"left": (image path, label path), "right": (...)}."""
    for side, (sl, start) in {"left": (slice(0, mid), 0), "right": (slice(mid, img.shape[0]), mid)}.items():
        a = aff.copy()
        a[:3, 3] = aff[:3, :3] @ [start, 0, 0] + aff[:3, 3]
        _save_nifti(np.ascontiguousarray(img[sl]), a, files[side][0])
        _save_nifti(np.ascontiguousarray(seg[sl]), a, files[side][1])


def _halves(image: Path, label: Path, out: Path, stem: str, mid: int | None = None) -> tuple[list[dict], list[dict]]:
    """([left half case], [right half case]) of an image / label pair, written once under `out`. `mid`: the
    voxel x of the split (default: world x = 0 when the volume spans it, else the middle)."""
    import nibabel as nib

    files = {side: (out / f"{stem}_{side}.nii.gz", out / f"{stem}_{side}_label.nii.gz") for side in ("left", "right")}
    if not all(f.is_file() for pair in files.values() for f in pair):
        out.mkdir(parents=True, exist_ok=True)
        img, lab = nib.load(str(image)), nib.load(str(label))
        arr = np.asarray(img.dataobj)
        if mid is None:
            x0 = int(round(np.linalg.solve(img.affine, [0, 0, 0, 1])[0]))
            mid = x0 if 0 < x0 < arr.shape[0] else arr.shape[0] // 2
        _write_halves(arr, np.asarray(lab.dataobj).astype(np.uint8), img.affine, mid, files)
    return ([{"image": str(files["left"][0]), "label": str(files["left"][1])}],
            [{"image": str(files["right"][0]), "label": str(files["right"][1])}])


@_one_builder_at_a_time
def build_mni_gm_wm(root: str | Path, spatial_dims: int = 3) -> tuple[list[dict], list[dict]]:
    """The MNI152 grey / white matter demo under `root` (idempotent, no network): the corpus's 1 mm MNI152 T1 and
    label map (`mri_mni152_t1.nii.gz` / `mri_mni152_gmwm.nii.gz`, written by nilearn's bundled template when `root`
    lacks them), split at the midline into the left hemisphere (training) and the right one (validation).

    spatial_dims=2: axial slices of each hemisphere (every 6th slice from z 36 to 150; validation slices sit at
    other z positions of the other hemisphere)."""
    root = Path(root)
    image, label = root / "mri_mni152_t1.nii.gz", root / "mri_mni152_gmwm.nii.gz"
    if not (image.is_file() and label.is_file()) and _mni152(root) is None:
        raise DataError(f"{root}: no mri_mni152_t1.nii.gz / mri_mni152_gmwm.nii.gz and nilearn is not installed "
                        "(pip install nilearn, or build the demo corpus with `sslkit data demo`)")
    train, val = _halves(image, label, root / "halves", "mni")
    if spatial_dims == 2:
        return _axial_slices(train[0], root / "slices_left", 0), _axial_slices(val[0], root / "slices_right", 3)
    return train, val


def _axial_slices(case: dict, out: Path, offset: int, every: int = 6, lo: int = 36, hi: int = 150) -> list[dict]:
    """2-D demo: every `every`-th axial slice z in [lo, hi) (+offset) as 2-D NIfTI image / label pairs."""
    import nibabel as nib

    img, seg = nib.load(case["image"]), nib.load(case["label"])
    cases = []
    out.mkdir(parents=True, exist_ok=True)
    aff = np.eye(4)
    aff[:2, :2], aff[:2, 3] = img.affine[:2, :2], img.affine[:2, 3]
    for z in range(lo + offset, hi, every):
        fi, fl = out / f"img_z{z:03d}.nii.gz", out / f"seg_z{z:03d}.nii.gz"
        if not (fi.is_file() and fl.is_file()):
            _save_nifti(np.asarray(img.dataobj[:, :, z], np.float32), aff, fi)
            _save_nifti(np.asarray(seg.dataobj[:, :, z], np.uint8), aff, fl)
        cases.append({"image": str(fi), "label": str(fl)})
    return cases


@_one_builder_at_a_time
def build_mni_acdc(root: str | Path) -> Path:
    """The MNI GM/WM demo in the ACDC layout: training/patient001 = left hemisphere, testing/patient002 = right
    (one frame each, labels 1 grey / 2 white matter). Idempotent."""
    root = Path(root)
    (train,), (val,) = build_mni_gm_wm(root / "source", 3)
    for split, pid, case in (("training", "patient001", train), ("testing", "patient002", val)):
        d = root / split / pid
        d.mkdir(parents=True, exist_ok=True)
        for key, suffix in (("image", ""), ("label", "_gt")):
            dst = d / f"{pid}_frame01{suffix}.nii.gz"
            if not dst.is_file():
                shutil.copyfile(case[key], dst)
    return root


@_one_builder_at_a_time
def build_ct_head_halves(corpus: str | Path) -> tuple[list[dict], list[dict]]:
    """Demo: the demo corpus's head CT (`sslkit data demo` folder) split into a left half (train) and a right
    half (validation) under `corpus`/halves/; labels 1 bone, 2 soft tissue. Idempotent."""
    corpus = Path(corpus)
    src_img, src_lab = corpus / "ct_head.nii.gz", corpus / "ct_head_label.nii.gz"
    if not (src_img.is_file() and src_lab.is_file()):
        raise DataError(f"{corpus}: no ct_head.nii.gz / ct_head_label.nii.gz (build it with `sslkit data demo`)")
    import nibabel as nib

    return _halves(src_img, src_lab, corpus / "halves", "ct_head", mid=nib.load(str(src_img)).shape[0] // 2)


# ------------------------------------------------------------------------------------ label-efficiency demo

MNI_SLABS_DIR = "mni_slabs"


def _slab_bounds(label: np.ndarray, n_slabs: int) -> list[tuple[int, int]]:
    """n_slabs consecutive [z0, z1) ranges of equal thickness (+-1 voxel) covering the labelled z extent."""
    zs = np.nonzero(label.any(axis=(0, 1)))[0]
    edges = np.linspace(int(zs.min()), int(zs.max()) + 1, n_slabs + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@_one_builder_at_a_time
def build_mni_slabs(root: str | Path, n_slabs: int = 6) -> Path:
    """The label-efficiency demo (`sslkit study`) under `root` (the demo corpus; idempotent, no network); returns
    the path of its datalist, `root`/mni_slabs/datalist.json (layout `datalist`).

    Training: the MNI152 T1's left hemisphere (written by `build_mni_gm_wm`, 1 mm, labels 1 grey / 2 white matter)
    cut into `n_slabs` axial slabs of equal thickness over the labelled z extent (6 slabs: about 25.5 mm each),
    each slab one training case with its world position kept in its affine. Validation: the whole right
    hemisphere. What a budget of n cases means here: n slabs of one (average-template) brain, not n subjects; the
    right hemisphere is a near mirror image of the left, so the study measures how well a model fitted on part of
    one hemisphere labels the other, not cross-subject generalisation. Each slab is intensity-normalised on its
    own by the plan's scheme (as every case is), so slab and hemisphere statistics differ a little."""
    import nibabel as nib

    if n_slabs < 2:
        raise DataError(f"{root}: the slab demo needs at least 2 slabs, got {n_slabs}")
    root = Path(root).expanduser().resolve()
    out = root / MNI_SLABS_DIR
    datalist = out / DATALIST_NAME
    (left,), (right,) = build_mni_gm_wm(root, 3)
    img, seg = nib.load(left["image"]), nib.load(left["label"])
    arr, lab = np.asarray(img.dataobj), np.asarray(seg.dataobj).astype(np.uint8)
    training = []
    for i, (z0, z1) in enumerate(_slab_bounds(lab, n_slabs), start=1):
        stem = f"slab{i}_z{z0:03d}-{z1:03d}"
        files = (out / f"{stem}.nii.gz", out / f"{stem}_label.nii.gz")
        if not all(f.is_file() for f in files):
            out.mkdir(parents=True, exist_ok=True)
            aff = img.affine.copy()
            aff[:3, 3] = img.affine[:3, :3] @ [0, 0, z0] + img.affine[:3, 3]
            _save_nifti(np.ascontiguousarray(arr[:, :, z0:z1]), aff, files[0])
            _save_nifti(np.ascontiguousarray(lab[:, :, z0:z1]), aff, files[1])
        training.append({"image": str(files[0]), "label": str(files[1])})
    doc = {"name": "MNI152 GM/WM slabs",
           "description": f"{n_slabs} axial slabs of the MNI152 T1 left hemisphere (training cases) and the right "
                          "hemisphere (validation); labels 0 background, 1 grey matter, 2 white matter",
           "training": training, "validation": [right]}
    return write_datalist(doc, datalist)


# ------------------------------------------------------------------------------------ brain regions demo

REGIONS_DIR = "regions"
REGIONS_SLABS = "slabs"
# The 6 structures (label 1..6), both hemispheres in one label: left / right mirror flips stay label-preserving.
REGION_NAMES = ("frontal", "parietal", "temporal", "occipital", "cerebellum", "deep_grey")
COLIN27_BRAIN = COLIN27_DIR / "ch2bet.nii.gz"   # Colin27 brain-extracted (MRIcron, same grid as ch2)
AAL_NAMES = COLIN27_DIR / "aal.nii.txt"          # "index name code" per line, e.g. "1 Precentral_L 2001"


def aal_structure(code: int) -> int:
    """The merged structure (1..6, REGION_NAMES order) of an AAL region by its atlas code: the thousands digit is
    the group (2 frontal, 3 insula, 4 limbic, 5 occipital, 6 parietal, 7 deep grey, 8 temporal, 9 cerebellum).
    Insula and the medial temporal limbic regions (hippocampus, parahippocampal, amygdala: 41xx, 42xx) join the
    temporal lobe; the cingulum joins the lobe it lies under (anterior / middle 400x-401x frontal, posterior 402x
    parietal)."""
    if 4000 <= code < 4020:
        return 1
    if 4020 <= code < 4100:
        return 2
    group = {2: 1, 6: 2, 3: 3, 4: 3, 8: 3, 5: 4, 9: 5, 7: 6}
    if code // 1000 not in group:
        raise DataError(f"{AAL_NAMES}: AAL code {code} is in no known group")
    return group[code // 1000]


def _aal_lookup(names_file: Path = AAL_NAMES) -> np.ndarray:
    """uint8 lookup table: AAL voxel value -> merged structure (0 stays background)."""
    if not names_file.is_file():
        raise DataError(f"{names_file}: AAL region list missing (apt-get install mricron-data)")
    lut = np.zeros(256, dtype=np.uint8)
    for line in names_file.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3:
            lut[int(parts[0])] = aal_structure(int(parts[2]))
    return lut


def fill_by_nearest_label(label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every voxel of `mask` takes the label of the nearest labelled voxel (Euclidean, voxel units); 0 outside."""
    from scipy import ndimage

    nearest = ndimage.distance_transform_edt(label == 0, return_distances=False, return_indices=True)
    return (label[tuple(nearest)] * mask).astype(np.uint8)


def carry_labels(label: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                 dst_shape: tuple[int, ...]) -> np.ndarray:
    """`label` resampled onto another grid by nearest neighbour in world (mm) coordinates (0 outside its grid)."""
    from scipy import ndimage

    dst_to_src = np.linalg.solve(src_affine, dst_affine)  # destination voxel -> source voxel
    return ndimage.affine_transform(label, dst_to_src[:3, :3], offset=dst_to_src[:3, 3], output_shape=dst_shape,
                                    order=0, mode="constant", cval=0).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def carried_fit(carried: np.ndarray, brain: np.ndarray, gm_wm: np.ndarray) -> dict:
    """How well labels carried from another brain fit this one: the fraction of carried labelled voxels inside
    its brain (image > 0) and inside its grey + white matter, and the Dice of the carried labelled mask with each."""
    lab = carried > 0
    n = max(int(lab.sum()), 1)
    return {"inside_brain": float((lab & brain).sum() / n), "inside_gm_wm": float((lab & gm_wm).sum() / n),
            "dice_brain": _dice(lab, brain), "dice_gm_wm": _dice(lab, gm_wm)}


def _region_maps(root: Path) -> dict:
    """Colin27's brain image and merged region map, and the map carried onto the MNI152 grid, with its fit."""
    import nibabel as nib
    from scipy import ndimage

    for f in (root / "mri_colin27_t1.nii.gz", root / "mri_colin27_aal.nii.gz", root / "mri_mni152_t1.nii.gz",
              root / "mri_mni152_gmwm.nii.gz", COLIN27_BRAIN):
        if not f.is_file():
            raise DataError(f"{f}: missing (the brain regions demo needs the demo corpus's Colin27 + AAL and "
                            "MNI152 scans, `sslkit data demo`, and mricron-data's ch2bet.nii.gz)")
    colin = nib.load(str(root / "mri_colin27_t1.nii.gz"))
    aal = np.asarray(nib.load(str(root / "mri_colin27_aal.nii.gz")).dataobj).astype(np.uint8)
    structures = _aal_lookup()[aal]
    # brain = MRIcron's brain extraction plus every AAL voxel (the atlas reaches ~1 mm past it at the cortex)
    brain = ndimage.binary_fill_holes((np.asarray(nib.load(str(COLIN27_BRAIN)).dataobj) > 0) | (aal > 0))
    colin_regions = fill_by_nearest_label(structures, brain)
    mni = nib.load(str(root / "mri_mni152_t1.nii.gz"))
    mni_brain = np.asarray(mni.dataobj) > 0                   # nilearn's template is brain-extracted
    gm_wm = np.asarray(nib.load(str(root / "mri_mni152_gmwm.nii.gz")).dataobj) > 0
    carried = carry_labels(colin_regions, colin.affine, mni.affine, mni.shape)
    colin_t1 = np.asarray(colin.dataobj)
    return {"colin_brain": np.where(brain, colin_t1, 0).astype(colin_t1.dtype), "colin_affine": colin.affine,
            "colin_regions": colin_regions, "mni_regions": fill_by_nearest_label(carried, mni_brain),
            "mni_affine": mni.affine, "fit": carried_fit(carried, mni_brain, gm_wm)}


def _sagittal_slabs(label: np.ndarray, n_slabs: int) -> list[tuple[int, int]]:
    """n_slabs consecutive [x0, x1) ranges of equal thickness (+-1 voxel) covering the labelled x extent."""
    xs = np.nonzero(label.any(axis=(1, 2)))[0]
    edges = np.linspace(int(xs.min()), int(xs.max()) + 1, n_slabs + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _write_slabs(image: Path, label: Path, out: Path, n_slabs: int) -> list[dict]:
    import nibabel as nib

    img, seg = nib.load(str(image)), nib.load(str(label))
    arr, lab = np.asarray(img.dataobj), np.asarray(seg.dataobj).astype(np.uint8)
    cases = []
    for i, (x0, x1) in enumerate(_sagittal_slabs(lab, n_slabs), start=1):
        files = (out / f"slab{i}_x{x0:03d}-{x1:03d}.nii.gz", out / f"slab{i}_x{x0:03d}-{x1:03d}_label.nii.gz")
        if not all(f.is_file() for f in files):
            out.mkdir(parents=True, exist_ok=True)
            aff = img.affine.copy()
            aff[:3, 3] = img.affine[:3, :3] @ [x0, 0, 0] + img.affine[:3, 3]
            _save_nifti(np.ascontiguousarray(arr[x0:x1]), aff, files[0])
            _save_nifti(np.ascontiguousarray(lab[x0:x1]), aff, files[1])
        cases.append({"image": str(files[0]), "label": str(files[1]), "modality": "mri"})
    return cases


@_one_builder_at_a_time
def build_brain_regions(root: str | Path, n_slabs: int = 4) -> Path:
    """The brain regions demo under `root` (the demo corpus; idempotent, no network): a segmentation task that
    needs anatomical context, not intensity. Returns `root`/regions/datalist.json (layout `datalist`).

    Labels: the AAL atlas on Colin27 merged into 6 bilateral structures (REGION_NAMES, see aal_structure), grown
    by nearest label over the whole brain (white matter and ventricles included), so each structure is a lobe-like
    part of the brain that only its position tells apart. Training: Colin27's T1 brain (`regions/
    mri_colin27_brain.nii.gz`: skull removed with MRIcron's brain mask, as nilearn's MNI152 is) with
    `regions/mri_colin27_regions.nii.gz`. Validation: the MNI152 T1 (another brain; both are in MNI space) with
    `regions/mri_mni152_regions.nii.gz`: the Colin27 map carried onto its grid by nearest neighbour in world
    coordinates, kept inside the MNI152 brain (T1 > 0) and grown by nearest label over the brain voxels it missed.
    The datalist's "carried_fit" says how well the carried map fit before that (see carried_fit).

    The label-efficiency study's cases, `regions/slabs/datalist.json`: Colin27's brain cut into `n_slabs`
    sagittal slabs of equal thickness (4: ~36 mm each), same validation. Sagittal slabs are the cut in which each
    case holds (nearly) every structure: the two lateral slabs hold no deep grey matter, axial or coronal slabs
    would each lack whole lobes. A budget of n is n slabs of one brain, not n subjects."""
    if n_slabs < 2:
        raise DataError(f"{root}: the brain regions study needs at least 2 slabs, got {n_slabs}")
    root = Path(root).expanduser().resolve()
    out = root / REGIONS_DIR
    files = {k: out / f"mri_{k}.nii.gz" for k in ("colin27_brain", "colin27_regions", "mni152_regions")}
    datalist = out / DATALIST_NAME
    labels = {"0": "background", **{str(i): n for i, n in enumerate(REGION_NAMES, start=1)}}  # MSD's "labels"
    if not (datalist.is_file() and all(f.is_file() for f in files.values())):
        maps = _region_maps(root)
        out.mkdir(parents=True, exist_ok=True)
        _save_nifti(maps["colin_brain"], maps["colin_affine"], files["colin27_brain"])
        _save_nifti(maps["colin_regions"], maps["colin_affine"], files["colin27_regions"])
        _save_nifti(maps["mni_regions"], maps["mni_affine"], files["mni152_regions"])
        doc = {"name": "Brain regions (AAL merged), Colin27 -> MNI152",
               "description": "AAL atlas regions merged into 6 bilateral structures grown over the brain; "
                              "training: Colin27 T1 brain, validation: MNI152 T1 brain (atlas carried over in "
                              "world coordinates)",
               "labels": labels, "carried_fit": maps["fit"],
               "training": [{"image": str(files["colin27_brain"]), "label": str(files["colin27_regions"]),
                             "modality": "mri"}],
               "validation": [{"image": str(root / "mri_mni152_t1.nii.gz"), "label": str(files["mni152_regions"]),
                               "modality": "mri"}]}
        write_datalist(doc, datalist)
    doc = json.loads(datalist.read_text(encoding="utf-8"))
    slabs_dir = out / REGIONS_SLABS
    cases = _write_slabs(files["colin27_brain"], files["colin27_regions"], slabs_dir, n_slabs)
    slabs_doc = {"name": f"Brain regions, {n_slabs} sagittal slabs of Colin27 -> MNI152",
                 "description": f"{n_slabs} sagittal slabs of the Colin27 T1 brain (training cases) and the MNI152 "
                                "T1 brain (validation); AAL regions merged into 6 bilateral structures",
                 "labels": labels, "carried_fit": doc["carried_fit"], "training": cases,
                 "validation": [{**e, "image": os.path.normpath(out / e["image"]),
                                 "label": os.path.normpath(out / e["label"])} for e in doc["validation"]]}
    write_datalist(slabs_doc, slabs_dir / DATALIST_NAME)  # (re)written: n_slabs may differ from the last call
    return datalist
