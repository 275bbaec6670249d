"""Downstream: metrics vs MONAI, predict geometry, encoder loading / freezing, demo fine-tuning, reports."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from sslkit.downstream.adapt import adapt, build_model, encoder_plan, load_encoder, save_model
from sslkit.downstream.config import downstream_config_from_dict, load_downstream_config
from sslkit.downstream.metrics import case_metrics
from sslkit.errors import ConfigError, DataError, UserError
from sslkit.models.registry import register_segmenter

ROOT = Path(__file__).resolve().parents[1]
DEMO_2D = ROOT / "downstream" / "demo_mni_gm_wm_2d.yaml"
# the MNI152 GM/WM demo these tests build: outside the repository, whose .cache/ and demo_data/ are a user's
MNI_ROOT = Path(tempfile.gettempdir()) / "sslkit-test-mni"

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------- metrics


def _monai(pred, gt, k, spacing=None):
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    oh = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a).long(), k).movedim(-1, 0)[None].float()
    p, g = oh(pred), oh(gt)
    return (compute_dice(p, g, include_background=False)[0].tolist(),
            compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=spacing)[0].tolist(),
            compute_average_surface_distance(p, g, include_background=False, symmetric=True,
                                             spacing=spacing)[0].tolist())


def test_metrics_equal_monai_and_known_values():
    rng = np.random.default_rng(0)
    gt = np.zeros((24, 24, 24), np.int64)
    gt[4:14, 4:16, 5:15] = 1
    gt[15:22, 10:20, 8:20] = 2
    pred = gt.copy()
    pred[rng.random(gt.shape) < 0.05] = 1
    pred[3:9, 3:9, 3:9] = 2
    for spacing in (None, [1.0, 2.0, 3.0]):
        ours = case_metrics(pred, gt, 3, spacing)
        d, h, a = _monai(pred, gt, 3, spacing)
        assert np.allclose(ours["dice"], d) and np.allclose(ours["hd95"], h) and np.allclose(ours["asd"], a)

    # two 6^3 cubes offset by 3 voxels along one axis: every surface point is at most 3 voxels away -> HD95 = 3
    a = np.zeros((20, 20, 20), np.int64)
    b = np.zeros_like(a)
    a[5:11, 5:11, 5:11] = 1
    b[8:14, 5:11, 5:11] = 1
    m = case_metrics(b, a, 2)
    assert m["hd95"][0] == pytest.approx(3.0)
    assert m["dice"][0] == pytest.approx(0.5)  # overlap 3x6x6 of two 6x6x6 cubes
    assert case_metrics(b, a, 2, [2.0, 1.0, 1.0])["hd95"][0] == pytest.approx(6.0)  # mm along the offset axis

    # convention: empty prediction of a present class -> Dice 0, HD95 = ASD = inf; absent in both -> nan
    empty = np.zeros_like(a)
    m = case_metrics(empty, a, 3)
    assert m["dice"][0] == 0.0 and math.isinf(m["hd95"][0]) and math.isinf(m["asd"][0])
    assert math.isnan(m["dice"][1]) and math.isnan(m["hd95"][1])


# ------------------------------------------------------------------------------------------------- predict


class _Threshold(nn.Module):
    """Logits [0.5 - x, x - 0.5]: label 1 where the windowed intensity exceeds 0.5; no weights."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Identity()

    def forward(self, x):
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1)


@register_segmenter("_test_threshold")
def _test_threshold(spatial_dims=3, in_channels=1, out_channels=2):
    return _Threshold()


def threshold_model_file(cfg, path: Path) -> Path:
    """A fine-tuned-model file of the weightless threshold segmenter (its plan and config in the metadata)."""
    from sslkit.downstream.from_plan import segmenter_plan

    save_model(build_model(cfg), cfg, segmenter_plan(cfg, None, {}), path)
    return path


def last_checkpoint_weights(run: Path) -> tuple[int, dict]:
    """(step, model weights) of a fine-tuning run's newest checkpoint."""
    from sslkit.plan import read_weights
    from sslkit.run import newest_valid_checkpoint

    ck = newest_valid_checkpoint(run / "checkpoints")
    return int(ck.name.split("_")[1]), read_weights(ck / "model.safetensors")[0]


