"""PUNet pretraining in its three modes (SPECS.md "PUNet"): CPA alone, prompt segmentation alone, and the joint
total focal segmentation + 0.01 x CPA. Covers the labelled crops they need (PretrainDataset with data.with_labels on
the demo MNI152 T1 + grey / white matter map), what happens to bad labelled entries, and runs of the joint and
segmentation-only modes through `sslkit pretrain`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, cli
from sslkit.config import DataConfig, load_config
from sslkit.data import PretrainDataset, load_datalist
from sslkit.errors import ConfigError

RECIPE = REPO / "pretrain_configs" / "demo_punet_joint.yaml"
MNI_KEY = "labelled_mni_gmwm"


@pytest.fixture(scope="module")
def mni(demo_dir) -> dict:
    """The demo's MNI152 T1 + grey / white matter entry (0 background, 1 grey, 2 white matter)."""
    items = load_datalist(demo_dir / "datalist.json", MNI_KEY)
    if not items:
        pytest.skip("the demo corpus has no MNI152 pair (nilearn missing when it was built)")
    return items[0]


def _cfg(**kw) -> DataConfig:
    base = dict(modality="mri", roi=[32, 32, 32], spacing=[2.0, 2.0, 2.0], crops_per_volume=4, with_labels=True)
    return DataConfig(**{**base, **kw})


def _find_window(volume: np.ndarray, crop: np.ndarray) -> tuple[int, ...]:
    """Where `crop` (1, *roi) was cut from `volume` (1, X, Y, Z), found by search (2-D crops: one axial slice):
    anchor on the crop voxel whose value is rarest in the volume, then check each candidate start in full."""
    v, c = volume[0], crop[0] if crop.ndim == 4 else crop[0][..., None]   # (X, Y, Z), (rx, ry, rz)
    values, counts = np.unique(v, return_counts=True)
    anchor = np.unravel_index(np.argmin(counts[np.searchsorted(values, c)]), c.shape)
    for hit in np.argwhere(v == c[anchor]):
        start = hit - np.asarray(anchor)
        if (start >= 0).all() and (start + c.shape <= v.shape).all():
            if np.array_equal(v[tuple(slice(s, s + r) for s, r in zip(start, c.shape))], c):
                return tuple(int(s) for s in start)
    raise AssertionError("the crop is not a window of the cached volume")


# ------------------------------------------------------------------------------------------ labelled crops


def test_label_crops_follow_the_image_window(mni, tmp_path):
    ds = PretrainDataset([mni], _cfg(), tmp_path / "cache", seed=5).prepare(progress=False)
    image, label = ds.stored_volume(0), ds.stored_label(0)  # as the dataset reads them from its store
    assert label.shape == image.shape and label.dtype == np.int64
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    # the map lies on the image: in a T1, white matter is brighter than grey matter, grey than the rest
    means = [float(image[label == c].mean()) for c in (0, 1, 2)]
    assert means[0] < means[1] < means[2], means

    for index, epoch in [(0, 0), (3, 1), (2, 7)]:
        item = ds[(index, epoch)]
        assert item["label"].shape == (1, 32, 32, 32) and item["label"].dtype == torch.int64
        a, b, c = _find_window(image, item["image"].numpy())
        assert torch.equal(item["label"], torch.from_numpy(label[:, a:a + 32, b:b + 32, c:c + 32].astype(np.int64)))
        assert torch.equal(item["label"], ds[(index, epoch)]["label"])                  # deterministic
    fresh = PretrainDataset([mni], _cfg(), tmp_path / "cache", seed=5).prepare(progress=False)
    assert fresh.n_preprocessed == 0 and torch.equal(fresh[(3, 1)]["label"], ds[(3, 1)]["label"])
    assert not torch.equal(ds[(3, 1)]["label"], ds[(3, 2)]["label"])                  # another epoch, another crop

    # a crop larger than the volume: zero-padded image, background label, same window
    big = PretrainDataset([mni], _cfg(roi=[96, 96, 96]), tmp_path / "cache", seed=0).prepare(progress=False)
    item, (_, x, y, z) = big[(0, 0)], image.shape
    assert torch.equal(item["label"][:, :x, :y, :z], torch.from_numpy(label.astype(np.int64)))
    assert item["label"].sum() == int(label.sum()) and (item["image"][:, x:] == 0).all()

    # 2-D: the label is cut from the same axial slice and window
    ds2 = PretrainDataset([mni], _cfg(roi=[48, 48], spacing=[2.0, 2.0, -1.0]), tmp_path / "cache",
                          seed=1, spatial_dims=2).prepare(progress=False)
    img2, lab2 = ds2.stored_volume(0), ds2.stored_label(0)
    item = ds2[(1, 3)]
    assert item["label"].shape == (1, 48, 48)
    a, b, z = _find_window(img2, item["image"].numpy())
    assert torch.equal(item["label"][0], torch.from_numpy(lab2[0, a:a + 48, b:b + 48, z].astype(np.int64)))


