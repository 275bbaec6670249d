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


SELECTIONS = ("last", "healthy", "best-probe")


def select_checkpoint(run_dir: Path, select: str = "last") -> Path:
    """The checkpoint of a pretraining run that `select` names: last (the newest valid one), healthy (the last one
    saved while the collapse monitor raised no alarm) or best-probe (the best task-probe Dice; pruning keeps both)."""
    from sslkit.engine.checkpoint import read_trainer_state

    newest = find_checkpoint(run_dir)
    if select == "last":
        return newest
    state = read_trainer_state(newest)
    name = state.get("healthy") if select == "healthy" else (state.get("best") or {}).get("checkpoint")
    if not name:
        why = "no checkpoint was saved while the monitor raised no alarm" if select == "healthy" else \
            "the run has no task probe (monitor.task_probe) or no probe step was checkpointed"
        raise UserError(f"{run_dir}: no {select} checkpoint: {why}")
    return R.require_valid_checkpoint(Path(run_dir) / R.CHECKPOINTS / name)


def resolve_encoder(text: str) -> str:
    """An --encoder value: RUN@last | RUN@healthy | RUN@best-probe names that checkpoint of a pretraining run;
    anything else is a path as it is."""
    run, sep, select = str(text).rpartition("@")
    if not sep or select not in SELECTIONS:
        return str(text)
    return str(select_checkpoint(Path(run), select))


def encoder_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(encoder weights, plan) of a pretraining checkpoint."""
    student, plan = read_weights(ckpt / "student.safetensors")
    enc = {k[len("encoder."):]: v for k, v in student.items() if k.startswith("encoder.")}
    if not enc:
        raise UserError(f"{ckpt}: the checkpoint holds no encoder weights")
    return enc, plan


def export_from_run(run_dir: Path, out: Path, checkpoint: str | None = None,
                    select: str = "last") -> tuple[Path, int]:
    """Write the encoder of the checkpoint `select` picks (or the named one) with its plan, as safetensors; the plan
    gains the run's task-probe figures (last, best, references) when it had a task probe."""
    from sslkit.monitor.task_probe import probe_record

    ckpt = R.require_valid_checkpoint(checkpoint) if checkpoint else select_checkpoint(run_dir, select)
    enc, plan = encoder_state(ckpt)
    if plan is not None:
        plan = {**plan, "source": {**plan.get("source", {}), "checkpoint": str(ckpt),
                                   "step": R.checkpoint_step(ckpt)},
                **probe_record(ckpt.parent.parent, upto=R.checkpoint_step(ckpt))}
    write_weights(out, enc, plan)
    return out, len(enc)


def last_health(run_dir: Path) -> dict:
    """The monitor's last figures of a run (metrics.jsonl's last row with monitor / probe values), for model cards."""
    for row in reversed(R.read_jsonl(Path(run_dir) / "metrics.jsonl")):
        figures = {k: v for k, v in row.items() if k.startswith(("monitor/", "probe/")) and isinstance(v, float)}
        if figures:
            return {"step": row.get("step"), **figures}
    return {}


def export_encoder_as(run_dir: Path, out: Path, fmt: str = "sslkit", checkpoint: str | None = None,
                      select: str = "last") -> list[Path]:
    """A run's encoder in another toolkit's format (sslkit.models.weights.export_weights); returns the paths."""
    import tempfile

    if fmt == "sslkit":
        return [export_from_run(run_dir, out, checkpoint, select)[0]]
    from sslkit.models.weights import export_weights, from_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        f, _ = export_from_run(run_dir, Path(tmp) / "encoder.safetensors", checkpoint, select)
        encoder = from_pretrained(f)
    return export_weights(encoder, encoder.plan, out, fmt, health=last_health(run_dir))


def probe_checkpoint(path: Path, n_crops: int | None = None) -> dict:
    """Collapse statistics of a checkpoint's encoder on the run's fixed probe crops."""
    from sslkit.config import load_config
    from sslkit.data import PretrainDataset, load_datalist
    from sslkit.data.pretrain import cache_dir_of
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
