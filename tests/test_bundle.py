"""MONAI bundle export: MONAI's own bundle runner, on a real scan, writes the label map `sslkit predict` writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, cli, job_env
from sslkit.downstream.adapt import build_model, save_model
from sslkit.downstream.config import downstream_config_from_dict
from sslkit.errors import ConfigError, UserError

torch.set_num_threads(2)

LABELS = ["grey_matter", "white_matter"]
WINDOW = {"sw_overlap": 0.25, "sw_mode": "gaussian", "sw_batch_size": 4}
# Seeded models saved as `sslkit finetune` saves them: a 3-D QT-UNet (MONAI's SlidingWindowInferer) and a 2-D
# Swin-UNETR on the axial slices of volumes (data.slices: sslkit's slice inference; its segmenter shares tensors with
# MONAI's net). The runner test also exports a real 2-step `sslkit finetune` run.
RECIPES = {
    "qt_unet_3d": {
        "data": {"spacing": [4.0, 4.0, 4.0], "roi": [32, 32, 32]},
        "model": {"name": "qt_unet", "args": {"variant": "tiny", "window_size": 4}}},
    "swin_unetr_2d_slices": {
        "data": {"spacing": [4.0, 4.0, 4.0], "roi": [64, 64], "slices": True},
        "model": {"name": "swin_unetr", "spatial_dims": 2,
                  "args": {"feature_size": 12, "window_size": 4, "depths": [1, 1, 1, 1]}}},
}
# metadata.json keys the MONAI bundle specification makes mandatory, and those of each tensor format specifier
# (MONAI >= 1.4 folds the spec's optional_packages_version into required_packages_version)
SPEC_KEYS = {"schema": str, "version": str, "monai_version": str, "pytorch_version": str, "numpy_version": str,
             "required_packages_version": dict, "task": str, "description": str, "authors": str, "copyright": str,
             "network_data_format": dict}
# meta_schema_20240725.json, the schema metadata.json names, kept in tests/data so the check runs offline: the copy
# Project-MONAI/project-monai.github.io serves (public/schema/, "copied verbatim from the MONAI-extra-test-data 0.8.1
# release"); its md5, so that verify_metadata uses it instead of downloading
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
TENSOR_KEYS = {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
               "channel_def"}


def _config(kind: str, demo_dir: Path):
    r = RECIPES[kind]
    return downstream_config_from_dict({
        "data": {"layout": "mni_gm_wm", "root": str(demo_dir), "task": "MNI152_GM_WM", "num_classes": 3,
                 "label_names": LABELS, "modality": "mri", "crop_foreground": True, **r["data"]},
        "model": r["model"], "train": WINDOW})


def _model_file(kind: str, demo_dir: Path, tmp: Path) -> tuple[Path, dict]:
    """A fine-tuned-model file (weights + plan + config, as `sslkit finetune` saves it) of a seeded segmenter whose
    weights differ from any fresh initialisation; returns (file, its state dict)."""
    from sslkit.downstream.from_plan import segmenter_plan

    cfg = _config(kind, demo_dir)
    torch.manual_seed(1234)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp / "model.safetensors"
    save_model(model, cfg, segmenter_plan(cfg, None, {}), path)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _half_resolution_scan(demo_dir: Path, tmp: Path) -> Path:
    """The demo MNI152 T1 at every second voxel (99 x 117 x 95, 2 mm), its affine scaled to match."""
    src = nib.load(str(demo_dir / "mri_mni152_t1.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)[::2, ::2, ::2]
    affine = src.affine.copy()
    affine[:3, :3] *= 2.0
    out = tmp / "scans" / "mni_t1_2mm.nii.gz"
    out.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine), str(out))
    return out


def _parser(bundle: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    return parser


# ------------------------------------------------------------------------------------------ files and metadata


def test_bundle_files_metadata_weights_and_preprocessing(demo_dir, tmp_path):
    from monai.bundle import verify_net_in_out
    from monai.inferers import SlidingWindowInferer

    from sslkit.downstream.bundle import export_monai_bundle
    from sslkit.downstream.data import eval_transforms
    from sslkit.version import __version__

    cfg = _config("qt_unet_3d", demo_dir)
    model_file, state = _model_file("qt_unet_3d", demo_dir, tmp_path)
    bundle = export_monai_bundle(model_file, tmp_path / "bundle")
    for f in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/sslkit_model.json",
              "models/model.pt", "docs/README.md"):
        assert (bundle / f).is_file(), f

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key, kind in SPEC_KEYS.items():
        assert isinstance(meta[key], kind), key
    assert meta["required_packages_version"]["sslkit"] == __version__
    assert {"pytorch-ignite", "fire", "nibabel"} <= set(meta["required_packages_version"])
    assert "optional_packages_version" not in meta  # MONAI would copy it over required_packages_version
    fmt = meta["network_data_format"]
    image, logits = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert TENSOR_KEYS <= set(image) and TENSOR_KEYS <= set(logits)
    assert (image["num_channels"], image["spatial_shape"], image["modality"]) == (1, [32, 32, 32], "MR")
    assert logits["num_channels"] == 3 and list(logits["channel_def"].values()) == ["background", *LABELS]

    # models/model.pt: a plain state dict of tensors (no pickled code), equal to the fine-tuned weights
    saved = torch.load(str(bundle / "models" / "model.pt"), weights_only=True)
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)

    # the config's components: MONAI's sliding window with the recipe's settings, sslkit's own preprocessing chain
    parser = _parser(bundle)
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SlidingWindowInferer)
    assert (list(inferer.roi_size), inferer.overlap, inferer.mode.value, inferer.sw_batch_size) == \
        ([32, 32, 32], 0.25, "gaussian", 4)
    scan = _half_resolution_scan(demo_dir, tmp_path)
    ours = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    ref = eval_transforms(cfg.data, with_label=False)({"image": str(scan)})["image"]
    assert ours.shape == ref.shape and torch.equal(ours.as_tensor(), ref.as_tensor())
    assert torch.equal(ours.affine, ref.affine)
    assert [op["class"] for op in ours.applied_operations] == [op["class"] for op in ref.applied_operations]

    # MONAI's check that the metadata's input / output format is what the network takes and gives
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu", bundle_root=str(bundle))


def test_metadata_passes_monai_schema(demo_dir, tmp_path):
    """`monai.bundle verify_metadata` (jsonschema, from the test extra) on the exported metadata.json, against the
    schema it names (the copy in tests/data: nothing is downloaded); a metadata.json missing a required key fails."""
    import monai.bundle
    from jsonschema.exceptions import ValidationError

    from sslkit.downstream.bundle import export_monai_bundle

    model_file, _ = _model_file("swin_unetr_2d_slices", demo_dir, tmp_path)
    bundle = export_monai_bundle(model_file, tmp_path / "bundle")
    meta = bundle / "configs" / "metadata.json"
    assert json.loads(meta.read_text())["schema"].endswith("/" + SCHEMA.name)
    schema = shutil.copy(SCHEMA, tmp_path / SCHEMA.name)
    monai.bundle.verify_metadata(meta_file=str(meta), filepath=str(schema), hash_val=SCHEMA_MD5)
    broken = json.loads(meta.read_text())
    del broken["network_data_format"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError) as e:  # MONAI re-raises the schema's ValidationError as a ValueError
        monai.bundle.verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema),
                                     hash_val=SCHEMA_MD5)
    assert isinstance(e.value.__cause__, ValidationError) and "network_data_format" in str(e.value.__cause__)


def test_bundle_errors_name_the_file(demo_dir, tmp_path):
    from sslkit.downstream.bundle import bundle_network, export_monai_bundle

    model_file, _ = _model_file("swin_unetr_2d_slices", demo_dir, tmp_path)
    target = tmp_path / "taken"
    target.write_text("a file")
    with pytest.raises(UserError, match="taken: a MONAI bundle is a folder"):
        export_monai_bundle(model_file, target)
    with pytest.raises(ConfigError, match="sslkit_model.json: not found"):
        bundle_network(tmp_path / "nowhere" / "configs" / "sslkit_model.json")
    flat = downstream_config_from_dict({  # a 2-D model of 2-D images: refused before anything is written
        "data": {"layout": "datalist", "root": "unused.json", "num_classes": 3, "spacing": [2.0, 2.0],
                 "modality": "mri", "roi": [64, 64]},
        "model": RECIPES["swin_unetr_2d_slices"]["model"]})
    save_model(build_model(flat), flat, {}, tmp_path / "flat.safetensors")
    with pytest.raises(UserError, match="flat.safetensors: monai-bundle export takes models of 3-D scans"):
        export_monai_bundle(tmp_path / "flat.safetensors", tmp_path / "flat_bundle")
    assert not (tmp_path / "flat_bundle").exists()
    encoder = tmp_path / "encoder.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(encoder))
    with pytest.raises(ConfigError, match="encoder.safetensors"):
        export_monai_bundle(encoder, tmp_path / "bundle")


# --------------------------------------------------------------------------- MONAI's runner vs sslkit predict


def run_bundle(bundle: Path, dataset: Path, out: Path) -> subprocess.CompletedProcess:
    """`python -m monai.bundle run` on the CPU (as `sslkit predict --device cpu` runs), one thread."""
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str(bundle / "configs" / "inference.json"),
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(dataset), "--output_dir", str(out)]
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=900,
                          env=job_env(CUDA_VISIBLE_DEVICES=""), cwd=str(bundle.parent))


def finetuned_run(demo_dir: Path, tmp: Path) -> Path:
    """A 2-step `sslkit finetune` of the GM / WM demo recipe (3-D QT-UNet-T, 4 mm): a real fine-tuning run."""
    run = tmp / "finetune_run"
    res = cli("finetune", "--cfg", str(REPO / "downstream" / "demo_mni_gm_wm.yaml"), "--run-dir", str(run),
              "--set", f"data.root={demo_dir}", "--set", "train.max_steps=2", "--set", "train.val_every=2",
              "--set", "data.spacing=[4.0,4.0,4.0]")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["finetuned_qt_unet_3d", "swin_unetr_2d_slices"])
def test_monai_bundle_runner_gives_sslkit_predict_labels(demo_dir, tmp_path, kind):
    from sslkit.downstream.bundle import export_monai_bundle
    from sslkit.downstream.predict import predict

    if kind == "finetuned_qt_unet_3d":
        model_file = finetuned_run(demo_dir, tmp_path)  # the run directory: its best model
    else:
        model_file, _ = _model_file(kind, demo_dir, tmp_path)
    bundle = export_monai_bundle(model_file, tmp_path / "bundle")
    if kind == "finetuned_qt_unet_3d":  # the run's validation Dice travels into the metadata
        best = json.loads((model_file / "summary.json").read_text())["best_dice"]
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert meta["eval_metrics"]["val_mean_dice"] == pytest.approx(best)
    scan = _half_resolution_scan(demo_dir, tmp_path)

    res = run_bundle(bundle, scan.parent, tmp_path / "bundle_out")
    assert res.returncode == 0, res.stderr[-3000:]
    ours = nib.load(str(tmp_path / "bundle_out" / "mni_t1_2mm_seg.nii.gz"))
    ref = nib.load(str(predict(model_file, scan, tmp_path / "predict_out", device="cpu")[0]))
    src = nib.load(str(scan))

    assert ours.shape == ref.shape == src.shape
    assert np.allclose(ours.affine, ref.affine, atol=1e-5) and np.allclose(ours.affine, src.affine, atol=1e-5)
    a, b = np.asarray(ours.dataobj), np.asarray(ref.dataobj)
    assert a.dtype == b.dtype == np.uint8
    assert len(np.unique(b)) == 3  # the seeded model predicts every class: agreement is not between blank maps
    agreement = float((a == b).mean())
    print(f"{kind}: bundle vs predict voxel agreement {agreement:.6f} on {a.size} voxels")
    assert agreement >= 0.999
