"""Labelled data for downstream training: dataset layouts, seeded splits, MONAI transforms per recipe.

Layouts (`data.layout`):
  msd        `root`/dataset.json with a `training` list of {image, label} (paths relative to root), i.e. the
             Medical Segmentation Decathlon layout (imagesTr/, labelsTr/). Validation: a seeded
             `val_fraction` of the training list (MSD has no public labelled test set).
  btcv       `root`/RawData/Training/img/img00XX.nii.gz with label/label00XX.nii.gz. Validation: the last
             `btcv_val_count` (6) cases by id, i.e. 0035-0040 — the same 6 cases as the validation list of
             Swin-UNETR's `dataset_0.json`; the other 24 train (the common 24/6 split).
  acdc       ACDC cine MRI: `root`/patientXXX/patientXXX_frameYY.nii.gz with patientXXX_frameYY_gt.nii.gz labels
             (0 background, 1 right ventricle, 2 myocardium, 3 left ventricle), one case per labelled frame
             (the 4D `_4d.nii.gz` files are ignored). With `root`/training and `root`/testing folders, testing
             is validation; otherwise a seeded `val_fraction` of the patients (both frames of a patient stay
             on the same side). `demo_source: mni_gm_wm` writes the MNI152 GM/WM demo in this layout first.
  demo_ct_head  demo: `root` is the demo corpus (`sslkit data demo`); its head CT split into a left half (train)
             and a right half (validation), labels 1 bone / 2 soft tissue (written under `root`/halves/).
  datalist   a JSON file with `training` (or `labelled`) and optionally `validation` lists of {image, label},
             paths relative to the JSON file. Without `validation`: a seeded `val_fraction` split.
  mni_gm_wm  demo: builds, under `root`, the MNI152 2 mm T1 template split into a left and a right hemisphere
             with grey matter (1) / white matter (2) labels from nilearn's bundled probability maps (> 0.5).
             Train = left hemisphere, validation = right hemisphere (voxels never seen in training; the brain
             is nearly symmetric and flips are on, so this measures fitting, not cross-subject generalisation).
`data.num_labelled` > 0 keeps a seeded subset of that many training cases (validation unchanged).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from sslkit.errors import DataError


# ------------------------------------------------------------------------------------------------ layouts


def _pairs(items, base: Path, where: str) -> list[dict]:
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "image" not in it or "label" not in it:
            raise DataError(f"{where}: entry {i} needs 'image' and 'label'")
        img = it["image"]
        imgs = [str((base / x).resolve()) for x in img] if isinstance(img, list) else str((base / img).resolve())
        out.append({"image": imgs, "label": str((base / it["label"]).resolve())})
    return out


def _msd_cases(root: Path) -> tuple[list[dict], list[dict] | None]:
    js = root / "dataset.json"
    if not js.is_file():
        raise DataError(f"{js}: MSD dataset.json not found")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{js}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta.get("training"), list):
        raise DataError(f"{js}: no 'training' list")
    return _pairs(meta["training"], root, str(js)), None


def _btcv_cases(root: Path, val_count: int) -> tuple[list[dict], list[dict]]:
    img_dir = root / "RawData" / "Training" / "img"
    if not img_dir.is_dir():
        img_dir = root / "Training" / "img"
    if not img_dir.is_dir():
        raise DataError(f"{root}: BTCV layout expects RawData/Training/img/img00XX.nii.gz")
    cases = []
    for p in sorted(img_dir.glob("img*.nii*")):
        m = re.match(r"img(\d+)\.nii(\.gz)?$", p.name)
        if not m:
            continue
        lab = img_dir.parent / "label" / p.name.replace("img", "label", 1)
        if not lab.is_file():
            raise DataError(f"{p}: no label file {lab}")
        cases.append((int(m.group(1)), {"image": str(p), "label": str(lab)}))
    if not cases:
        raise DataError(f"{img_dir}: no img*.nii.gz files")
    cases.sort(key=lambda c: c[0])
    k = min(val_count, len(cases) - 1)
    return [c for _, c in cases[: len(cases) - k]], [c for _, c in cases[len(cases) - k:]]


_ACDC_FRAME = re.compile(r"(patient\d+)_frame\d+\.nii(\.gz)?$")


def _acdc_patients(folder: Path, need_labels: bool) -> list[dict]:
    cases = []
    for pdir in sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith("patient")):
        for img in sorted(pdir.glob("patient*_frame*.nii*")):
            m = _ACDC_FRAME.match(img.name)
            if not m:  # _gt labels and anything else
                continue
            gt = img.with_name(img.name.replace(".nii", "_gt.nii", 1))
            if not gt.is_file():
                if need_labels:
                    raise DataError(f"{img}: no label file {gt.name}")
                continue
            cases.append({"image": str(img), "label": str(gt), "group": m.group(1)})
    return cases


def _acdc_cases(root: Path) -> tuple[list[dict], list[dict] | None]:
    if not root.is_dir():
        raise DataError(f"{root}: ACDC folder not found")
    if (root / "training").is_dir():
        train = _acdc_patients(root / "training", need_labels=True)
        val = _acdc_patients(root / "testing", need_labels=False) if (root / "testing").is_dir() else []
        return train, val or None
    return _acdc_patients(root, need_labels=True), None


def build_mni_acdc(root: str | Path) -> Path:
    """The MNI GM/WM demo in the ACDC layout: training/patient001 = left hemisphere, testing/patient002 = right
    (one frame each, labels 1 grey / 2 white matter). Idempotent."""
    import shutil

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


def _datalist_cases(path: Path) -> tuple[list[dict], list[dict] | None]:
    if not path.is_file():
        raise DataError(f"{path}: datalist JSON not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    key = "training" if isinstance(meta.get("training"), list) else "labelled"
    if not isinstance(meta.get(key), list):
        raise DataError(f"{path}: needs a 'training' or 'labelled' list of {{image, label}}")
    base = path.parent
    train = _pairs(meta[key], base, str(path))
    val = _pairs(meta["validation"], base, str(path)) if isinstance(meta.get("validation"), list) else None
    return train, val


def build_mni_gm_wm(root: str | Path, spatial_dims: int = 3) -> tuple[list[dict], list[dict]]:
    """Write the MNI152 GM/WM demo (left / right hemisphere) under `root`; idempotent. No network.

    spatial_dims=2: axial slices of each hemisphere (every 3rd; validation slices interleave with training
    z positions but come from the other hemisphere)."""
    import nibabel as nib

    root = Path(root)
    names = ["mni_left_t1", "mni_left_seg", "mni_right_t1", "mni_right_seg"]
    files = {n: root / f"{n}.nii.gz" for n in names}
    if not all(f.is_file() for f in files.values()):
        from nilearn import datasets

        root.mkdir(parents=True, exist_ok=True)
        t1 = datasets.load_mni152_template(resolution=2)
        gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata())
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata())
        seg = np.zeros(gm.shape, np.uint8)
        seg[gm > 0.5] = 1
        seg[wm > 0.5] = 2
        img = np.asarray(t1.get_fdata(), np.float32)
        aff = t1.affine
        # world x = 0 (midline) -> voxel index
        mid = int(round(np.linalg.solve(aff, [0, 0, 0, 1])[0]))
        _write_halves(img, seg, aff, mid, {side: (files[f"mni_{side}_t1"], files[f"mni_{side}_seg"])
                                           for side in ("left", "right")})
    train = [{"image": str(files["mni_left_t1"]), "label": str(files["mni_left_seg"])}]
    val = [{"image": str(files["mni_right_t1"]), "label": str(files["mni_right_seg"])}]
    if spatial_dims == 2:
        return _axial_slices(train[0], root / "slices_left", 0), _axial_slices(val[0], root / "slices_right", 1)
    return train, val


def _write_halves(img: np.ndarray, seg: np.ndarray, aff: np.ndarray, mid: int, files: dict) -> None:
    """Split a volume at voxel x = mid into left / right NIfTI image + label files (affines keep world
    positions). files: {"left": (image path, label path), "right": (...)}."""
    import nibabel as nib

    for side, (sl, start) in {"left": (slice(0, mid), 0), "right": (slice(mid, img.shape[0]), mid)}.items():
        a = aff.copy()
        a[:3, 3] = aff[:3, :3] @ [start, 0, 0] + aff[:3, 3]
        nib.save(nib.Nifti1Image(img[sl], a), str(files[side][0]))
        nib.save(nib.Nifti1Image(seg[sl], a), str(files[side][1]))


def build_ct_head_halves(corpus: str | Path) -> tuple[list[dict], list[dict]]:
    """Demo: the demo corpus's head CT (`sslkit data demo` folder) split into a left half (train) and a right
    half (validation) under `corpus`/halves/; labels 1 bone, 2 soft tissue. Idempotent."""
    import nibabel as nib

    corpus = Path(corpus)
    src_img, src_lab = corpus / "ct_head.nii.gz", corpus / "ct_head_label.nii.gz"
    if not (src_img.is_file() and src_lab.is_file()):
        raise DataError(f"{corpus}: no ct_head.nii.gz / ct_head_label.nii.gz (build it with `sslkit data demo`)")
    out = corpus / "halves"
    files = {side: (out / f"ct_head_{side}.nii.gz", out / f"ct_head_{side}_label.nii.gz") for side in ("left", "right")}
    if not all(f.is_file() for pair in files.values() for f in pair):
        out.mkdir(parents=True, exist_ok=True)
        img, lab = nib.load(str(src_img)), nib.load(str(src_lab))
        arr = np.asarray(img.dataobj)
        _write_halves(arr, np.asarray(lab.dataobj).astype(np.uint8), img.affine, arr.shape[0] // 2, files)
    return ([{"image": str(files["left"][0]), "label": str(files["left"][1])}],
            [{"image": str(files["right"][0]), "label": str(files["right"][1])}])


def _axial_slices(case: dict, out: Path, offset: int, every: int = 3, lo: int = 18, hi: int = 82) -> list[dict]:
    """2D demo: every `every`-th axial slice z in [lo, hi) (+offset) as 2D NIfTI image / label pairs."""
    import nibabel as nib

    img, seg = nib.load(case["image"]), nib.load(case["label"])
    cases = []
    out.mkdir(parents=True, exist_ok=True)
    a2 = np.eye(3)
    a2[:2, :2] = img.affine[:2, :2]
    a2[:2, 2] = img.affine[:2, 3]
    for z in range(lo + offset, hi, every):
        fi, fl = out / f"img_z{z:03d}.nii.gz", out / f"seg_z{z:03d}.nii.gz"
        if not (fi.is_file() and fl.is_file()):
            aff = np.eye(4)
            aff[:2, :2], aff[:2, 3] = a2[:2, :2], a2[:2, 2]
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj[:, :, z], np.float32), aff), str(fi))
            nib.save(nib.Nifti1Image(np.asarray(seg.dataobj[:, :, z], np.uint8), aff), str(fl))
        cases.append({"image": str(fi), "label": str(fl)})
    return cases


def _seeded_split(cases: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded `fraction` of the groups (patients; a case without "group" is its own) in val."""
    groups = sorted({c.get("group", i) for i, c in enumerate(cases)}, key=str)
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_val = max(1, int(round(fraction * len(groups)))) if len(groups) > 1 else 0
    held = set(groups[:n_val])
    in_val = [c.get("group", i) in held for i, c in enumerate(cases)]
    return [c for c, v in zip(cases, in_val) if not v], [c for c, v in zip(cases, in_val) if v]