def _oblique_scan(tmp: Path) -> tuple[Path, np.ndarray]:
    """MNI152 T1 voxels with an anisotropic, axis-permuted, LPS-style (x, y flipped) affine."""
    from nilearn import datasets

    t1 = np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), np.float32)[20:80, 25:95, 20:60]
    data = np.ascontiguousarray(np.transpose(t1, (2, 0, 1)) * 1000.0)  # (40, 60, 70)
    aff = np.zeros((4, 4))
    aff[0, 1] = -1.5   # voxel axis 1 -> world -x (L -> R flipped), 1.5 mm
    aff[1, 2] = -2.0   # voxel axis 2 -> world -y, 2.0 mm
    aff[2, 0] = 3.0    # voxel axis 0 -> world z, 3.0 mm
    aff[:3, 3] = [40.0, 60.0, -50.0]
    aff[3, 3] = 1
    p = tmp / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    return p, data


def test_predict_returns_original_geometry(tmp_path):
    from sslkit.downstream.predict import predict

    src, data = _oblique_scan(tmp_path)
    cfg = downstream_config_from_dict({
        "data": {"layout": "datalist", "root": "unused.json", "spacing": [2.0, 2.0, 2.0], "modality": "ct",
                 "intensity_range": [0.0, 1000.0], "roi": [32, 32, 32], "crop_foreground": True},
        "model": {"name": "_test_threshold"}, "train": {"sw_overlap": 0.25}})
    ck = threshold_model_file(cfg, tmp_path / "model.safetensors")
    out = predict(ck, src, tmp_path / "pred", device="cpu")
    seg = nib.load(str(out[0]))
    ref = nib.load(str(src))
    assert seg.shape == ref.shape
    assert np.allclose(seg.affine, ref.affine)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(ref.affine) == ("S", "L", "P")
    lab = np.asarray(seg.dataobj)
    truth = data > 500.0
    agree = (lab.astype(bool) == truth).mean()
    assert truth.mean() > 0.1 and agree > 0.95, agree   # right voxels, not just the right shape

    # the same scan as MHA through SimpleITK: output carries the file's origin / spacing / direction
    import SimpleITK as sitk

    mha = tmp_path / "oblique.mha"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(mha))
    out2 = predict(ck, mha, tmp_path / "pred_mha", device="cpu")
    a, b = sitk.ReadImage(str(mha)), sitk.ReadImage(str(out2[0]))
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())
    assert (sitk.GetArrayFromImage(b) == np.asarray(seg.dataobj).transpose(2, 1, 0)).mean() > 0.99


# ------------------------------------------------------------------------------------ encoder weights


def _tiny_cfg(tmp_path: Path, schedule: str = "constant", **train) -> dict:
    return {
        "data": {"layout": "mni_gm_wm", "root": str(MNI_ROOT),
                 "num_classes": 3, "spacing": [2.0, 2.0], "modality": "mri", "roi": [64, 64],
                 "samples_per_volume": 1, "flip_prob": 0.0, "rot90_prob": 0.0},
        "model": {"name": "swin_unetr", "spatial_dims": 2,
                  "args": {"feature_size": 12, "window_size": 4, "depths": [1, 1, 1, 1]}},
        "train": {"max_steps": 3, "batch_size": 2, "val_every": 3, "val_cases": 1, "threads": 2, **train},
        "optim": {"lr": 1e-3, "schedule": schedule},
    }


