"""sslkit.data: readers, datalists, cached pretraining dataset, demo corpus (real scans)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sslkit.config import DataConfig
from sslkit.data import (
    PretrainDataset,
    build_demo_corpus,
    index_folder,
    is_dicom_series_dir,
    load_datalist,
    load_scan,
    write_datalist,
)
from sslkit.errors import DataError

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def demo_items(demo_dir) -> list[dict]:
    return load_datalist(demo_dir / "datalist.json")


@pytest.fixture(scope="session")
def small_ct(demo_dir) -> sitk.Image:
    """A real 40 x 32 x 12 block of the demo head CT as a SimpleITK image with its geometry (LPS world)."""
    img = sitk.ReadImage(str(demo_dir / "ct_head.nii.gz"))
    return sitk.Cast(img[100:140, 110:142, 50:62], sitk.sitkInt16)


def _cfg(**kw) -> DataConfig:
    base = dict(modality="ct", roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0], crops_per_volume=2)
    base.update(kw)
    return DataConfig(**base)


def _write_dicom_series(img: sitk.Image, folder: Path) -> Path:
    """Write a 3-D int16 image as one DICOM file per axial slice with position/orientation tags."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    orient = "\\".join(str(v) for v in (direction[0], direction[3], direction[6],
                                        direction[1], direction[4], direction[7]))
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {
            "0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".1",
            "0020|0037": orient, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": str(img.GetSpacing()[2]),
            "0008|0018": f"{series_uid}.2.{k + 1}",
        }
        for t, v in tags.items():
            sl.SetMetaData(t, v)
        writer.SetFileName(str(folder / f"im{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


# ------------------------------------------------------------------------------------------ demo corpus


def test_demo_corpus_contents(demo_dir, demo_items):
    assert build_demo_corpus(demo_dir) == demo_dir.resolve() / "datalist.json"  # idempotent
    names = {Path(e["image"]).name: e for e in demo_items}
    assert {"ct_head.nii.gz", "mri_colin27_t1.nii.gz"} <= set(names)
    assert names["ct_head.nii.gz"]["modality"] == "ct"

    ct = load_scan(names["ct_head.nii.gz"]["image"])
    assert ct.shape == (256, 256, 108)                       # 108 axial slices along z
    assert ct.spacing == pytest.approx((0.957, 0.957, 1.5), abs=1e-3)
    assert nib.aff2axcodes(ct.affine) == ("L", "A", "S")
    assert ct.array.min() == -1024 and ct.array.max() > 2000  # HU

    labelled = {Path(e["image"]).name: e for e in load_datalist(demo_dir / "datalist.json", "labelled")}
    lab = load_scan(labelled["ct_head.nii.gz"]["label"])
    assert lab.shape == ct.shape and np.allclose(lab.affine, ct.affine)
    assert set(np.unique(lab.array).tolist()) == {0.0, 1.0, 2.0}
    bone, tissue = ct.array[lab.array == 1].mean(), ct.array[lab.array == 2].mean()
    assert bone > 400 and -200 < tissue < 200 and bone > tissue

    colin = load_scan(names["mri_colin27_t1.nii.gz"]["image"])
    assert colin.shape == (181, 217, 181) and colin.spacing == pytest.approx((1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------ readers


def test_readers_agree_across_formats(tmp_path, small_ct):
    paths = {}
    for ext in ("nii.gz", "nrrd", "mha"):
        paths[ext] = tmp_path / f"block.{ext}"
        sitk.WriteImage(small_ct, str(paths[ext]))
    paths["dicom"] = _write_dicom_series(small_ct, tmp_path / "series")
    assert is_dicom_series_dir(paths["dicom"]) and not is_dicom_series_dir(tmp_path)

    ref = load_scan(paths["nii.gz"])
    assert ref.shape == (40, 32, 12) and ref.array.dtype == np.float32
    assert ref.spacing == pytest.approx((0.957, 0.957, 1.5), abs=1e-3)
    ref_arr, ref_aff = _canonical(ref)
    for name, p in paths.items():
        s = load_scan(p)
        assert s.shape == ref.shape, name
        # DICOM has no left-handed frames, so the series' index order may differ; compare in RAS world order.
        arr, aff = _canonical(s)
        np.testing.assert_array_equal(arr, ref_arr, err_msg=name)
        np.testing.assert_allclose(aff, ref_aff, atol=1e-3, err_msg=name)


def _canonical(scan) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine reordered to the closest RAS+ index order."""
    img = nib.as_closest_canonical(nib.Nifti1Image(scan.array, scan.affine))
    return np.asarray(img.dataobj), img.affine


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path, words: str) -> None:
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg
    assert any(w in msg for w in words.split("|")), msg


def test_bad_inputs_raise_data_error(tmp_path, small_ct):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError) as e:
        load_scan(missing)
    _assert_one_line_naming(e, missing, "no such file")

    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(small_ct, str(good))
    truncated = tmp_path / "truncated.nii.gz"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        load_scan(truncated)
    _assert_one_line_naming(e, truncated, "truncated|corrupt")

    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti at all" * 3)
    with pytest.raises(DataError) as e:
        load_scan(garbage)
    _assert_one_line_naming(e, garbage, "truncated|corrupt")

    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), str(flat))
    with pytest.raises(DataError) as e:
        load_scan(flat)
    _assert_one_line_naming(e, flat, "2-D")
    assert load_scan(flat, require_3d=False).shape == (20, 20)
    single = tmp_path / "single_slice.mha"
    sitk.WriteImage(small_ct[:, :, 3:4], str(single))
    with pytest.raises(DataError) as e:
        load_scan(single)
    _assert_one_line_naming(e, single, "2-D")

    nan = tmp_path / "nan.nii.gz"
    arr = np.ones((8, 8, 8), np.float32)
    arr[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    with pytest.raises(DataError) as e:
        load_scan(nan)
    _assert_one_line_naming(e, nan, "NaN")


# ------------------------------------------------------------------------------------------ datalists


def test_datalist_roundtrip_and_errors(tmp_path, small_ct):
    (tmp_path / "imgs").mkdir()
    img = tmp_path / "imgs" / "a.nii.gz"
    sitk.WriteImage(small_ct, str(img))
    dl = write_datalist([{"image": str(img), "label": str(img)}], tmp_path / "lists" / "dl.json",
                        base_dir=tmp_path / "lists")
    raw = json.loads(dl.read_text(encoding="utf-8"))
    assert raw["training"][0]["image"] == "../imgs/a.nii.gz"          # relative on disk
    items = load_datalist(dl, validate=True)
    assert items == [{"image": str(img.resolve()), "label": str(img.resolve())}]

    with pytest.raises(DataError) as e:
        load_datalist(tmp_path / "absent.json")
    assert "absent.json" in str(e.value)
    with pytest.raises(DataError) as e:
        load_datalist(dl, key="validation")
    assert "validation" in str(e.value) and "training" in str(e.value)

    bad = write_datalist([{"image": str(img)}, {"image": str(tmp_path / "gone.nii.gz")}], tmp_path / "bad.json")
    assert len(load_datalist(bad)) == 2                                # not validated: kept for the dataset
    with pytest.raises(DataError) as e:
        load_datalist(bad, validate=True)
    assert "[training][1]" in str(e.value) and "gone.nii.gz" in str(e.value)


def test_index_folder_finds_files_and_dicom_series(tmp_path, small_ct):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    sitk.WriteImage(small_ct, str(root / "a.nii.gz"))
    sitk.WriteImage(small_ct, str(root / "sub" / "b.nrrd"))
    sitk.WriteImage(small_ct, str(root / "sub" / "c.mha"))
    sitk.WriteImage(small_ct, str(root / "a_label.nii.gz"))            # label-looking: left out
    sitk.WriteImage(small_ct, str(root / "labelsTr" / "a.nii.gz"))
    (root / "notes.txt").write_text("not a scan", encoding="utf-8")
    _write_dicom_series(small_ct, root / "dicom" / "series1")
    found = [Path(e["image"]).relative_to(root.resolve()).as_posix() for e in index_folder(root)]
    assert found == ["a.nii.gz", "dicom/series1", "sub/b.nrrd", "sub/c.mha"]
    assert load_datalist(root) == index_folder(root)
    assert load_scan(root / "dicom" / "series1").shape == (40, 32, 12)


# ------------------------------------------------------------------------------------------ pretraining


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, demo_items):
    """Demo CT + Colin27 cached once at 3 mm (fast); plus one missing and one NaN scan that must be skipped."""
    tmp = tmp_path_factory.mktemp("pretrain")
    nan = tmp / "nan.nii.gz"
    arr = np.ones((16, 16, 16), np.float32)
    arr[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    items = demo_items[:2] + [{"image": str(tmp / "missing.nii.gz")}, {"image": str(nan)}]
    ds = PretrainDataset(items, _cfg(), tmp / "cache", seed=3, skipped_log=tmp / "skipped.jsonl")
    ds.prepare(progress=False)
    return ds, items, tmp


def test_prepare_skips_bad_scans_and_caches(prepared):
    ds, items, tmp = prepared
    assert ds.n_preprocessed == 2 and len(ds.volumes) == 2 and len(ds) == 2 * 2
    skipped = [json.loads(ln) for ln in (tmp / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["path"] for s in skipped] == [items[2]["image"], items[3]["image"]]
    assert "NaN" in skipped[1]["error"] and items[3]["image"] in skipped[1]["error"]

    stored = sorted((tmp / "cache").glob("*.b2nd"))  # the store: one compressed array per scan
    assert len(stored) == 2 and not list((tmp / "cache").glob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in stored]
    again = PretrainDataset(items, _cfg(), tmp / "cache", seed=3, skipped_log=tmp / "skipped.jsonl")
    again.prepare(progress=False)
    assert again.n_preprocessed == 0 and len(again) == len(ds)
    assert [p.stat().st_mtime_ns for p in stored] == mtimes
    assert len((tmp / "skipped.jsonl").read_text(encoding="utf-8").splitlines()) == 2  # logged once per path
    # a different preprocessing setting is a different cache entry
    other = PretrainDataset(items[:1], _cfg(spacing=[4.0, 4.0, 4.0]), tmp / "cache", seed=3)
    assert other.prepare(progress=False).n_preprocessed == 1


def test_items_deterministic_and_views(prepared):
    ds, items, tmp = prepared
    a, b = ds[(1, 0)], ds[(1, 0)]
    fresh = PretrainDataset(items, _cfg(), tmp / "cache", seed=3).prepare(progress=False)
    c = fresh[(1, 0)]
    for k in ("image", "view1", "view2"):
        assert a[k].shape == (1, 32, 32, 32) and a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    assert a["index"] == 1
    assert not torch.equal(a["image"], ds[(1, 1)]["image"])           # another epoch, another crop
    assert not torch.equal(a["view1"], a["view2"])
    assert a["image"].min() >= 0 and a["image"].max() <= 1
    other_seed = PretrainDataset(items, _cfg(), tmp / "cache", seed=4).prepare(progress=False)
    assert not torch.equal(other_seed[(1, 0)]["view1"], a["view1"])
    probe = ds.probe_crops(3)
    assert probe.shape == (3, 1, 32, 32, 32) and torch.equal(probe, ds.probe_crops(3))


def test_small_volume_padded_and_2d_slices(prepared):
    ds, items, tmp = prepared
    big = PretrainDataset(items[:1], _cfg(roi=[128, 128, 128], spacing=[4.0, 4.0, 4.0]), tmp / "cache", seed=0)
    x = big.prepare(progress=False)[(0, 0)]["image"]
    assert x.shape == (1, 128, 128, 128) and (x == 0).any()          # zero-padded beyond the volume
    ds2 = PretrainDataset(items[:2], _cfg(roi=[48, 48], spacing=[3.0, 3.0, -1.0]), tmp / "cache", seed=0,
                          spatial_dims=2).prepare(progress=False)
    item = ds2[(3, 2)]
    assert item["view1"].shape == item["view2"].shape == item["image"].shape == (1, 48, 48)
    assert ds2.probe_crops(2).shape == (2, 1, 48, 48)


def test_corrupt_cache_substituted_and_logged(prepared, tmp_path):
    import shutil

    ds, items, tmp = prepared
    log = tmp_path / "skipped.jsonl"
    shutil.copytree(tmp / "cache", tmp_path / "cache")
    ds2 = PretrainDataset(items[:2], _cfg(), tmp_path / "cache", seed=3, skipped_log=log).prepare(progress=False)
    # break volume 0's stored array after the dataset opened the store: it is substituted by volume 1
    stored = ds2.store.image_path(ds2.volumes[0]["key"])
    with open(stored, "r+b") as f:
        f.truncate(stored.stat().st_size // 2)
    first = ds2[(0, 0)]
    assert first["image"].shape == (1, 32, 32, 32)
    assert torch.equal(first["image"], ds2[(0, 0)]["image"])
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"] == items[0]["image"]


def test_no_valid_scan_raises(tmp_path):
    ds = PretrainDataset([{"image": str(tmp_path / "x.nii.gz")}], _cfg(), tmp_path / "c", seed=0,
                         skipped_log=tmp_path / "s.jsonl")
    with pytest.raises(DataError, match="no usable scans"):
        ds.prepare(progress=False)


