"""Label maps for new scans, written in each input's exact original geometry.

The model runs on the recipe's pre-processed grid (orientation RAS, `data.spacing`, intensity window, foreground
crop). The predicted label map is taken back with MONAI `Invertd` (inverse of every spatial transform,
nearest-neighbour), then checked against the input: same shape and affine (within 1e-3 mm), else an error.
The NIfTI is written with the input's own affine / header (NIfTI input) or the series / file geometry
(DICOM series or NRRD / MHA, read with SimpleITK: origin, spacing and direction copied).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from sslkit.errors import DataError

_NIFTI = (".nii", ".nii.gz")
_SITK = (".nrrd", ".mha", ".mhd", ".nhdr")


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(_NIFTI)


def _dicom_series(d: Path) -> list[str] | None:
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d))
    if not ids:
        return None
    # the series with the most slices
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), i) for i in ids), key=len)
    return list(files)


def _inputs(path: Path) -> list[tuple[str, Path, list[str] | None]]:
    """[(output stem, path, dicom files or None)]"""
    if path.is_file():
        if not (_is_nifti(path) or path.name.endswith(_SITK)):
            raise DataError(f"{path}: not a NIfTI / NRRD / MHA file or a DICOM series folder")
        return [(path.name.split(".")[0], path, None)]
    if not path.is_dir():
        raise DataError(f"{path}: input not found")
    files = _dicom_series(path)
    if files:
        return [(path.name, path, files)]
    found = sorted(p for p in path.iterdir() if p.is_file() and (_is_nifti(p) or p.name.endswith(_SITK)))
    if not found:
        raise DataError(f"{path}: no NIfTI / NRRD / MHA files and no DICOM series")
    return [(p.name.split(".")[0], p, None) for p in found]


@torch.no_grad()
def _predict_nifti(model, cfg, device, src: Path) -> np.ndarray:
    """NIfTI file -> label map (*original spatial shape) in the file's voxel grid."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from sslkit.downstream.data import eval_transforms
    from sslkit.downstream.evaluate import infer_logits, plain

    pre = eval_transforms(cfg.data, with_label=False)
    try:
        d = pre({"image": str(src)})
    except RuntimeError as e:
        raise DataError(f"{src}: cannot pre-process ({str(e.__cause__ or e).splitlines()[0][:160]})") from None
    img = d["image"]
    if img.shape[0] != cfg.data.in_channels:
        raise DataError(f"{src}: {img.shape[0]} channels, the model expects {cfg.data.in_channels}")
    logits = infer_logits(model, plain(img)[None], cfg, device)  # (1, K, *S')
    lab = logits.argmax(1).cpu().float()  # (1, *S')
    d["pred"] = MetaTensor(lab, affine=img.affine.clone(), meta={k: v for k, v in img.meta.items() if k != "affine"},
                           applied_operations=list(img.applied_operations))
    inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)
    out = inv(d)["pred"]
    return np.asarray(plain(out)[0].round().cpu().numpy())


def predict(ckpt: str | Path, input_path: str | Path, output_dir: str | Path, device: str = "auto") -> list[Path]:
    """Segment a scan, a folder of scans or a DICOM series folder; returns the written `<name>_seg.nii.gz` paths.

    `ckpt`: a finetune checkpoint (`best.pt`) or a finetune run dir (uses checkpoints/best.pt).
    """
    import nibabel as nib
    import SimpleITK as sitk

    from sslkit.downstream.adapt import model_from_checkpoint
    from sslkit.downstream.evaluate import resolve_device

    model, cfg, _ = model_from_checkpoint(ckpt)
    dev = resolve_device(device)
    model.to(dev).eval()
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if cfg.data.num_classes <= 255 else np.int16
    written = []
    for stem, path, dicom in _inputs(Path(input_path)):
        dst = out_dir / f"{stem}_seg.nii.gz"
        if dicom is None and _is_nifti(path):
            ref = nib.load(str(path))
            lab = _predict_nifti(model, cfg, dev, path)
            shape = ref.shape[: lab.ndim]
            if lab.shape != tuple(shape):
                raise RuntimeError(f"{path}: inverted prediction {lab.shape} != input grid {shape}")
            hdr = ref.header.copy()
            hdr.set_data_dtype(dtype)
            nii = nib.Nifti1Image(lab.astype(dtype), ref.affine, header=hdr)
            nii.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
            nii.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
            nib.save(nii, str(dst))
        else:  # DICOM series / NRRD / MHA: via a temporary NIfTI written by SimpleITK (LPS -> RAS handled there)
            try:
                if dicom is not None:
                    reader = sitk.ImageSeriesReader()
                    reader.SetFileNames(dicom)
                    simg = reader.Execute()
                else:
                    simg = sitk.ReadImage(str(path))
            except RuntimeError as e:
                raise DataError(f"{path}: SimpleITK cannot read it ({str(e).strip().splitlines()[-1][:160]})") \
                    from None
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "input.nii.gz"
                sitk.WriteImage(simg, str(src))
                lab = _predict_nifti(model, cfg, dev, src)
            size = tuple(simg.GetSize())[: lab.ndim]
            if lab.shape != size:
                raise RuntimeError(f"{path}: inverted prediction {lab.shape} != input grid {size}")
            out = sitk.GetImageFromArray(lab.astype(dtype).transpose(*reversed(range(lab.ndim))))
            out.SetOrigin(simg.GetOrigin()[: lab.ndim])
            out.SetSpacing(simg.GetSpacing()[: lab.ndim])
            dm = np.array(simg.GetDirection()).reshape(simg.GetDimension(), -1)[: lab.ndim, : lab.ndim]
            out.SetDirection(dm.ravel().tolist())
            sitk.WriteImage(out, str(dst))
        written.append(dst)
    return written