def test_encoder_weights_load_strictly_and_frozen_stays_frozen(tmp_path):
    from safetensors.torch import save_file

    from sslkit.downstream.train import finetune

    raw = _tiny_cfg(tmp_path)
    cfg = downstream_config_from_dict(raw)
    torch.manual_seed(123)
    donor = build_model(cfg).encoder.state_dict()
    donor = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in donor.items()}  # not a fresh init
    run = tmp_path / "pretrain_run"
    run.mkdir()
    save_file(donor, str(run / "encoder.safetensors"))

    model = build_model(cfg)
    plan, path = encoder_plan(run)  # a run dir
    assert plan is None and path == run / "encoder.safetensors"
    assert "tensors mapped" in load_encoder(model, path)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, donor[k])
    # the shared MONAI net sees the same tensors
    assert torch.equal(model.net.swinViT.patch_embed.proj.weight, donor["swinViT.patch_embed.proj.weight"])

    bad = dict(donor, extra_key=torch.zeros(1))
    bad.pop("swinViT.layers1.0.blocks.0.norm1.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="missing 1: swinViT.layers1.0.blocks.0.norm1.weight"):
        load_encoder(build_model(cfg), tmp_path / "bad.safetensors")

    # frozen encoder: encoder bitwise unchanged after training, decoder changed
    raw["adapt"] = {"mode": "frozen_encoder"}
    fcfg = downstream_config_from_dict(raw)
    finetune(fcfg, tmp_path / "frozen", encoder_path=str(run / "encoder.safetensors"), progress=False)
    step, weights = last_checkpoint_weights(tmp_path / "frozen")
    assert step == 3
    enc = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert enc.keys() == donor.keys()
    assert all(torch.equal(enc[k], donor[k]) for k in donor)
    torch.manual_seed(fcfg.train.seed)
    init = build_model(fcfg).state_dict()  # finetune builds its model right after seeding
    dec = [k for k in weights if not k.startswith(("encoder.", "net.swinViT."))]
    assert any(not torch.equal(weights[k], init[k]) for k in dec)

    # full mode: the encoder trains too
    full = adapt(build_model(cfg), cfg.adapt, 1e-3)
    assert sum(p.numel() for g in full.param_groups for p in g["params"]) == sum(
        p.numel() for p in build_model(cfg).parameters())


# --------------------------------------------------------------------------------------- fine-tune demo


def test_finetune_demo_reaches_dice_then_evaluate_compare_resume(tmp_path):
    """2D MNI152 GM/WM demo: train on left-hemisphere axial slices, validate on right-hemisphere slices."""
    from sslkit.downstream.evaluate import compare, evaluate
    from sslkit.downstream.train import finetune

    over = ["train.max_steps=60", "train.val_every=60", f"data.root={MNI_ROOT}",
            "train.val_cases=6", "train.batch_size=2",
            "model.args={feature_size: 12, window_size: 4, depths: [1, 1, 1, 1]}"]
    cfg = load_downstream_config(DEMO_2D, over)
    run = tmp_path / "demo"
    out = finetune(cfg, run, progress=False)
    assert out["best_dice"] > 0.6, out  # held-out mean Dice (GM, WM) after 60 steps; measured 0.70
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))  # one row per optimizer step
    assert rows[-1]["val_mean_dice"] == pytest.approx(out["best_dice"]) and "eta_s" in rows[0]
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert any((run / "tb").iterdir())  # TensorBoard, as in pretraining

    summary = evaluate(run, device="cpu", max_cases=6)
    assert summary["mean_dice"] == pytest.approx(out["best_dice"], abs=1e-6)
    for f in ("metrics.json", "per_case.csv", "report.md"):
        assert (run / "eval" / f).is_file()
    assert "grey_matter" in (run / "eval" / "report.md").read_text(encoding="utf-8")
    md = compare([run, run], tmp_path / "cmp.md")
    assert "white_matter" in md.read_text(encoding="utf-8") and md.with_suffix(".csv").is_file()

    # a new run refuses the directory; resume="auto" refuses another recipe; a finished run has nothing left to do
    with pytest.raises(UserError, match="already holds a run with checkpoints"):
        finetune(cfg, run, progress=False)
    cfg2 = load_downstream_config(DEMO_2D, over + ["optim.lr=0.01"])
    with pytest.raises(UserError, match="another recipe: optim.lr"):
        finetune(cfg2, run, resume="auto", progress=False)
    out2 = finetune(load_downstream_config(DEMO_2D, over), run, resume="auto", progress=False)
    assert out2["steps"] == 60  # already done: nothing more to train


# ------------------------------------------------------------------------------------------ data & config


def test_label_image_shape_mismatch_names_both_files(tmp_path):
    from sslkit.downstream.train import finetune

    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), str(tmp_path / "im.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 22), np.uint8), np.eye(4)), str(tmp_path / "lb.nii.gz"))
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "im.nii.gz", "label": "lb.nii.gz"}],
                                                    "validation": [{"image": "im.nii.gz", "label": "lb.nii.gz"}]}))
    cfg = downstream_config_from_dict({"data": {"root": str(tmp_path / "list.json"), "roi": [16, 16, 16],
                                                "spacing": []}, "model": {"name": "_test_threshold"}})
    with pytest.raises(DataError, match=r"lb\.nii\.gz.*\(20, 20, 22\).*im\.nii\.gz.*\(20, 20, 20\)"):
        finetune(cfg, tmp_path / "run", progress=False)


