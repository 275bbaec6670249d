"""Label maps for new scans, written in each input's own voxel grid, preprocessed by the model's plan.

The model runs on its plan's grid (orientation RAS, spacing, intensity scheme, foreground crop: the one stack of
sslkit.data.preprocess, reading NIfTI, NRRD / MHA and DICOM series alike). The predicted label map is taken back
with MONAI `Invertd` (inverse of every spatial step, nearest-neighbour) onto the scan's voxel grid and written as
NIfTI: with the input's own header for NIfTI input, with the series' / file's geometry (LPS -> RAS) otherwise.
Each input is compared with what the model saw in training (spacing, field of view, intensity after
preprocessing); an input far from it gets one warning line saying how.
An input the readers refuse stops with one `sslkit: error:` line naming it (exit 2) and no label map: a 2-D image,
a `.nii.gz` that is not gzip, a truncated file, NaN / inf voxels (never filled with a guessed value: a map over
undefined voxels would look valid), a DICOM series with missing slices or two images at one position (see
sslkit.data.readers). In a folder of scans, a DICOM series that `sslkit data index` would leave out is skipped with
a warning line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from sslkit.errors import DataError, user_error_in


def scan_inputs(path: Path) -> list[tuple[str, Path]]:
    """[(output stem, scan path)] for a scan file, a DICOM series folder, or a folder of scans (as indexed by
    `sslkit data index`)."""
    from sslkit.data.datalist import index_folder
    from sslkit.data.readers import SCAN_SUFFIXES, has_suffix, is_dicom_series_dir

    if path.is_file():
        if not has_suffix(path, SCAN_SUFFIXES):
            raise DataError(f"{path}: not a NIfTI / NRRD / MHA file or a DICOM series folder")
        return [(_stem(path), path)]
    if not path.is_dir():
        raise DataError(f"{path}: input not found")
    if is_dicom_series_dir(path):
        return [(path.name, path)]
    found = [Path(e["image"]) for e in index_folder(path)]
    if not found:
        raise DataError(f"{path}: no NIfTI / NRRD / MHA files and no DICOM series")
    root = path.resolve()
    return [("__".join(p.relative_to(root).parts[:-1] + (_stem(p),)) if p != root else path.name, p) for p in found]


def _stem(p: Path) -> str:
    return p.name.split(".")[0]


@torch.no_grad()
def predict_scan(model, cfg, device, src: Path, seen: dict | None = None):
    """(label map (*original spatial shape) on the scan's voxel grid, its RAS affine, warnings) of one scan."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from sslkit.downstream.data import eval_transforms
    from sslkit.downstream.evaluate import infer_logits, plain
    from sslkit.downstream.from_plan import case_stats, input_warnings

    pre = eval_transforms(cfg.data, with_label=False)
    try:
        d = pre({"image": str(src)})
    except RuntimeError as e:
        inner = user_error_in(e)
        if inner is not None:
            raise inner from None
        raise DataError(f"{src}: cannot preprocess ({str(e.__cause__ or e).splitlines()[0][:160]})") from None
    img = d["image"]
    if img.shape[0] != cfg.model.in_channels:
        raise DataError(f"{src}: {img.shape[0]} channels, the model expects {cfg.model.in_channels}")
    warnings = input_warnings(case_stats(img), seen)
    logits = infer_logits(model, plain(img)[None], cfg, device)  # (1, K, *S')
    lab = logits.argmax(1).cpu().float()  # (1, *S')
    d["pred"] = MetaTensor(lab, affine=img.affine.clone(), meta={k: v for k, v in img.meta.items() if k != "affine"},
                           applied_operations=list(img.applied_operations))
    out = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)(d)["pred"]
    return np.asarray(plain(out)[0].round().cpu().numpy()), np.asarray(out.affine, dtype=np.float64), warnings


def predict(model_path: str | Path, input_path: str | Path, output_dir: str | Path,
            device: str = "auto") -> list[Path]:
    """Segment a scan, a folder of scans or a DICOM series folder; returns the written `<name>_seg.nii.gz` paths.

    `model_path`: a fine-tuning run directory (its best model), a checkpoint folder or a model.safetensors file.
    """
    import nibabel as nib

    from sslkit.data.readers import NIFTI_SUFFIXES, has_suffix
    from sslkit.downstream.adapt import load_finetuned
    from sslkit.run import pick_device

    model, cfg, plan, _ = load_finetuned(model_path)
    dev = pick_device(device)
    model.to(dev).eval()
    out_dir = Path(output_dir)  # made before the first label map is written: a failed predict leaves no folder
    dtype = np.uint8 if cfg.data.num_classes <= 255 else np.int16
    seen = (plan or {}).get("input_stats")
    written = []
    for stem, path in scan_inputs(Path(input_path)):
        lab, affine, warnings = predict_scan(model, cfg, dev, path, seen)
        if warnings:
            print(f"sslkit: warning: {path}: far from the training inputs: {'; '.join(warnings)}", file=sys.stderr,
                  flush=True)
        dst = out_dir / f"{stem}_seg.nii.gz"
        if has_suffix(path, NIFTI_SUFFIXES):
            ref = nib.load(str(path))
            if lab.shape != tuple(ref.shape[: lab.ndim]):
                raise RuntimeError(f"{path}: inverted prediction {lab.shape} != input grid {ref.shape}")
            hdr = ref.header.copy()
            hdr.set_data_dtype(dtype)
            nii = nib.Nifti1Image(lab.astype(dtype), ref.affine, header=hdr)
            nii.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
            nii.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
        else:  # DICOM series / NRRD / MHA: the reader's RAS affine of the series / file geometry
            nii = nib.Nifti1Image(lab.astype(dtype), affine if affine.shape == (4, 4) else _affine_4x4(affine))
            nii.header.set_xyzt_units("mm")
            nii.set_qform(nii.affine, code=1)
            nii.set_sform(nii.affine, code=1)
        out_dir.mkdir(parents=True, exist_ok=True)
        nib.save(nii, str(dst))
        written.append(dst)
    return written


def _affine_4x4(a: np.ndarray) -> np.ndarray:
    """A 2-D image's 3x3 affine as NIfTI's 4x4."""
    out = np.eye(4)
    out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
    return out