def volume_dims(dcfg) -> int:
    """Spatial dimensions of the scans (3 when a 2D model reads slices of volumes)."""
    return 3 if dcfg.slices else len(dcfg.roi)


def list_cases(dcfg) -> tuple[list[dict], list[dict]]:
    """(train cases, validation cases) per the layout, seeded split and `num_labelled` subset."""
    root = Path(dcfg.root).expanduser()
    if not dcfg.root:
        raise DataError("data.root: not set")
    if dcfg.layout == "msd":
        train, val = _msd_cases(root)
    elif dcfg.layout == "btcv":
        train, val = _btcv_cases(root, dcfg.btcv_val_count)
    elif dcfg.layout == "mni_gm_wm":
        train, val = build_mni_gm_wm(root, volume_dims(dcfg))
    elif dcfg.layout == "demo_ct_head":
        train, val = build_ct_head_halves(root)
    elif dcfg.layout == "acdc":
        if dcfg.demo_source == "mni_gm_wm":
            build_mni_acdc(root)
        train, val = _acdc_cases(root)
    else:
        train, val = _datalist_cases(root)
    if val is None:
        train, val = _seeded_split(train, dcfg.val_fraction, dcfg.split_seed)
    if dcfg.num_labelled:
        if dcfg.num_labelled > len(train):
            raise DataError(f"data.num_labelled: {dcfg.num_labelled} > {len(train)} training cases in {root}")
        rng = random.Random(dcfg.split_seed + 1)
        keep = sorted(rng.sample(range(len(train)), dcfg.num_labelled))
        train = [train[i] for i in keep]
    for c in train + val:
        for f in (c["image"] if isinstance(c["image"], list) else [c["image"]]) + [c["label"]]:
            if not Path(f).exists():
                raise DataError(f"{f}: file not found (listed by {root})")
    if not train:
        raise DataError(f"{root}: no training cases")
    return train, val