def test_recipes_load_and_config_errors():
    names = sorted(p.name for p in (ROOT / "downstream").glob("*.yaml"))
    assert {"btcv.yaml", "demo_mni_gm_wm.yaml"} <= set(names)
    assert {f"msd_task{i:02d}.yaml" for i in range(1, 11)} <= set(names)
    for n in names:
        load_downstream_config(ROOT / "downstream" / n)
    btcv = load_downstream_config(ROOT / "downstream" / "btcv.yaml")
    assert btcv.data.spacing == [1.5, 1.5, 2.0] and btcv.data.intensity_range == [-175.0, 250.0]
    assert btcv.data.num_classes == 14 and btcv.train.sw_overlap == 0.5
    with pytest.raises(ConfigError, match="did you mean 'train.sw_overlap'"):
        downstream_config_from_dict({"train": {"sw_overlpa": 0.5}})
    with pytest.raises(ConfigError, match="adapt.mode"):
        downstream_config_from_dict({"adapt": {"mode": "lora"}})


def test_btcv_split_and_num_labelled(tmp_path):
    from sslkit.downstream.data import list_cases

    img, lab = tmp_path / "RawData" / "Training" / "img", tmp_path / "RawData" / "Training" / "label"
    img.mkdir(parents=True)
    lab.mkdir(parents=True)
    ids = list(range(1, 11)) + list(range(21, 41))
    for i in ids:
        (img / f"img{i:04d}.nii.gz").touch()
        (lab / f"label{i:04d}.nii.gz").touch()
    cfg = load_downstream_config(ROOT / "downstream" / "btcv.yaml", [f"data.root={tmp_path}"])
    train, val = list_cases(cfg.data)
    assert len(train) == 24 and [Path(c["image"]).name for c in val] == [f"img{i:04d}.nii.gz" for i in range(35, 41)]
    cfg.data.num_labelled = 3
    t3, v3 = list_cases(cfg.data)
    assert len(t3) == 3 and v3 == val and t3 == list_cases(cfg.data)[0]  # seeded
    cfg.data.num_labelled = 1
    t1 = list_cases(cfg.data)[0]
    cfg.data.num_labelled = 7
    t7 = list_cases(cfg.data)[0]
    assert t1[0] in t3 and all(c in t7 for c in t3)  # nested budgets: 1 in 3 in 7
    cfg.data.num_labelled = 25
    with pytest.raises(DataError, match="num_labelled: 25 is more than the 24 training cases"):
        list_cases(cfg.data)
    cfg.data.num_labelled = 24
    assert len(list_cases(cfg.data)[0]) == 24  # every case, with a warning line


