"""Issue 22's trust defects: what loses a user's work or trust quietly. One test per defect (numbered as in the
issue), each failing on the code before the fix; commands run in this process (`sslkit.cli.main`) except where a
signal or two processes at once are the point."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from conftest import REPO, CliChild, tiny_raw, write_cfg
from sslkit import run as R
from sslkit.errors import DataError, UserError


def _cli(capsys, *args) -> tuple[int, str, str]:
    """`sslkit ARGS` in this process: (exit code, stdout, stderr)."""
    from sslkit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("sslkit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpoint(ckpts: Path, step: int) -> Path:
    """A verified checkpoint folder of two small files, written the way both loops write theirs."""
    tmp = R.begin_checkpoint(ckpts, step)
    (tmp / "student.safetensors").write_bytes(np.random.default_rng(step).bytes(4096))
    (tmp / "trainer.json").write_text(json.dumps({"step": step}), encoding="utf-8")
    return R.finish_checkpoint(tmp, step, keep_last=10)


def _downstream_recipe(path: Path, root: Path, **data) -> Path:
    """A tiny QT-UNet fine-tuning recipe on a datalist (4 mm, 32^3 crops, one thread)."""
    raw = {"data": {"layout": "datalist", "root": str(root), "num_classes": 3, "label_names": ["grey", "white"],
                    "spacing": [4.0, 4.0, 4.0], "modality": "mri", "roi": [32, 32, 32], "samples_per_volume": 1,
                    "flip_prob": 0.0, "rot90_prob": 0.0, **data},
           "model": {"name": "qt_unet", "args": {"variant": "tiny", "window_size": 4}},
           "train": {"max_steps": 4, "val_every": 1, "batch_size": 1, "threads": 1, "sw_batch_size": 2},
           "optim": {"lr": 1e-3}}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# ------------------------------------------------------------------------- 1. --resume auto never starts over


def _unverifiable_run(run: Path) -> Path:
    """A run directory whose checkpoints all fail to verify: step 2's student truncated, step 4's COMPLETE marker
    deleted (an intact folder whose manifest is gone)."""
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text("train: {max_steps: 8}\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)))
    ckpts = run / R.CHECKPOINTS
    two = _checkpoint(ckpts, 2)
    data = (two / "student.safetensors").read_bytes()
    (two / "student.safetensors").write_bytes(data[: len(data) // 2])
    (_checkpoint(ckpts, 4) / R.COMPLETE).unlink()
    return run


def test_resume_auto_refuses_when_no_checkpoint_verifies(tmp_path, capsys):
    """Before: one fallback line per checkpoint, then a fresh start from step 1 that emptied metrics.jsonl and
    overwrote the step folders (exit 0). Now exit 2, one line listing what it found and how to start over on
    purpose, and not a byte changed."""
    run = _unverifiable_run(tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(UserError) as e:  # the run layer both loops open their directory with
        R.RunDir.open(run, "auto", {"train": {"max_steps": 8}})
    assert _snapshot(run) == before
    recipe = _downstream_recipe(tmp_path / "down.yaml", tmp_path / "unused.json")
    code, _, err = _cli(capsys, "finetune", "--cfg", recipe, "--run-dir", run, "--resume", "auto", "--no-progress")
    line = _error_line(err)
    assert code == 2 and line == f"sslkit: error: {e.value}"
    for needle in ("2 checkpoint(s) and none verifies", "step_00000004: incomplete (no COMPLETE marker)",
                   "step_00000002: student.safetensors has", f"move {run / R.CHECKPOINTS} aside"):
        assert needle in line, line
    assert "warning" not in err and _snapshot(run) == before
    # a fresh start is refused too, whether the step folders verify or not
    with pytest.raises(UserError, match="already holds a run with checkpoints"):
        R.RunDir.open(run, None, {})


# ------------------------------------------------------------------------- 2. the printed resume line works
# (followed after a real SIGTERM, to the uninterrupted run's weights: tests/test_faults.py)


def test_resume_without_cfg_needs_a_run_to_continue(tmp_path, capsys):
    code, _, err = _cli(capsys, "pretrain", "--run-dir", tmp_path / "nothing", "--resume", "auto")
    assert code == 2 and "no config.yaml to resume from; give the recipe with --cfg" in _error_line(err)
    code, _, err = _cli(capsys, "finetune", "--run-dir", tmp_path / "nothing")
    assert code == 2 and "--cfg: needed to start a run" in _error_line(err)


# ------------------------------------------------------------------------- 3. every scan bad: say which, keep the list


def _bad_scans(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), str(folder / "flat.nii.gz"))
    nan = np.ones((16, 16, 16), np.float32)
    nan[2:4, 2:4, 2:4] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(folder / "nan.nii.gz"))
    (folder / "text.nii.gz").write_text("not an image", encoding="utf-8")
    return [folder / "flat.nii.gz", folder / "nan.nii.gz", folder / "text.nii.gz", folder / "missing.nii.gz"]


def test_datalist_of_bad_scans_names_them_and_keeps_the_list(demo_dir, scan_cache, tmp_path, capsys):
    """Before: 'no usable scans ... (see RUN/skipped.jsonl)' and the run folder, with that file, removed. Now the
    line names the first bad files and why, counts the rest, and the folder and its skipped.jsonl stay."""
    bad = _bad_scans(tmp_path / "scans")
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"image": str(p)} for p in bad]}), encoding="utf-8")
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache, data={"datalist": str(tmp_path / "dl.json")}), tmp_path / "c.yaml")
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "pretrain", "--cfg", cfg, "--run-dir", run, "--no-progress")
    line = _error_line(err)
    assert code == 2 and "no usable scans among 4 datalist entries" in line
    assert f"{bad[0]}: 2-D image" in line and f"{bad[1]}: 8 NaN/inf voxels" in line and str(bad[2]) in line
    assert "and 1 more" in line and f"every one in {run / 'skipped.jsonl'}" in line
    rows = R.read_jsonl(run / "skipped.jsonl")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in bad)
    assert not list(run.glob(f"{R.CHECKPOINTS}/step_*"))


# ------------------------------------------------------------------------- 6. say what was dropped; quiet, fast tools


def test_a_run_that_drops_scans_says_how_many_of_how_many(demo_dir, scan_cache, tmp_path, capsys):
    from sslkit.config import load_config
    from sslkit.data.pretrain import PretrainDataset

    bad = _bad_scans(tmp_path / "scans")[:2]
    items = [{"image": str(demo_dir / "ct_head.nii.gz")}, {"image": str(demo_dir / "mri_colin27_t1.nii.gz")}]
    cfg = load_config(None, [f"data.cache_dir={scan_cache}", "data.spacing=[8,8,8]", "data.roi=[16,16,16]"])
    ds = PretrainDataset(items + [{"image": str(p)} for p in bad], cfg.data, scan_cache, seed=0,
                         skipped_log=tmp_path / "skipped.jsonl")
    capsys.readouterr()
    ds.prepare(progress=False)
    warns = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(ds.volumes) == 2 and len(warns) == 1, warns
    assert "2 of 4 scans left out as unreadable" in warns[0] and str(bad[0]) in warns[0]
    assert f"every one in {tmp_path / 'skipped.jsonl'}" in warns[0]


def test_data_index_lets_no_simpleitk_warning_through(tmp_path, capfd):
    """A folder holding a DICOM file that is no image (a structured report): ITK printed its own multi-line
    'WARNING: In .../itkGDCMSeriesFileNames.cxx ... No Series were found' on stderr. Now one sslkit line."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from sslkit.cli import main

    folder = tmp_path / "scans" / "report"
    folder.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.save_as(str(folder / "sr.dcm"), enforce_file_format=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 900, (12, 12, 12)).astype(np.float32), np.eye(4)),
             str(tmp_path / "scans" / "t1.nii.gz"))
    capfd.readouterr()
    assert main(["data", "index", str(tmp_path / "scans"), "--out", str(tmp_path / "dl.json")]) == 0
    err = capfd.readouterr().err
    assert "WARNING" not in err and "itk" not in err.lower(), err
    warns = [ln for ln in err.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(warns) == 1 and str(folder) in warns[0] and warns[0].endswith("left out"), err


def test_info_without_a_path_does_not_import_deepspeed(monkeypatch, capsys):
    """Before: 43 s on a loaded machine, most of it importing DeepSpeed, and its accelerator warning. Now the
    versions come from package metadata and the accelerator from what DeepSpeed would pick."""
    from importlib.metadata import version

    import torch

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any `import deepspeed` now raises ImportError
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    code, out, err = _cli(capsys, "info")
    assert code == 0 and not err
    lines = out.splitlines()
    assert f"deepspeed   {version('deepspeed')}" in lines and f"monai       {version('monai')}" in lines
    assert f"deepspeed accelerator: {'cuda' if torch.cuda.is_available() else 'cpu'}" in lines


# ------------------------------------------------------------------------- 7. data index reads modality and labels


def _dicom_file(path: Path, img: sitk.Image, tags: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for k, v in tags.items():
        img.SetMetaData(k, v)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(img)


def test_data_index_writes_modality_and_leaves_out_label_maps_and_what_the_reader_refuses(demo_dir, tmp_path,
                                                                                         capsys):
    """Before: no modality (MRI windowed as CT), an atlas listed as a scan, a 2-D radiograph and a stack of
    secondary captures listed, then refused by pretraining. Now each entry has its modality, the label map is left
    out with its reason, the two DICOM folders are left out with the reader's own reason, each once, and the guess
    that is not sure is one warning line."""
    from sslkit.data.readers import load_scan

    root = tmp_path / "scans"
    root.mkdir()
    ct = nib.load(str(demo_dir / "ct_head.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[0:128, 0:128, 40:60], ct.affine), str(root / "head.nii.gz"))
    t1 = nib.load(str(demo_dir / "mri_colin27_t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[40:140, 40:140, 60:90], t1.affine), str(root / "brain.nii.gz"))
    z = np.asarray(t1.dataobj, dtype=np.float32)[40:140, 40:140, 60:90]
    nib.save(nib.Nifti1Image((z - z.mean()) / z.std(), t1.affine), str(root / "normalised.nii.gz"))
    seg = nib.load(str(demo_dir / "mri_mni152_gmwm.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[40:140, 40:140, 60:90], seg.affine), str(root / "tissue.nii.gz"))
    rng = np.random.default_rng(0)
    radiograph = root / "xray"
    _dicom_file(radiograph / "cr.dcm", sitk.GetImageFromArray(rng.integers(0, 4000, (64, 48)).astype(np.int16)),
                {"0008|0060": "CR"})
    captures = root / "screens"
    for k in range(3):
        _dicom_file(captures / f"sc{k}.dcm", sitk.GetImageFromArray(rng.integers(0, 255, (32, 32)).astype(np.int16)),
                    {"0008|0060": "OT", "0008|0016": "1.2.840.10008.5.1.4.1.1.7", "0020|000e": "1.2.3.44",
                     "0020|0013": str(k + 1)})
    reasons = {}
    for folder in (radiograph, captures):
        with pytest.raises(DataError) as e:  # what pretraining's reader says about them
            load_scan(folder, require_3d=True, channels=True)
        reasons[folder] = str(e.value)

    out = tmp_path / "dl.json"
    code, stdout, err = _cli(capsys, "data", "index", root, "--out", out)
    assert code == 0, err
    entries = {Path(e["image"]).name: e.get("modality") for e in json.loads(out.read_text())["training"]}
    assert entries == {"head.nii.gz": "ct", "brain.nii.gz": "mri", "normalised.nii.gz": "mri"}
    warns = [ln for ln in err.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(warns) == 4, err
    tissue = [w for w in warns if "tissue.nii.gz" in w]
    assert len(tissue) == 1 and "label map" in tissue[0] and "3 distinct values" in tissue[0]
    for folder, reason in reasons.items():
        assert [w for w in warns if str(folder) in w] == [f"sslkit: warning: {reason}; left out"]
    # GDCM's writer may give every capture a default position (0, 0, 0): then they share one position
    assert "2-D image" in reasons[radiograph]
    assert "no ImagePositionPatient" in reasons[captures] or "at the same position" in reasons[captures]
    unsure = [w for w in warns if "not sure" in w]
    assert len(unsure) == 1 and "normalised.nii.gz: mri" in unsure[0] and "1 of 3 scans" in unsure[0]
    assert "3 scans (1 ct, 2 mri)" in stdout and "3 left out" in stdout


def test_modality_from_headers_and_from_intensities():
    from sslkit.data.scan_kind import intensity_modality

    rng = np.random.default_rng(1)
    ct = np.concatenate([np.full(3000, -1024.0), rng.normal(40, 20, 5000), rng.normal(700, 200, 2000)])
    assert (intensity_modality(ct).name, intensity_modality(ct).sure) == ("ct", True)
    mri = rng.gamma(2.0, 150.0, 10000)
    assert (intensity_modality(mri).name, intensity_modality(mri).sure) == ("mri", True)
    assert intensity_modality(rng.normal(0, 1, 10000)).sure is False  # z-scored: neither HU nor raw MRI


# ------------------------------------------------------------------------- 8. two preparations into one store


def _slow_writes_started_together(ready: str, n: int, delay: float) -> None:
    """In each preparing process: a stored image's temporary file stays 2 s before its rename; start once all `n`
    processes are ready, this one `delay` s later."""
    from sslkit.data import store

    write = store.VolumeStore._write_image

    def slow(self, *a, **k):
        out = write(self, *a, **k)
        time.sleep(2.0)
        return out

    store.VolumeStore._write_image = slow
    (Path(ready) / str(os.getpid())).touch()
    while len(list(Path(ready).iterdir())) < n:
        time.sleep(0.01)
    time.sleep(delay)


@pytest.mark.slow
def test_two_preparations_into_one_store_at_once_skip_nothing(demo_dir, tmp_path):
    """Before: the second replaced the first's files while it wrote them, and the first logged a false 'skipped'
    (or ended with no usable scan). Now each entry is locked while it is prepared: the second waits, then finds it
    stored."""
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"image": str(demo_dir / "ct_head.nii.gz")}]}),
                                      encoding="utf-8")
    raw = tiny_raw(demo_dir, tmp_path, data={"datalist": str(tmp_path / "dl.json"), "spacing": [6.0, 6.0, 6.0]})
    cfg = write_cfg(raw, tmp_path / "c.yaml")
    (tmp_path / "ready").mkdir()
    store = tmp_path / "store"
    # the second starts 1 s later: it reaches the first entry while the first process writes it
    procs = [CliChild("data", "prepare", "--cfg", str(cfg), "--out", str(store), "--no-progress", cwd=tmp_path,
                      setup=functools.partial(_slow_writes_started_together, str(tmp_path / "ready"), 2, delay))
             for delay in (0.0, 1.0)]
    results = [p.finish(timeout=600) for p in procs]
    made = []
    for res in results:
        out = res.stdout
        assert res.returncode == 0 and "skipped" not in out, (out, res.stderr[-2000:])
        prepared, already = int(out.split("prepared ")[1].split()[0]), int(out.split(" scans, ")[1].split()[0])
        assert prepared + already == 1, out
        made.append(prepared)
    assert sorted(made) == [0, 1], results  # prepared once, by the first; the second found it stored
    assert not (store / "skipped.jsonl").exists() or not (store / "skipped.jsonl").read_text().strip()
    from sslkit.data.store import VolumeStore

    assert len(VolumeStore(store).keys()) == 1


# ------------------------------------------------------------------------- 9. true strides; a fine-tuned model's info


def test_feature_strides_are_the_architectures_whatever_the_crop():
    """Before: a 48^3 crop measured the deepest Swin stage as 24 (MONAI pads 3 cells to 4 before merging)."""
    import torch

    from sslkit.models import build_encoder
    from sslkit.models.base import measure_feature_strides

    torch.set_num_threads(1)
    swin = build_encoder("swin_unetr", feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    assert measure_feature_strides(swin, [48, 48, 48]) == [[s] * 3 for s in (2, 4, 8, 16, 32)]
    punet = build_encoder("punet", channels=(8, 8, 16, 16, 16), num_heads=2, num_classes=3, prompt_tokens=2).eval()
    big = [128, 128, 64]  # a crop every stride divides: sizes shrink by exactly the stride
    with torch.no_grad():
        truth = [[b // n for b, n in zip(big, f.shape[2:])] for f in punet(torch.zeros(1, 1, *big))]
    assert truth[-1] == [32, 32, 16]  # in-plane stride 2 per stage, 1 in depth for the stem
    assert measure_feature_strides(punet, [48, 48, 24]) == truth


def test_info_of_a_finetuned_model_names_every_class_and_its_own_data(tmp_path, capsys):
    """Before: 2 names for 3 classes, and the encoder's pretraining corpus shown as the model's own."""
    from sslkit.downstream.adapt import build_model, save_model
    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.downstream.from_plan import segmenter_plan
    from sslkit.plan import make_plan

    raw = yaml.safe_load(_downstream_recipe(tmp_path / "r.yaml", tmp_path / "dl.json").read_text())
    cfg = downstream_config_from_dict({**raw, "data": {**raw["data"], "task": "gm_wm"}})
    enc_plan = make_plan("qt_unet", {"variant": "tiny"}, {}, [48, 96, 192, 384], [[4] * 3, [8] * 3, [16] * 3,
                                                                                  [32] * 3],
                         corpus={"scans": 3, "modalities": {"ct": 1, "mri": 2}})
    plan = segmenter_plan(cfg, enc_plan, {"cases": 1})
    save_model(build_model(cfg), cfg, plan, tmp_path / "model.safetensors")
    code, out, _ = _cli(capsys, "info", tmp_path / "model.safetensors")
    assert code == 0
    assert "3 classes ['background', 'grey', 'white']" in out
    own = next(ln for ln in out.splitlines() if ln.startswith("trained on"))
    assert json.loads(own.split(None, 2)[2]) == {"scans": 1, "modalities": {"mri": 1}, "task": "gm_wm"}
    assert not any(ln.startswith("corpus") for ln in out.splitlines())
    assert 'encoder corpus  {"modalities": {"ct": 1, "mri": 2}, "scans": 3} (its pretraining)' in out


# ------------------------------------------------------------------------- 10. predict's errors; file modes


def test_predict_on_a_singular_affine_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    """Before: 'Unable to find out axis 1.0 in start_ornt' and an empty output folder left behind."""
    from sslkit.downstream.adapt import build_model, save_model
    from sslkit.downstream.config import downstream_config_from_dict

    cfg = downstream_config_from_dict(yaml.safe_load(_downstream_recipe(tmp_path / "r.yaml", tmp_path).read_text()))
    save_model(build_model(cfg), cfg, {}, tmp_path / "model.safetensors")
    broken = nib.Nifti1Image(np.ones((24, 24, 24), np.float32), None)
    broken.header.set_sform(np.array([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]), code=2)  # z along x
    broken.header.set_qform(np.eye(4), code=0)
    scan = tmp_path / "broken.nii.gz"
    nib.save(broken, str(scan))
    out = tmp_path / "preds" / "run1"
    code, _, err = _cli(capsys, "predict", "--ckpt", tmp_path / "model.safetensors", "--input", scan, "--output", out)
    line = _error_line(err)
    assert code == 2 and str(scan) in line and "voxel-to-world affine is singular" in line and "start_ornt" not in line
    assert not (tmp_path / "preds").exists()


def test_written_weights_get_the_mode_of_every_other_output(tmp_path):
    """Before: safetensors wrote its files 0600 while the run's other files were 0644."""
    import torch

    from sslkit.plan import write_weights

    old = os.umask(0o022)
    try:
        write_weights(tmp_path / "encoder.safetensors", {"w": torch.zeros(3)}, {"kind": "encoder"})
        R.atomic_write_json(tmp_path / "plan.json", {"kind": "encoder"})
    finally:
        os.umask(old)
    assert oct((tmp_path / "encoder.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "plan.json").stat().st_mode & 0o777) == oct(0o644)


# ------------------------------------------------------------------------- 11. never write under the current folder


def test_a_demo_layouts_relative_root_is_the_recipe_folders_or_refused(tmp_path, monkeypatch):
    """Before: a relative data.root of layout mni_gm_wm wrote the demo under whatever folder the command ran in."""
    from sslkit.downstream.config import downstream_config_from_dict, load_downstream_config
    from sslkit.downstream.data import list_cases

    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir()
    elsewhere.mkdir()
    raw = {"data": {"layout": "mni_gm_wm", "root": "demo", "num_classes": 3, "roi": [32, 32, 32]}}
    (recipes / "r.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    assert load_downstream_config(recipes / "r.yaml").data.root == str(recipes / "demo")
    assert load_downstream_config(recipes / "r.yaml", ["data.root=typed"]).data.root == str(elsewhere / "typed")
    with pytest.raises(DataError, match="'demo' is a relative path and layout mni_gm_wm writes"):
        list_cases(downstream_config_from_dict(raw).data)
    assert not any(elsewhere.iterdir())
    # the shipped demo recipes name the repository's demo corpus from wherever they run
    assert load_downstream_config(REPO / "downstream" / "demo_mni_gm_wm.yaml").data.root == str(REPO / "demo_data")


# ------------------------------------------------------------------------- design: shared pieces


def test_compare_adds_the_paired_difference_per_class_and_points_at_study(tmp_path, capsys):
    per_case = {"a": [[0.75, 0.5], [0.5, 0.25]], "b": [[0.875, 0.25], [0.625, 0.5]]}  # exact in binary
    runs = []
    for name, dice in per_case.items():
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        cases = [{"case": f"c{i}", "dice": d, "hd95": [1.0, 1.0], "asd": [0.5, 0.5]} for i, d in enumerate(dice)]
        summary = {"n_cases": 2, "mean_dice": float(np.mean(dice)), "mean_hd95": 1.0, "mean_asd": 0.5,
                   "per_class": {n: {"dice": float(np.mean([d[j] for d in dice])), "hd95": 1.0, "asd": 0.5,
                                     "hd95_n_inf": 0} for j, n in enumerate(("gm", "wm"))}}
        (run / "eval" / "metrics.json").write_text(json.dumps({"summary": summary, "class_names": ["gm", "wm"],
                                                               "per_case": cases}))
        runs.append(run)
    code, out, _ = _cli(capsys, "compare", *runs, "--out", tmp_path / "cmp.md")
    assert code == 0 and "sslkit study" in out
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in out.splitlines() if r.startswith("| ")}
    assert rows["gm"][-2:] == ["+0.1250", "2 / 0 of 2 cases"]    # +0.125 on both cases
    assert rows["wm"][-2:] == ["+0.0000", "1 / 1 of 2 cases"]    # -0.25 and +0.25
    assert rows["mean"][-2:] == ["+0.0625", "1 / 1 of 2 cases"]  # per case (-0.125 / 2, +0.375 / 2): -0.0625, +0.1875


def test_dashboard_badge_names_every_metric_outside_its_band_and_the_page_explains_amber():
    from sslkit.monitor.dashboard import columns_of, render_page, run_verdict

    rows = [{"step": s, "loss": 1.0, "monitor/embedding_std": 0.8, "monitor/rankme_ratio": 0.15,
             "monitor/mean_cosine": 0.5} for s in (1, 2)]
    verdict = run_verdict(columns_of(rows), [], [])
    assert verdict["status"] == "healthy" and verdict["reasons"] == []
    assert len(verdict["watch"]) == 2
    assert any(w.startswith("monitor/mean_cosine = 0.5: outside its healthy range -0.2..0.3") for w in verdict["watch"])
    assert any(w.startswith("monitor/rankme_ratio = 0.15: outside its healthy range 0.2..1") for w in verdict["watch"])
    page = render_page(None)
    assert 'id="health-legend"' in page and "amber: between" in page


def test_registry_finds_a_new_architecture_module_without_a_list(tmp_path, monkeypatch):
    import sslkit.models as models
    from sslkit.models import registry
    from sslkit.models.registry import build_encoder, encoder_names

    monkeypatch.setattr(registry, "_ENCODERS", dict(registry._ENCODERS))  # the test's builder leaves with the test

    (tmp_path / "tiny_family.py").write_text(
        "from sslkit.models.registry import register_encoder\n\n"
        "@register_encoder('tiny_family_for_test')\n"
        "def tiny(spatial_dims=3, in_channels=1):\n"
        "    return ('tiny', spatial_dims, in_channels)\n", encoding="utf-8")
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "sslkit.models.tiny_family", raising=False)
    assert "tiny_family_for_test" in encoder_names()
    assert build_encoder("tiny_family_for_test") == ("tiny", 3, 1)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from sslkit.downstream import bundle

    monkeypatch.setattr(bundle, "_version_of", lambda p: None if p == "fire" else "1.0")
    with pytest.raises(UserError) as e:
        bundle.required_versions()
    assert "fire not installed" in str(e.value) and "pip install 'sslkit[bundle]'" in str(e.value)
    assert "\n" not in str(e.value)


def test_one_datalist_reader_for_pretraining_and_downstream(tmp_path):
    from sslkit.data.datalist import load_datalist
    from sslkit.downstream.data import _datalist_cases

    (tmp_path / "sub").mkdir()
    doc = {"training": [{"image": ["sub/t1.nii.gz", "sub/t2.nii.gz"], "label": "sub/seg.nii.gz"},
                        {"image": str(tmp_path / "abs.nii.gz"), "label": "seg2.nii.gz"}]}
    (tmp_path / "sub" / "dl.json").write_text(json.dumps(doc), encoding="utf-8")
    pre = load_datalist(tmp_path / "sub" / "dl.json")
    down, _ = _datalist_cases(tmp_path / "sub" / "dl.json")
    assert [{"image": e["image"], "label": e["label"]} for e in pre] == down
    assert down[0]["image"] == [str(tmp_path / "sub" / "sub" / f"t{i}.nii.gz") for i in (1, 2)]
    assert down[1] == {"image": str(tmp_path / "abs.nii.gz"), "label": str(tmp_path / "sub" / "seg2.nii.gz")}
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    for read in (load_datalist, _datalist_cases):
        with pytest.raises(DataError, match="bad.json: not valid JSON"):
            read(tmp_path / "bad.json")
