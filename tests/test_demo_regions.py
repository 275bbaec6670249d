"""The brain regions demo (`sslkit.data.demo.build_brain_regions`): AAL regions merged into 6 structures on Colin27,
carried onto the MNI152 grid, and the datalists of the headline task and of the slab study. Inputs are the demo
corpus's scans (read only, linked into a temporary folder); everything is written under that folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslkit.data.demo import (
    AAL_NAMES,
    COLIN27_BRAIN,
    REGION_NAMES,
    aal_structure,
    build_brain_regions,
)
from sslkit.errors import DataError

SCANS = ("mri_colin27_t1.nii.gz", "mri_colin27_aal.nii.gz", "mri_mni152_t1.nii.gz", "mri_mni152_gmwm.nii.gz")
# Measured on the demo corpus: 94.9 % of the carried labelled voxels lie inside the MNI152 brain, 88.5 % inside
# its grey + white matter; Dice of the carried labelled mask with the brain 0.947, with grey + white matter 0.922.
MIN_INSIDE_BRAIN, MIN_DICE_GM_WM = 0.93, 0.90


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def regions_root(demo_dir, tmp_path_factory) -> Path:
    if not (COLIN27_BRAIN.is_file() and AAL_NAMES.is_file() and (demo_dir / "mri_mni152_t1.nii.gz").is_file()):
        pytest.skip("needs mricron-data's ch2bet / aal.nii.txt and the corpus's MNI152 T1 (nilearn)")
    root = tmp_path_factory.mktemp("regions-demo")
    for name in SCANS:
        (root / name).symlink_to(demo_dir / name)
    build_brain_regions(root)
    return root


def _aal_codes() -> dict[int, int]:
    """AAL voxel value -> atlas code, from MRIcron's list ("1 Precentral_L 2001")."""
    rows = [line.split() for line in AAL_NAMES.read_text(encoding="utf-8").splitlines()]
    return {int(r[0]): int(r[2]) for r in rows if len(r) == 3}


def test_aal_codes_merge_into_the_named_lobes():
    by_name = dict(zip(REGION_NAMES, range(1, len(REGION_NAMES) + 1)))
    expected = {2001: "frontal", 2601: "frontal", 4001: "frontal", 4012: "frontal",     # precentral, medial
                4021: "parietal", 6001: "parietal", 6302: "parietal",                  # post. cingulum, postcentral
                3001: "temporal", 4101: "temporal", 4202: "temporal", 8212: "temporal",  # insula, hippocampus
                5001: "occipital", 5402: "occipital", 9001: "cerebellum", 9170: "cerebellum",
                7001: "deep_grey", 7102: "deep_grey"}
    for code, name in expected.items():
        assert aal_structure(code) == by_name[name], code
    with pytest.raises(DataError, match="1234"):
        aal_structure(1234)


def test_colin27_regions_merge_aal_and_fill_the_brain(regions_root):
    out = regions_root / "regions"
    regions, aff = _load(out / "mri_colin27_regions.nii.gz")
    brain, brain_aff = _load(out / "mri_colin27_brain.nii.gz")
    aal, aal_aff = _load(regions_root / "mri_colin27_aal.nii.gz")
    t1, _ = _load(regions_root / "mri_colin27_t1.nii.gz")
    assert np.allclose(aff, aal_aff) and np.allclose(brain_aff, aal_aff) and regions.shape == aal.shape
    assert set(np.unique(regions)) == set(range(len(REGION_NAMES) + 1))
    codes = _aal_codes()
    assert len(codes) == 116
    structure_of_value = np.zeros(256, np.uint8)
    for value, code in codes.items():
        structure_of_value[value] = aal_structure(code)
    in_atlas = aal > 0
    assert (regions[in_atlas] == structure_of_value[aal[in_atlas]]).all()  # atlas voxels keep their structure
    labelled = regions > 0
    assert labelled[aal > 0].all()
    # the filled map covers the whole brain (~1.88 M voxels at 1 mm), well beyond the grey-matter atlas (1.48 M)
    assert 1.2 * (aal > 0).sum() < labelled.sum() < 2.0e6
    # skull stripped: the training image is the T1 inside the labelled brain and 0 outside
    assert (brain[~labelled] == 0).all() and (brain[labelled] == t1[labelled]).all()