def test_predict_dicom_series_keeps_series_geometry(tmp_path):
    """An oblique, anisotropic DICOM series (written with SimpleITK) -> NIfTI with the series' geometry."""
    import SimpleITK as sitk
    from nilearn import datasets

    from sslkit.downstream.predict import predict

    t1 = np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), np.float32)[20:80, 25:95, 20:60]
    img = sitk.GetImageFromArray((t1 * 1000).astype(np.int16).transpose(2, 1, 0))
    img.SetSpacing((0.9, 1.3, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])  # in-plane oblique
    img.SetDirection(direction.ravel().tolist())
    dcm = tmp_path / "series"
    dcm.mkdir()
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    iop = "\\".join(f"{x:.6f}" for x in list(direction[:, 0]) + list(direction[:, 1]))
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        pos = "\\".join(f"{x:.6f}" for x in img.TransformIndexToPhysicalPoint((0, 0, i)))
        for k, v in [("0008|0060", "CT"), ("0020|000e", uid + ".1"), ("0020|000d", uid + ".2"),
                     ("0020|0013", str(i + 1)), ("0020|0037", iop), ("0020|0032", pos), ("0018|0050", "2.5"),
                     ("0008|0018", f"{uid}.1.{i + 1}")]:
            sl.SetMetaData(k, v)
        w.SetFileName(str(dcm / f"s{i:03d}.dcm"))
        w.Execute(sl)
    cfg = downstream_config_from_dict({
        "data": {"layout": "datalist", "root": "unused.json", "spacing": [2.0, 2.0, 2.0], "modality": "ct",
                 "intensity_range": [0.0, 1000.0], "roi": [32, 32, 32]}, "model": {"name": "_test_threshold"}})
    ck = threshold_model_file(cfg, tmp_path / "model.safetensors")
    out = predict(ck, dcm, tmp_path / "pred", device="cpu")
    r = sitk.ImageSeriesReader()
    r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dcm)))
    src, seg = r.Execute(), sitk.ReadImage(str(out[0]))
    assert src.GetSize() == seg.GetSize()
    assert np.allclose(src.GetSpacing(), seg.GetSpacing(), atol=1e-4)
    assert np.allclose(src.GetOrigin(), seg.GetOrigin(), atol=1e-3)
    assert np.allclose(src.GetDirection(), seg.GetDirection(), atol=1e-5)
    truth = sitk.GetArrayFromImage(src) > 500
    assert (sitk.GetArrayFromImage(seg).astype(bool) == truth).mean() > 0.93


@pytest.mark.parametrize("schedule", ["constant", "one_cycle"])
def test_finetune_resumes_mid_run_exactly(tmp_path, monkeypatch, schedule):
    """A fine-tuning run that dies right after its step-2 checkpoint resumes to the same weights, optimizer
    state, lr schedule and metrics as an uninterrupted run."""
    import sslkit.downstream.train as T
    import sslkit.run as R

    cfg = downstream_config_from_dict(_tiny_cfg(tmp_path, schedule, max_steps=4, val_every=2))
    T.finetune(cfg, tmp_path / "full", progress=False)

    class Crash(Exception):
        pass

    real_finish = R.finish_checkpoint

    def finish_then_crash(tmp, step, *a, **k):
        out = real_finish(tmp, step, *a, **k)
        if step == 2:
            raise Crash
        return out

    monkeypatch.setattr(R, "finish_checkpoint", finish_then_crash)
    with pytest.raises(Crash):
        T.finetune(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(R, "finish_checkpoint", real_finish)
    assert last_checkpoint_weights(tmp_path / "cut")[0] == 2
    T.finetune(cfg, tmp_path / "cut", resume="auto", progress=False)

    (sa, a), (sb, b) = last_checkpoint_weights(tmp_path / "full"), last_checkpoint_weights(tmp_path / "cut")
    assert sa == sb == 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [ln for ln in (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    strip = lambda r: {k: v for k, v in json.loads(r).items() if k not in ("eta_s", "step_time", "samples_per_s", "time")}
    assert [strip(r) for r in rows(tmp_path / "full")] == [strip(r) for r in rows(tmp_path / "cut")]


def test_normalised_surface_dice_matches_monai_and_its_limits():
    from monai.metrics import compute_surface_dice

    from sslkit.downstream.metrics import case_metrics

    gt = torch.zeros(24, 24, 24, dtype=torch.long)
    gt[5:15, 5:15, 5:15] = 1
    gt[16:20, 16:20, 16:20] = 2
    shifted = torch.roll(gt, 1, dims=0)
    for tol, spacing in ((0.5, 1.0), (1.5, 1.0), (3.0, 2.0)):
        m = case_metrics(shifted, gt, 3, spacing, nsd_tolerance=[tol, tol])
        oh = lambda t: torch.nn.functional.one_hot(t, 3).movedim(-1, 0)[None].float()  # noqa: E731
        ref = compute_surface_dice(oh(shifted), oh(gt), [tol, tol], include_background=False, spacing=spacing)[0]
        assert m["nsd"] == pytest.approx(ref.tolist())
    assert case_metrics(shifted, gt, 3, 1.0, nsd_tolerance=1.5)["nsd"] == pytest.approx([1.0, 1.0])
    assert case_metrics(gt, gt, 3, 1.0)["nsd"] == [1.0, 1.0]
    missed = gt.clone()
    missed[missed == 2] = 0
    assert case_metrics(missed, gt, 3, 1.0)["nsd"][1] == 0.0
