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
  mni_gm_wm  demo: `root` is the demo corpus (or any folder; nilearn's bundled template is written there when
             missing): its 1 mm MNI152 T1 split into a left and a right hemisphere with grey matter (1) / white
             matter (2) labels. Train = left hemisphere, validation = right hemisphere (voxels never seen in
             training; the brain is nearly symmetric, so this measures fitting, not cross-subject generalisation).
`data.num_labelled` > 0 keeps the first n cases of a seeded order of the training cases, so the subsets of one
split_seed are nested (the 3-case subset holds the 1-case subset). Validation is unchanged.

Preprocessing is `sslkit.data.preprocess` (the one stack pretraining uses); this module adds only the labelled
random crops and augmentations.
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from sslkit.data.datalist import read_datalist_json, resolve_entries
from sslkit.downstream.config import writes_under_root
from sslkit.errors import DataError


# ------------------------------------------------------------------------------------------------ layouts


def _pairs(items, base: Path, where: str) -> list[dict]:
    """{image (path or one per channel), label} of labelled entries, paths absolute against `base`."""
    return [{"image": e["image"], "label": e["label"]} for e in resolve_entries(items, base, where, need_label=True)]


def _msd_cases(root: Path) -> tuple[list[dict], list[dict] | None]:
    js = root / "dataset.json"
    meta = read_datalist_json(js, "MSD dataset.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
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


def _datalist_cases(path: Path) -> tuple[list[dict], list[dict] | None]:
    meta = read_datalist_json(path, "datalist JSON")
    meta = meta if isinstance(meta, dict) else {}
    key = "training" if isinstance(meta.get("training"), list) else "labelled"
    if not isinstance(meta.get(key), list):
        raise DataError(f"{path}: needs a 'training' or 'labelled' list of {{image, label}}")
    base = path.parent
    train = _pairs(meta[key], base, str(path))
    val = _pairs(meta["validation"], base, str(path)) if isinstance(meta.get("validation"), list) else None
    return train, val


def _seeded_split(cases: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded `fraction` of the groups (patients; a case without "group" is its own) in val."""
    groups = sorted({c.get("group", i) for i, c in enumerate(cases)}, key=str)
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_val = max(1, int(round(fraction * len(groups)))) if len(groups) > 1 else 0
    held = set(groups[:n_val])
    in_val = [c.get("group", i) in held for i, c in enumerate(cases)]
    return [c for c, v in zip(cases, in_val) if not v], [c for c, v in zip(cases, in_val) if v]


def labelled_subset(train: list[dict], n: int, seed: int, where: str = "") -> list[dict]:
    """The first n training cases of a seeded order (kept in their listed order): nested across n for one seed."""
    if n > len(train):
        raise DataError(f"data.num_labelled: {n} is more than the {len(train)} training cases of {where}")
    if n == len(train):
        print(f"sslkit: warning: data.num_labelled: {n} is every training case of {where} (0 means all, too)",
              file=sys.stderr, flush=True)
        return list(train)
    order = list(range(len(train)))
    random.Random(seed + 1).shuffle(order)
    return [train[i] for i in sorted(order[:n])]


def volume_dims(dcfg) -> int:
    """Spatial dimensions of the scans (3 when a 2D model reads slices of volumes)."""
    return 3 if dcfg.slices else len(dcfg.roi)


def list_cases(dcfg) -> tuple[list[dict], list[dict]]:
    """(train cases, validation cases) per the layout, seeded split and `num_labelled` subset."""
    root = Path(dcfg.root).expanduser()
    if not dcfg.root:
        raise DataError("data.root: not set")
    if not root.is_absolute() and writes_under_root({"layout": dcfg.layout, "demo_source": dcfg.demo_source}):
        raise DataError(f"data.root: '{dcfg.root}' is a relative path and layout {dcfg.layout} writes its demo files "
                        "under it; give an absolute path (in a recipe file a relative root is the recipe's folder's)")
    if dcfg.layout == "msd":
        train, val = _msd_cases(root)
    elif dcfg.layout == "btcv":
        train, val = _btcv_cases(root, dcfg.btcv_val_count)
    elif dcfg.layout == "mni_gm_wm":
        from sslkit.data.demo import build_mni_gm_wm

        train, val = build_mni_gm_wm(root, volume_dims(dcfg))
    elif dcfg.layout == "demo_ct_head":
        from sslkit.data.demo import build_ct_head_halves

        train, val = build_ct_head_halves(root)
    elif dcfg.layout == "acdc":
        if dcfg.demo_source == "mni_gm_wm":
            from sslkit.data.demo import build_mni_acdc

            build_mni_acdc(root)
        train, val = _acdc_cases(root)
    else:
        train, val = _datalist_cases(root)
    if val is None:
        train, val = _seeded_split(train, dcfg.val_fraction, dcfg.split_seed)
    if dcfg.num_labelled:
        train = labelled_subset(train, dcfg.num_labelled, dcfg.split_seed, str(root))
    for c in train + val:
        for f in (c["image"] if isinstance(c["image"], list) else [c["image"]]) + [c["label"]]:
            if not Path(f).exists():
                raise DataError(f"{f}: file not found (listed by {root})")
    if not train:
        raise DataError(f"{root}: no training cases")
    return train, val


# --------------------------------------------------------------------------------------------- crops


def eval_transforms(dcfg, with_label: bool = True):
    """The plan's deterministic preprocessing (sslkit.data.preprocess) of {image[, label]} cases."""
    from sslkit.data.preprocess import preprocess_transforms

    return preprocess_transforms(dcfg, dcfg.modality, "label" if with_label else None, volume_dims(dcfg))


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


def crop_transforms(dcfg):
    """The random part of a 3-D (or 2-D image) training item: pad to roi, crops by label (pos:neg),
    flips / rot90 / intensity jitter. Input: one preprocessed case."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "label"]
    t = [SpatialPadd(keys, spatial_size=list(dcfg.roi)),
         RandCropByPosNegLabeld(keys, label_key="label", spatial_size=list(dcfg.roi), pos=dcfg.pos, neg=dcfg.neg,
                                num_samples=dcfg.samples_per_volume, image_key="image", image_threshold=0)]
    return Compose(t + random_augmentations(dcfg, len(dcfg.roi)))


def slice_transforms(dcfg):
    """The random 2-D part for slices of volumes: pad / random crop to the 2-D roi, then the augmentations."""
    from monai.transforms import Compose, RandSpatialCropd, SpatialPadd

    keys = ["image", "label"]
    t = [SpatialPadd(keys, spatial_size=list(dcfg.roi)),
         RandSpatialCropd(keys, roi_size=list(dcfg.roi), random_size=False)]
    return Compose(t + random_augmentations(dcfg, 2))


class Augmented:
    """Random crops / augmentations of cached preprocessed cases: item i = transform(case i). `transform` is
    re-seeded per epoch by the fine-tuning loop (set_random_state)."""

    def __init__(self, cases, transform):
        self.cases = cases
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        return self.transform(self.cases[i])


@dataclass
class Datasets:
    train: object            # items: {"image": (C, *roi), "label": (1, *roi)} (lists of samples_per_volume in 3-D)
    val: object              # preprocessed validation cases
    train_cases: list[dict]
    val_cases: list[dict]
    preprocessed_train: object  # the cached preprocessed training cases (for the input statistics)


def make_datasets(dcfg) -> Datasets:
    """Training and validation data of a recipe: every case preprocessed once by the plan's stack and cached in
    memory (MONAI CacheDataset), training items cut from the cache by the random crops."""
    from monai.data import CacheDataset

    from sslkit.downstream.slices import SliceDataset

    train, val = list_cases(dcfg)
    kw = dict(cache_rate=dcfg.cache_rate, num_workers=0, progress=False)
    val_ds = CacheDataset(val, eval_transforms(dcfg), **kw)
    # slices: an item reads its cached volume without deep-copying it (only the slice is cloned); 3-D crops start
    # from a copy of the case, as MONAI's CacheDataset does
    cases = CacheDataset(train, eval_transforms(dcfg), copy_cache=not dcfg.slices, **kw)
    if dcfg.slices:
        items = SliceDataset(cases, dcfg.slice_channels, slice_transforms(dcfg))
    else:
        items = Augmented(cases, crop_transforms(dcfg))
    return Datasets(items, val_ds, train, val, cases)