# --------------------------------------------------------------------------------------------- transforms


def _check_shapes_transform():
    from monai.transforms import MapTransform

    class CheckImageLabelShape(MapTransform):
        """Image and label must cover the same voxel grid (channel dim aside); else DataError naming both."""

        def __init__(self):
            super().__init__(["image", "label"])

        def __call__(self, data):
            img, lab = data["image"], data["label"]
            if tuple(img.shape[1:]) != tuple(lab.shape[1:]) or lab.shape[0] != 1:
                fi = getattr(img, "meta", {}).get("filename_or_obj", "image")
                fl = getattr(lab, "meta", {}).get("filename_or_obj", "label")
                raise DataError(f"label {fl} has shape {tuple(lab.shape[1:])} (channels {lab.shape[0]}) but image "
                                f"{fi} has shape {tuple(img.shape[1:])}")
            return data

    return CheckImageLabelShape()


def _load_and_geometry(dcfg, keys=("image", "label")) -> list:
    from monai.transforms import EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd, Spacingd

    sd = volume_dims(dcfg)
    modes = ["bilinear", "nearest"][: len(keys)]
    t = [LoadImaged(list(keys), image_only=True), EnsureChannelFirstd(list(keys))]
    if "label" in keys:
        t.append(_check_shapes_transform())
    t.append(EnsureTyped(list(keys), dtype=None, track_meta=True))
    t.append(Orientationd(list(keys), axcodes="RAS"[:sd] if sd == 3 else "RA", labels=None))
    if dcfg.spacing:
        t.append(Spacingd(list(keys), pixdim=list(dcfg.spacing), mode=modes))
    return t