def test_mni152_regions_are_the_world_carried_colin27_map(regions_root):
    out = regions_root / "regions"
    colin, colin_aff = _load(out / "mri_colin27_regions.nii.gz")
    mni_regions, mni_aff = _load(out / "mri_mni152_regions.nii.gz")
    mni_t1, t1_aff = _load(regions_root / "mri_mni152_t1.nii.gz")
    gm_wm, _ = _load(regions_root / "mri_mni152_gmwm.nii.gz")
    assert np.allclose(mni_aff, t1_aff) and mni_regions.shape == mni_t1.shape
    # hand-written nearest neighbour in world coordinates (both affines are diagonal: one index map per axis)
    for aff in (colin_aff, mni_aff):
        assert np.count_nonzero(aff[:3, :3] - np.diag(np.diag(aff[:3, :3]))) == 0
    axes = []
    for a in range(3):
        world = mni_aff[a, a] * np.arange(mni_t1.shape[a]) + mni_aff[a, 3]
        axes.append(np.rint((world - colin_aff[a, 3]) / colin_aff[a, a]).astype(int))
    inside = [(ix >= 0) & (ix < n) for ix, n in zip(axes, colin.shape)]
    carried = np.zeros(mni_t1.shape, np.uint8)
    carried[np.ix_(*inside)] = colin[np.ix_(*[ix[ok] for ix, ok in zip(axes, inside)])]
    brain = mni_t1 > 0
    kept = brain & (carried > 0)
    assert (mni_regions[kept] == carried[kept]).all()
    assert ((mni_regions > 0) == brain).all()          # exactly the MNI152 brain, gaps grown by nearest label
    assert set(np.unique(mni_regions)) == set(range(len(REGION_NAMES) + 1))
    lab = carried > 0
    fit = {"inside_brain": (lab & brain).sum() / lab.sum(), "inside_gm_wm": (lab & (gm_wm > 0)).sum() / lab.sum(),
           "dice_brain": 2 * (lab & brain).sum() / (lab.sum() + brain.sum()),
           "dice_gm_wm": 2 * (lab & (gm_wm > 0)).sum() / (lab.sum() + (gm_wm > 0).sum())}
    assert fit["inside_brain"] > MIN_INSIDE_BRAIN and fit["dice_gm_wm"] > MIN_DICE_GM_WM
    stored = json.loads((out / "datalist.json").read_text(encoding="utf-8"))["carried_fit"]
    assert stored == pytest.approx(fit, abs=1e-9)


def test_datalists_feed_the_downstream_layout(regions_root):
    from sslkit.downstream.config import DownstreamDataConfig
    from sslkit.downstream.data import list_cases

    out = regions_root / "regions"
    doc = json.loads((out / "datalist.json").read_text(encoding="utf-8"))
    assert doc["labels"] == {"0": "background", **{str(i + 1): n for i, n in enumerate(REGION_NAMES)}}
    assert [e["modality"] for e in doc["training"] + doc["validation"]] == ["mri", "mri"]
    train, val = list_cases(DownstreamDataConfig(layout="datalist", root=str(out / "datalist.json")))
    assert [Path(c["image"]).name for c in train] == ["mri_colin27_brain.nii.gz"]
    assert [(Path(c["image"]).name, Path(c["label"]).name) for c in val] == \
        [("mri_mni152_t1.nii.gz", "mri_mni152_regions.nii.gz")]

    slabs = json.loads((out / "slabs" / "datalist.json").read_text(encoding="utf-8"))
    train, val = list_cases(DownstreamDataConfig(layout="datalist", root=str(out / "slabs" / "datalist.json")))
    assert len(train) == 4 and [Path(c["label"]).name for c in val] == ["mri_mni152_regions.nii.gz"]
    assert all(e["modality"] == "mri" for e in slabs["training"] + slabs["validation"])
    colin, colin_aff = _load(out / "mri_colin27_regions.nii.gz")
    pieces, x_world = [], []
    for case in train:
        lab, aff = _load(Path(case["label"]))
        img, img_aff = _load(Path(case["image"]))
        assert np.allclose(aff, img_aff) and img.shape == lab.shape
        assert len(set(np.unique(lab)) - {0}) >= 5       # each slab holds most structures (lateral: no deep grey)
        pieces.append(lab)
        x_world.append(aff[0, 3])
    xs = np.nonzero(colin.any(axis=(1, 2)))[0]
    # the slabs tile the labelled x extent in order and keep their world position
    assert np.array_equal(np.concatenate(pieces), colin[xs.min():xs.max() + 1])
    assert x_world[0] == pytest.approx(colin_aff[0, 3] + xs.min() * colin_aff[0, 0])


def test_build_is_idempotent_and_names_a_missing_scan(regions_root, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (regions_root / "regions").glob("*.nii.gz")}
    build_brain_regions(regions_root)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    (tmp_path / "mri_colin27_t1.nii.gz").symlink_to(regions_root / "mri_colin27_t1.nii.gz")
    with pytest.raises(DataError, match="mri_colin27_aal.nii.gz"):
        build_brain_regions(tmp_path)
