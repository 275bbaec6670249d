"""Export a run's student encoder, and probe a checkpoint, without DeepSpeed or unpickling."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from sslkit.engine import checkpoint as C
from sslkit.errors import UserError


def find_checkpoint(path: Path, checkpoint: str | None = None) -> Path:
    """A checkpoint directory: given, the newest in a run directory, or `path` itself."""
    if checkpoint:
        path = Path(checkpoint)
    if (path / C.COMPLETE).is_file():
        return path
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint directory")
    found = C.latest_checkpoint(path / "checkpoints")
    if found is None:
        raise UserError(f"{path}: no complete checkpoint under {path / 'checkpoints'}")
    return found


def encoder_state(ckpt: Path) -> dict[str, torch.Tensor]:
    student = C.load_student_state(ckpt)
    enc = {k[len("encoder."):]: v for k, v in student.items() if k.startswith("encoder.")}
    if not enc:
        raise UserError(f"{ckpt}: the checkpoint holds no encoder weights")
    return enc


def export_from_run(run_dir: Path, out: Path, checkpoint: str | None = None) -> tuple[Path, int]:
    ckpt = find_checkpoint(run_dir, checkpoint)
    enc = encoder_state(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in enc.items()}, str(tmp), metadata={"source": str(ckpt)})
    os.replace(tmp, out)
    return out, len(enc)


def probe_checkpoint(path: Path, n_crops: int | None = None) -> dict:
    """Collapse statistics of a checkpoint's encoder on the run's fixed probe crops."""
    from sslkit.config import load_config
    from sslkit.data import PretrainDataset, load_datalist
    from sslkit.models import build_encoder
    from sslkit.monitor.monitor import probe_statistics

    ckpt = find_checkpoint(path)
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    m = cfg.model
    encoder = build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)
    encoder.load_state_dict(encoder_state(ckpt), strict=True)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir.parent / ".cache" / "sslkit"
    ds = PretrainDataset(load_datalist(cfg.data.datalist, key=cfg.data.datalist_key), cfg.data, cache,
                         seed=cfg.train.seed, skipped_log=None)
    ds.prepare(progress=False)
    crops = ds.probe_crops(n_crops or cfg.monitor.probe_crops)
    stats = probe_statistics(encoder, crops)
    return {"checkpoint": str(ckpt), **stats}