def _intensity_and_crop(dcfg, keys=("image", "label")) -> list:
    from monai.transforms import CropForegroundd, NormalizeIntensityd, ScaleIntensityRanged

    crop = [CropForegroundd(list(keys), source_key="image", allow_smaller=True)] if dcfg.crop_foreground else []
    if dcfg.modality == "ct":
        lo, hi = dcfg.intensity_range
        return [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)] + crop
    return crop + [NormalizeIntensityd("image", nonzero=dcfg.mri_norm == "nonzero", channel_wise=True)]


def eval_transforms(dcfg, with_label: bool = True):
    """Deterministic pre-processing (load, orientation RAS, spacing, intensity, crop foreground)."""
    from monai.transforms import Compose

    keys = ("image", "label") if with_label else ("image",)
    return Compose(_load_and_geometry(dcfg, keys) + _intensity_and_crop(dcfg, keys))


def random_augmentations(dcfg, spatial_dims: int) -> list:
    """Flips per axis, rot90, intensity scale / shift, each with its recipe probability (skipped at 0)."""
    from monai.transforms import RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "label"]
    t = []
    if dcfg.flip_prob > 0:
        t += [RandFlipd(keys, prob=dcfg.flip_prob, spatial_axis=a) for a in range(spatial_dims)]
    if dcfg.rot90_prob > 0:
        t.append(RandRotate90d(keys, prob=dcfg.rot90_prob, max_k=3))
    if dcfg.scale_intensity_prob > 0:
        t.append(RandScaleIntensityd("image", factors=0.1, prob=dcfg.scale_intensity_prob))
    if dcfg.shift_intensity_prob > 0:
        t.append(RandShiftIntensityd("image", offsets=0.1, prob=dcfg.shift_intensity_prob))
    return t


def train_transforms(dcfg):
    """Eval pre-processing + random crops by label (pos:neg) + flips / rot90 / intensity jitter."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "label"]
    t = list(eval_transforms(dcfg).transforms)
    t += [SpatialPadd(keys, spatial_size=list(dcfg.roi)),
          RandCropByPosNegLabeld(keys, label_key="label", spatial_size=list(dcfg.roi), pos=dcfg.pos, neg=dcfg.neg,
                                 num_samples=dcfg.samples_per_volume, image_key="image", image_threshold=0)]
    return Compose(t + random_augmentations(dcfg, len(dcfg.roi)))


def make_datasets(dcfg):
    """(train dataset, val dataset, train cases, val cases); both MONAI CacheDatasets (deterministic part cached)."""
    from monai.data import CacheDataset

    train, val = list_cases(dcfg)
    kw = dict(cache_rate=dcfg.cache_rate, num_workers=0, progress=False)
    if dcfg.slices:
        from sslkit.downstream.slices import SliceDataset

        # copy_cache=False: a slice item reads its volume without deep-copying the whole volume each time
        return (SliceDataset(CacheDataset(train, eval_transforms(dcfg), copy_cache=False, **kw), dcfg),
                CacheDataset(val, eval_transforms(dcfg), **kw), train, val)
    return (CacheDataset(train, train_transforms(dcfg), **kw), CacheDataset(val, eval_transforms(dcfg), **kw),
            train, val)
