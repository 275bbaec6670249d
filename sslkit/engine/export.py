"""Export a run's student encoder with its plan, and probe a checkpoint, without DeepSpeed or unpickling."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslkit import run as R
from sslkit.errors import UserError
from sslkit.plan import read_weights, write_weights


def find_checkpoint(path: Path, checkpoint: str | None = None) -> Path:
    """A valid checkpoint directory: the one given (checked), `path` itself, or the newest valid one of a run."""
    if checkpoint:
        return R.require_valid_checkpoint(checkpoint)
    path = Path(path)
    if (path / R.COMPLETE).is_file():
        return R.require_valid_checkpoint(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint directory")
    found = R.newest_valid_checkpoint(path / R.CHECKPOINTS,
                                      warn=lambda line: print(f"sslkit: warning: {line}", file=sys.stderr, flush=True))
    if found is None:
        raise UserError(f"{path}: no valid checkpoint under {path / R.CHECKPOINTS}")
    return found


def encoder_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(encoder weights, plan) of a pretraining checkpoint."""
    student, plan = read_weights(ckpt / "student.safetensors")
    enc = {k[len("encoder."):]: v for k, v in student.items() if k.startswith("encoder.")}
    if not enc:
        raise UserError(f"{ckpt}: the checkpoint holds no encoder weights")
    return enc, plan


def export_from_run(run_dir: Path, out: Path, checkpoint: str | None = None) -> tuple[Path, int]:
    """Write the encoder of a run's newest valid (or the named) checkpoint, with its plan, as safetensors."""
    ckpt = find_checkpoint(run_dir, checkpoint)
    enc, plan = encoder_state(ckpt)
    if plan is not None:
        plan = {**plan, "source": {**plan.get("source", {}), "checkpoint": str(ckpt),
                                   "step": R.checkpoint_step(ckpt)}}
    write_weights(out, enc, plan)
    return out, len(enc)


def last_health(run_dir: Path) -> dict:
    """The monitor's last figures of a run (metrics.jsonl's last row with monitor / probe values), for model cards."""
    for row in reversed(R.read_jsonl(Path(run_dir) / "metrics.jsonl")):
        figures = {k: v for k, v in row.items() if k.startswith(("monitor/", "probe/")) and isinstance(v, float)}
        if figures:
            return {"step": row.get("step"), **figures}
    return {}


def export_encoder_as(run_dir: Path, out: Path, fmt: str = "sslkit", checkpoint: str | None = None) -> list[Path]:
    """A run's encoder in another toolkit's format (sslkit.models.weights.export_weights); returns the paths."""
    import tempfile

    if fmt == "sslkit":
        return [export_from_run(run_dir, out, checkpoint)[0]]
    from sslkit.models.weights import export_weights, from_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        f, _ = export_from_run(run_dir, Path(tmp) / "encoder.safetensors", checkpoint)
        encoder = from_pretrained(f)
    return export_weights(encoder, encoder.plan, out, fmt, health=last_health(run_dir))


def probe_checkpoint(path: Path, n_crops: int | None = None) -> dict:
    """Collapse statistics of a checkpoint's encoder on the run's fixed probe crops."""
    from sslkit.config import load_config
    from sslkit.data import PretrainDataset, load_datalist
    from sslkit.engine.trainer import cache_dir_of
    from sslkit.models import build_encoder
    from sslkit.monitor.monitor import probe_statistics

    ckpt = find_checkpoint(path)
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    m = cfg.model
    encoder = build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)
    encoder.load_state_dict(encoder_state(ckpt)[0], strict=True)
    ds = PretrainDataset(load_datalist(cfg.data.datalist, key=cfg.data.datalist_key), cfg.data,
                         cache_dir_of(cfg, run_dir), seed=cfg.train.seed, skipped_log=None,
                         spatial_dims=m.spatial_dims)
    ds.prepare(progress=False)
    crops = ds.probe_crops(n_crops or cfg.monitor.probe_crops)
    stats = probe_statistics(encoder, crops)
    return {"checkpoint": str(ckpt), **stats}
