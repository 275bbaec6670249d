"""A fine-tuned segmentation model as a MONAI bundle that MONAI's bundle runner executes.

    out_dir/
      LICENSE
      configs/metadata.json     MONAI bundle metadata (versions, task, network_data_format from the plan)
      configs/inference.json    ConfigWorkflow: sslkit preprocessing -> sliding window -> argmax -> Invertd ->
                                SaveImaged
      configs/sslkit_model.json the model's resolved DownstreamConfig and plan (what builds the network and the
                                preprocessing; the one copy of both)
      models/model.pt           the fine-tuned state dict (torch.save of tensors; MONAI's CheckpointLoader reads it)
      docs/README.md            what the model is, its preprocessing, how to run it

    python -m monai.bundle run --config_file B/configs/inference.json --meta_file B/configs/metadata.json \
        --bundle_root B --dataset_dir SCAN_OR_FOLDER --output_dir OUT

The bundle needs sslkit installed: the network (`bundle_network`), the preprocessing (`bundle_preprocessing`, i.e.
`eval_transforms` of the stored config: sslkit's readers, orientation RAS, spacing, intensity scheme, foreground
crop) and, for a `data.slices` 2-D model, the slice-by-slice inference (`SliceStackInferer`) are sslkit code
referenced with `_target_`, so a bundle preprocesses and infers exactly as `sslkit predict` does. A 3-D model runs
under MONAI's own `SlidingWindowInferer` with the recipe's roi / overlap / mode / sw_batch_size (the same function
`sslkit predict` calls). The label map is the argmax of the logits taken back onto the scan's voxel grid by MONAI
`Invertd` (nearest neighbour) and written by `SaveImaged` as `<scan>_seg.nii.gz` (uint8, int16 past 255 classes)
with the scan's affine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from monai.inferers import Inferer

from sslkit.errors import ConfigError, UserError

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
MODEL_JSON = "configs/sslkit_model.json"
# Packages the bundle needs beside MONAI and torch: sslkit (network, preprocessing), nibabel (SaveImaged),
# pytorch-ignite (SupervisedEvaluator, CheckpointLoader), fire (the `python -m monai.bundle` command line).
REQUIRED_PACKAGES = ("nibabel", "pytorch-ignite", "fire")


# ------------------------------------------------------------------------ components the bundle's config names


def read_model_json(path: str | Path) -> tuple[object, dict]:
    """(DownstreamConfig, plan) stored in a bundle's configs/sslkit_model.json."""
    from sslkit.downstream.config import downstream_config_from_dict

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: not found (is --bundle_root the bundle's folder?)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict) or "config" not in raw:
        raise ConfigError(f"{p}: no 'config' (not written by sslkit export --format monai-bundle)")
    return downstream_config_from_dict(raw["config"]), raw.get("plan") or {}


def bundle_network(model_json: str | Path) -> torch.nn.Module:
    """The segmenter of the stored config with freshly initialised weights (the bundle's CheckpointLoader then
    loads models/model.pt into it strictly): input (B, C_in, *roi) -> logits (B, num_classes, *roi)."""
    from sslkit.downstream.adapt import _without_checkpoint, build_model

    cfg, _ = read_model_json(model_json)
    return build_model(_without_checkpoint(cfg))


def bundle_preprocessing(model_json: str | Path):
    """sslkit's preprocessing of the stored config for `{"image": path}` items (`eval_transforms(cfg.data,
    with_label=False)`, the chain `sslkit predict` runs): image (C, *S') float32 MetaTensor that Invertd undoes."""
    from sslkit.downstream.data import eval_transforms

    cfg, _ = read_model_json(model_json)
    return eval_transforms(cfg.data, with_label=False)


def scan_files(path: str | Path) -> list[str]:
    """The scans a path names, as `sslkit predict` finds them: a NIfTI / NRRD / MHA file, a DICOM series folder, or
    a folder searched recursively for both."""
    from sslkit.downstream.predict import scan_inputs

    return [str(p) for _, p in scan_inputs(Path(path))]


def scan_root(path: str | Path) -> str:
    """SaveImaged's data_root_dir: a folder of scans (outputs keep the scans' sub-folders), "" for one scan file or
    one DICOM series folder (output named after it)."""
    from sslkit.data.readers import is_dicom_series_dir

    p = Path(path)
    return str(p) if p.is_dir() and not is_dicom_series_dir(p) else ""


class SliceStackInferer(Inferer):
    """A 2-D model on the axial (last-axis) slices of a volume, as sslkit trains and predicts it (`data.slices`):
    (B, C, H, W, D) -> (B, K, H, W, D) logits by `sslkit.downstream.slices.infer_by_slices` (2-D sliding window of
    `roi_size` per slice, each slice repeated `slice_channels` times)."""

    def __init__(self, roi_size, sw_batch_size: int = 4, overlap: float = 0.25, mode: str = "constant",
                 slice_channels: int = 1):
        super().__init__()
        self.cfg = SimpleNamespace(
            data=SimpleNamespace(roi=[int(r) for r in roi_size], slice_channels=int(slice_channels)),
            train=SimpleNamespace(sw_batch_size=int(sw_batch_size), sw_overlap=float(overlap), sw_mode=str(mode)))

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        from sslkit.downstream.evaluate import plain
        from sslkit.downstream.slices import infer_by_slices

        return infer_by_slices(network, plain(inputs), self.cfg, inputs.device).to(inputs.device)


# ------------------------------------------------------------------------------------------ the bundle's files


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def required_versions() -> dict[str, str]:
    """metadata.json's required_packages_version: sslkit and REQUIRED_PACKAGES at their installed versions (MONAI >= 1.4
    reads only this key: a legacy optional_packages_version is renamed onto it, replacing its content)."""
    from sslkit.version import __version__

    found = {p: _version_of(p) for p in REQUIRED_PACKAGES}
    missing = [p for p, v in found.items() if v is None]
    if missing:
        raise UserError(f"monai-bundle export: {', '.join(missing)} not installed; the bundle's workflow needs "
                        f"{'them' if len(missing) > 1 else 'it'}: pip install 'sslkit[bundle]'")
    return {"sslkit": __version__, **found}


def label_dtype(num_classes: int) -> str:
    """The label map's dtype: what `sslkit predict` writes."""
    return "uint8" if num_classes <= 255 else "int16"


def class_names(cfg) -> list[str]:
    """["background", foreground names...] (`class_<i>` where the recipe names none)."""
    from sslkit.downstream.evaluate import class_names as foreground

    return ["background"] + foreground(cfg)


def network_input_channels(cfg) -> int:
    return cfg.model.in_channels * (cfg.data.slice_channels if cfg.data.slices else 1)


def _value_range(cfg) -> list[float]:
    """[0, 1] after a window / percentile scheme; unknown ([]) after a z-score."""
    from sslkit.data.preprocess import scheme_of

    return [] if scheme_of(cfg.data, cfg.data.modality).startswith("zscore") else [0, 1]


def _input_channel_def(cfg) -> dict[str, str]:
    n, rep = cfg.model.in_channels, (cfg.data.slice_channels if cfg.data.slices else 1)
    names = ["image"] if n == 1 else [f"image channel {i}" for i in range(n)]
    return {str(i): names[i % n] + (f" (copy {i // n + 1} of {rep})" if rep > 1 else "") for i in range(n * rep)}


def network_data_format(cfg) -> dict:
    """metadata.json's network_data_format: the network's patch input (C_in, *roi) and its logits
    (num_classes, *roi); post_processed_outputs: the one-channel label map on the scan's grid."""
    ct = cfg.data.modality == "ct"
    names = class_names(cfg)
    shape = [int(r) for r in cfg.data.roi]
    return {
        "inputs": {"image": {
            "type": "image", "format": "hounsfield" if ct else "magnitude", "modality": "CT" if ct else "MR",
            "num_channels": network_input_channels(cfg), "spatial_shape": shape, "dtype": "float32",
            "value_range": _value_range(cfg), "is_patch_data": True, "channel_def": _input_channel_def(cfg)}},
        "outputs": {"pred": {
            "type": "image", "format": "labels", "num_channels": cfg.data.num_classes, "spatial_shape": shape,
            "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": {str(i): n for i, n in enumerate(names)}}},
        "post_processed_outputs": {"pred": {
            "type": "image", "format": "segmentation", "num_channels": 1,
            "spatial_shape": ["*", "*", "*"], "dtype": label_dtype(cfg.data.num_classes),
            "value_range": [0, cfg.data.num_classes - 1], "is_patch_data": False,
            "channel_def": {"0": ", ".join(f"{i} {n}" for i, n in enumerate(names))}}},
    }


def _task(cfg) -> str:
    return cfg.data.task or f"{cfg.data.layout} segmentation"


def eval_metrics(source: Path) -> dict:
    """{"val_mean_dice": ..., "best_step": ...} when `source` is a fine-tuning run's best model (the run's
    summary.json beside it holds its validation mean Dice); {} otherwise."""
    summary = source.parent / "summary.json"
    if source.name != "model.safetensors" or not summary.is_file():
        return {}
    try:
        s = json.loads(summary.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(s.get("best_dice"), (int, float)):
        return {}
    return {"val_mean_dice": float(s["best_dice"]), "best_step": int(s.get("best_step", -1))}


def metadata(cfg, source: Path, authors: str, copyright_: str) -> dict:
    """configs/metadata.json (MONAI bundle specification: the mandatory keys, the required packages, the plan's
    input / output format, the run's validation Dice when known)."""
    import monai
    import numpy as np

    from sslkit.version import __version__

    names = class_names(cfg)
    meta = {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by sslkit {__version__} from {source.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required_versions(),
        "name": f"sslkit {cfg.model.name} {_task(cfg)}",
        "task": f"{_task(cfg)}: {len(names) - 1}-class segmentation of {cfg.data.modality.upper()} scans",
        "description": f"{cfg.model.name} segmentation model ({cfg.model.spatial_dims}-D"
                       + (", on axial slices of volumes" if cfg.data.slices else "")
                       + f", adaptation '{cfg.adapt.mode}') fine-tuned with sslkit; preprocessing is the model's "
                         f"sslkit plan (configs/sslkit_model.json), run by sslkit code; see docs/README.md.",
        "authors": authors,
        "copyright": copyright_,
        "intended_use": "Research. Not for diagnostic use.",
        "data_source": f"{cfg.data.layout} layout at {cfg.data.root}" if cfg.data.root else cfg.data.layout,
        "data_type": "nibabel",
        "image_classes": f"{cfg.model.in_channels} channel(s) {cfg.data.modality.upper()}, preprocessed by the plan",
        "label_classes": ", ".join(f"{i} {n}" for i, n in enumerate(names)),
        "pred_classes": f"{len(names)} channels of logits; the saved label map is their argmax",
        "network_data_format": network_data_format(cfg),
    }
    metrics = eval_metrics(source)
    if metrics:
        meta["eval_metrics"] = metrics
    return meta


def inferer_config(cfg) -> dict:
    """MONAI SlidingWindowInferer with the recipe's window settings; SliceStackInferer for a `data.slices` model."""
    t, roi = cfg.train, [int(r) for r in cfg.data.roi]
    common = {"roi_size": roi, "sw_batch_size": int(t.sw_batch_size), "overlap": float(t.sw_overlap),
              "mode": str(t.sw_mode)}
    if cfg.data.slices:
        return {"_target_": "sslkit.downstream.bundle.SliceStackInferer", **common,
                "slice_channels": int(cfg.data.slice_channels)}
    return {"_target_": "SlidingWindowInferer", **common}


def inference_config(cfg) -> dict:
    """configs/inference.json: a SupervisedEvaluator over the scans of `dataset_dir` (a scan, a DICOM series folder
    or a folder of scans), weights from models/model.pt, label maps to `output_dir`."""
    mod = "sslkit.downstream.bundle"
    alias = "sslkit_bundle"  # MONAI binds `import a.b.c` to the name "a.b.c"; expressions need a plain name
    postprocessing = [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},  # (K, *S') logits -> (1, *S') labels
        {"_target_": "ToDeviced", "keys": "pred", "device": "cpu"},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": True, "to_tensor": True},  # -> (1, *S) on the scan's voxel grid
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_ext": ".nii.gz", "output_dtype": f"$numpy.{label_dtype(cfg.data.num_classes)}", "resample": False,
         "separate_folder": False, "data_root_dir": f"${alias}.scan_root(@dataset_dir)", "writer": "NibabelWriter"},
    ]
    return {
        "imports": [f"$import {mod} as {alias}", "$import numpy"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/inputs'",
        "output_dir": "$@bundle_root + '/eval'",
        "sslkit_model": f"$@bundle_root + '/{MODEL_JSON}'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "datalist": f"${alias}.scan_files(@dataset_dir)",
        "network_def": {"_target_": f"{mod}.bundle_network", "model_json": "@sslkit_model"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": f"{mod}.bundle_preprocessing", "model_json": "@sslkit_model"},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': p} for p in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer_config(cfg),
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "amp": False},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}, "map_location": "@device"},
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def _preprocessing_lines(cfg) -> list[str]:
    from sslkit.data.preprocess import preprocessing_params

    p = preprocessing_params(cfg.data, cfg.data.modality, 3 if cfg.data.slices else len(cfg.data.roi))
    spacing = p["spacing"] or "the scan's own"
    steps = [f"1. read with sslkit's readers (NIfTI, NRRD / MHA, DICOM series), {cfg.model.in_channels} channel(s)",
             "2. orientation RAS",
             f"3. resample to spacing {spacing} mm (bilinear; a value <= 0 keeps that axis)"]
    intensity = {"window": f"clip to the window {p.get('window')} HU, scale to [0, 1]",
                 "percentile": f"percentiles {p.get('percentiles')} -> [0, 1], clipped, per channel",
                 "zscore": "(x - mean) / std per channel", "zscore_nonzero": "(x - mean) / std over non-zero voxels, "
                                                                             "zeros kept, per channel"}[p["scheme"]]
    crop = "crop to the foreground (voxels > 0)" if p["crop_foreground"] else "no foreground crop"
    order = [f"intensity ({p['scheme']}): {intensity}", crop]
    if p["scheme"].startswith("zscore"):
        order.reverse()
    return steps + [f"{i}. {s}" for i, s in enumerate(order, start=4)]


def _inference_lines(cfg) -> list[str]:
    t = cfg.train
    window = (f"window {list(cfg.data.roi)}, overlap {t.sw_overlap}, blending {t.sw_mode}, "
              f"{t.sw_batch_size} windows per forward")
    if cfg.data.slices:
        return [f"- 2-D model on every axial slice (`SliceStackInferer`, sslkit's slice inference): {window}, "
                f"each slice repeated {cfg.data.slice_channels}x as channels"]
    return [f"- MONAI `SlidingWindowInferer`: {window}"]


def readme(cfg, plan: dict, source: Path) -> str:
    """docs/README.md."""
    from sslkit.version import __version__

    names = class_names(cfg)
    rec, src = plan.get("recipe") or {}, plan.get("source") or {}
    enc = plan.get("encoder") or {}
    model = [f"- segmenter `{cfg.model.name}` {json.dumps(cfg.model.args, sort_keys=True)}, "
             f"{cfg.model.spatial_dims}-D, {network_input_channels(cfg)} input channel(s), {len(names)} classes: "
             + ", ".join(f"{i} {n}" for i, n in enumerate(names)),
             f"- adaptation `{cfg.adapt.mode}`; encoder `{enc.get('name', cfg.model.name)}`",
             f"- recipe: {rec.get('name', 'not recorded')}; "
             f"source: {json.dumps(src, sort_keys=True) if src else 'not recorded'}",
             f"- exported by sslkit {__version__} from `{source.name}`"]
    run = [f"In a Python environment with sslkit >= {__version__} installed (it builds the network and "
           "preprocesses) with its `bundle` extra (MONAI's runner needs `fire` and `pytorch-ignite`):", "",
           "```bash", "pip install 'sslkit[bundle]'", "python -m monai.bundle run \\",
           "    --config_file BUNDLE/configs/inference.json --meta_file BUNDLE/configs/metadata.json \\",
           "    --bundle_root BUNDLE --dataset_dir SCAN_OR_FOLDER --output_dir OUT",
           "python -m monai.bundle verify_net_in_out network_def --config_file BUNDLE/configs/inference.json \\",
           "    --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE", "```", "",
           "`--dataset_dir` is a scan (NIfTI, NRRD, MHA), a DICOM series folder or a folder searched for both. "
           "Each scan gives `OUT/<name>_seg.nii.gz` (sub-folders of a folder kept): a "
           f"{label_dtype(cfg.data.num_classes)} label map on the scan's own voxel grid and affine, the same as "
           "`sslkit predict` writes. `sslkit predict` also warns about scans far from the training inputs and copies "
           "the input NIfTI header's other fields; the bundle does neither."]
    files = ["- `configs/inference.json`: the MONAI workflow (SupervisedEvaluator, CheckpointLoader)",
             "- `configs/metadata.json`: MONAI metadata; `network_data_format` is the network's patch input / logits",
             f"- `{MODEL_JSON}`: the model's resolved sslkit config and plan; the network and the preprocessing are "
             "built from it",
             "- `models/model.pt`: the fine-tuned state dict (`torch.load`, then `load_state_dict`)"]
    sections = [("Model", model), ("Preprocessing (the model's plan, run by sslkit code)", _preprocessing_lines(cfg)),
                ("Inference", _inference_lines(cfg) + [
                    "- argmax over the classes, then MONAI `Invertd` (nearest neighbour) back onto the scan's grid, "
                    "`SaveImaged`"]),
                ("Run", run), ("Files", files)]
    lines = [f"# {cfg.model.name}: {_task(cfg)}", "",
             "A segmentation model fine-tuned with sslkit, as a MONAI bundle. It needs **sslkit** installed "
             f"(>= {__version__}): the network, the preprocessing and (for 2-D slice models) the inference are sslkit "
             "code the config names with `_target_`."]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    lines += ["", "Research use only; not for diagnostic use."]
    return "\n".join(lines) + "\n"


def license_text(authors: str) -> str:
    return ("The configuration files of this bundle were written by sslkit (Apache License 2.0).\n"
            f"The model weights (models/model.pt) are the work of: {authors}. Their terms of use are those of the "
            "data they were trained on and of their authors.\n")


def export_monai_bundle(model_path: str | Path, out_dir: str | Path, authors: str | None = None,
                        copyright_: str | None = None) -> Path:
    """Write a fine-tuned model (a fine-tuning run directory, a checkpoint folder or a model.safetensors file) as a
    MONAI bundle folder `out_dir` (layout in the module docstring); returns `out_dir`."""
    from sslkit.downstream.adapt import load_finetuned
    from sslkit.downstream.data import volume_dims
    from sslkit.run import atomic_path, atomic_write_json, atomic_write_text
    from sslkit.version import __version__

    model, cfg, plan, source = load_finetuned(model_path)
    if volume_dims(cfg.data) != 3:
        # MONAI's SaveImaged cannot write a 2-D image's (C, H, W) label map with its 3x3 affine unresampled
        # (spatial_resample gets spatial_size None: MONAI issue #9068)
        raise UserError(f"{source}: monai-bundle export takes models of 3-D scans (3-D models, or 2-D models on "
                        f"their slices with data.slices); this one reads 2-D images (use sslkit predict)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: a MONAI bundle is a folder, and this is a file")
    authors = authors or f"not stated at export (sslkit {__version__} export of {source.name})"
    copyright_ = copyright_ or "not stated at export"
    with atomic_path(out / "models" / "model.pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_json(out / MODEL_JSON, {"sslkit_version": __version__, "source": str(source),
                                         "config": cfg.to_dict(), "plan": plan or {}}, indent=1)
    atomic_write_json(out / "configs" / "inference.json", inference_config(cfg), indent=4)
    atomic_write_json(out / "configs" / "metadata.json", metadata(cfg, source, authors, copyright_),
                      indent=4)
    atomic_write_text(out / "docs" / "README.md", readme(cfg, plan or {}, source))
    atomic_write_text(out / "LICENSE", license_text(authors))
    return out