def test_an_edited_label_is_cached_again(mni, tmp_path):
    lab = nib.load(mni["label"])
    copy = tmp_path / "gmwm.nii"
    nib.save(lab, str(copy))
    entry = {**mni, "label": str(copy)}
    first = PretrainDataset([entry], _cfg(), tmp_path / "cache", seed=0).prepare(progress=False)
    assert first.n_preprocessed == 1
    edited = np.asarray(lab.dataobj).copy()
    edited[edited == 2] = 1                                                          # white matter -> grey
    nib.save(nib.Nifti1Image(edited, lab.affine, lab.header), str(copy))
    again = PretrainDataset([entry], _cfg(), tmp_path / "cache", seed=0).prepare(progress=False)
    assert again.n_preprocessed == 1 and again.volumes[0]["key"] != first.volumes[0]["key"]
    assert set(np.unique(again.stored_label(0)).tolist()) == {0, 1}


def test_bad_labelled_entries_are_skipped_and_recorded(mni, tmp_path):
    """A missing label, a corrupt one, one on another grid and an entry without "label": each is recorded in
    skipped.jsonl with a line naming the culprit, and the dataset goes on with the good entry."""
    corrupt, small = tmp_path / "corrupt.nii.gz", tmp_path / "small.nii.gz"
    corrupt.write_bytes(b"not a nifti file")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), str(small))
    image = mni["image"]
    entries = [{"image": image, "label": str(tmp_path / "missing.nii.gz")}, {"image": image, "label": str(corrupt)},
               {"image": image, "label": str(small)}, {"image": image}, mni]
    log = tmp_path / "skipped.jsonl"
    ds = PretrainDataset(entries, _cfg(), tmp_path / "cache", seed=0, skipped_log=log).prepare(progress=False)
    assert len(ds.volumes) == 1 and ds.volumes[0]["label"] == mni["label"]
    assert ds[(0, 0)]["label"].shape == (1, 32, 32, 32)
    rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    assert [r["path"] for r in rows] == [image] * 4
    assert [r.get("label") for r in rows] == [entries[0]["label"], str(corrupt), str(small), None]
    missing, bad, other_grid, unlabelled = (r["error"] for r in rows)
    assert "missing.nii.gz" in missing and "not found" in missing
    assert "corrupt.nii.gz" in bad
    assert "small.nii.gz" in other_grid and "mri_mni152_t1" in other_grid and "shape" in other_grid
    assert "no 'label'" in unlabelled and "with_labels" in unlabelled


# ------------------------------------------------------------------------------------------ recipes and runs


def test_joint_recipe_and_label_check():
    cfg = load_config(RECIPE)
    assert cfg.data.with_labels and cfg.data.datalist_key == "labelled_ct_head"
    assert cfg.model.args == {"channels": [16, 16, 32, 32, 64], "num_heads": 4, "window_size": [4, 4, 4],
                              "num_classes": 3, "prompt_tokens": 16, "default_classes": [0, 1]}
    assert [(o["name"], o["weight"]) for o in cfg.objectives] == [("prompt_segmentation", 1.0), ("cpa", 0.01)]
    full = load_config(REPO / "pretrain_configs" / "punet_joint.yaml")
    assert full.data.with_labels and [o["name"] for o in full.objectives] == ["prompt_segmentation", "cpa"]
    from sslkit.engine.trainer import check_buildable

    with pytest.raises(ConfigError, match="data.with_labels"):  # the objective's own check, before any scan is read
        check_buildable(load_config(RECIPE, ["data.with_labels=false"]), torch.device("cpu"))


def _run(tmp_path: Path, name: str, datalist: Path, cache: Path, steps: int, *sets: str) -> list[dict]:
    run = tmp_path / name
    res = cli("pretrain", "--cfg", str(RECIPE), "--run-dir", str(run), "--no-progress",
                  "--set", f"data.datalist={datalist}", "--set", f"data.cache_dir={cache}",
                  "--set", f"train.max_steps={steps}", "--set", "train.ckpt_every=0",
                  "--set", f"data.datalist_key={MNI_KEY}", "--set", "data.modality=mri", *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_joint_and_segmentation_only_runs(mni, scan_cache, tmp_path):
    """The recipe through the CLI: the logged total is focal + 0.01 x CPA and the focal loss falls; an entry with a
    missing label is recorded and the run goes on. Then the segmentation-only mode."""
    datalist = tmp_path / "list.json"
    broken = {**mni, "label": str(tmp_path / "gone.nii.gz")}
    datalist.write_text(json.dumps({MNI_KEY: [mni, broken]}), encoding="utf-8")
    rows = _run(tmp_path, "joint", datalist, scan_cache, 16)
    assert len(rows) == 16
    for r in rows:
        total = r["loss/prompt_segmentation"] + 0.01 * r["loss/cpa"]
        assert r["loss"] == pytest.approx(total, rel=1e-5) and np.isfinite(r["cpa/cpa"])
    focal = [r["prompt_segmentation/seg_focal"] for r in rows]
    print("focal:", np.round(focal, 4))
    assert np.mean(focal[-3:]) < np.mean(focal[:3])
    skipped = [json.loads(x) for x in (tmp_path / "joint" / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s.get("label") for s in skipped] == [broken["label"]]

    rows = _run(tmp_path, "seg_only", datalist, scan_cache, 4,
                "--set", "objectives=[{name: prompt_segmentation, classes: [0, 1], unknown: background}]")
    assert len(rows) == 4 and all(np.isfinite(r["prompt_segmentation/seg_focal"]) for r in rows)
    assert not any(k.startswith("loss/cpa") for k in rows[-1])
