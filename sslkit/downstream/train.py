"""Fine-tuning loop: pretrained (or scratch) encoder + decoder, Dice+CE, AdamW, sliding-window validation.

Run directory:
  config.yaml            resolved DownstreamConfig
  metrics.jsonl          one JSON object per optimizer step ({step, epoch, loss, lr}) plus validation rows
                         ({step, val_mean_dice, val_dice})
  checkpoints/last.pt    model + optimizer + position in the data stream (atomic: temp file then os.replace)
  checkpoints/best.pt    weights with the best validation mean Dice (what evaluate / predict use)
  summary.json           best Dice / step at the end
Resuming (`resume="auto"`: <run_dir>/checkpoints/last.pt if present, or a checkpoint path) continues the same
data stream: each epoch's shuffling and augmentation are seeded by (seed, epoch) and the batches of the current
epoch that were already used are skipped. Keep train.num_workers = 0 for bit-exact resumption.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from sslkit.downstream.adapt import adapt, build_model, load_encoder_weights, read_checkpoint
from sslkit.downstream.config import DownstreamConfig, downstream_config_from_dict, save_downstream_config
from sslkit.downstream.evaluate import plain, resolve_device, validate
from sslkit.engine.checkpoint import truncate_jsonl
from sslkit.errors import ConfigError, UserError


def unwrap_user_error(e: BaseException) -> BaseException:
    """MONAI wraps transform exceptions in RuntimeError; surface a UserError (e.g. DataError) from the chain."""
    seen = e
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31)


def _resume_path(run_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        p = run_dir / "checkpoints" / "last.pt"
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise ConfigError(f"{p}: resume checkpoint not found")
    return p


def finetune(cfg: DownstreamConfig, run_dir: str | Path, encoder_path: str | None = None,
             resume: str | None = None, progress: bool = True) -> dict:
    """Train a segmenter on cfg's labelled data; returns {'best_dice', 'best_step', 'steps', 'run_dir'}."""
    try:
        return _finetune(cfg, Path(run_dir), encoder_path, resume, progress)
    except RuntimeError as e:
        u = unwrap_user_error(e)
        if u is not e:
            raise u from None
        raise


def make_loss(cfg):
    """(logits (B, K, *S), label (B, 1, *S)) -> scalar: Dice+CE (MONAI) or PUNet's log-softmax focal loss."""
    if cfg.loss.name == "focal":
        from sslkit.objectives.prompt_segmentation import focal_loss

        gamma, temp = cfg.loss.gamma, cfg.loss.temperature
        return lambda logits, y: focal_loss(torch.log_softmax(logits.float() / temp, 1), y[:, 0].long(), gamma)
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.loss.lambda_dice, lambda_ce=cfg.loss.lambda_ce)


def make_optimizer(param_groups: list[dict], t) -> torch.optim.Optimizer:
    """AdamW or Adam over the adaptation's groups (a group may carry its own lr / weight_decay)."""
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))


def make_scheduler(opt: torch.optim.Optimizer, t, total: int):
    """None (constant lr) or a one-cycle schedule peaking at each group's lr, stepped once per optimizer step."""
    if t.lr_schedule != "one_cycle":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                               total_steps=max(2, total))


def _finetune(cfg, run_dir: Path, encoder_path, resume, progress) -> dict:
    from monai.data import DataLoader
    from tqdm import tqdm

    from sslkit.downstream.data import make_datasets

    t = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    ck = None
    rpath = _resume_path(run_dir, resume)
    if rpath is not None:
        ck = read_checkpoint(rpath)
        if downstream_config_from_dict(ck["config"]).to_dict() != cfg.to_dict():
            raise ConfigError(f"{rpath}: the checkpoint was trained with a different config; "
                              f"use a new run dir or the same recipe")
    save_downstream_config(cfg, run_dir / "config.yaml")

    model = build_model(cfg)  # right after seeding: the initial weights depend only on train.seed
    train_ds, val_ds, train_cases, val_cases = make_datasets(cfg.data)
    loaded_from = None
    if encoder_path and ck is None:
        loaded_from = str(load_encoder_weights(model, encoder_path))
    model.to(device)
    adaptation = adapt(model, cfg.adapt, t.lr)
    opt = make_optimizer(adaptation.param_groups, t)
    loss_fn = make_loss(cfg)

    gen = torch.Generator()
    loader = DataLoader(train_ds, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers,
                        generator=gen, drop_last=False)
    steps_per_epoch = len(loader)
    total = t.max_steps or t.max_epochs * steps_per_epoch
    scheduler = make_scheduler(opt, t, total)

    step, best_dice, best_step = 0, -math.inf, -1
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["scheduler"])
        step, best_dice, best_step = int(ck["step"]), float(ck["best_dice"]), int(ck["best_step"])
        loaded_from = ck.get("encoder_path")
        torch.set_rng_state(ck["torch_rng"])
    metrics_path = run_dir / "metrics.jsonl"
    truncate_jsonl(metrics_path, step)  # rows past the resumed step (a crash after the last checkpoint)
    mfile = open(metrics_path, "a", encoding="utf-8")

    def log(row: dict) -> None:
        mfile.write(json.dumps(row) + "\n")
        mfile.flush()

    def checkpoint(name: str, full: bool) -> None:
        obj = {"model": model.state_dict(), "config": cfg.to_dict(), "step": step, "best_dice": best_dice,
               "best_step": best_step, "encoder_path": loaded_from}
        if full:
            obj.update(optimizer=opt.state_dict(), torch_rng=torch.get_rng_state())
            if scheduler is not None:
                obj["scheduler"] = scheduler.state_dict()
        atomic_save(obj, run_dir / "checkpoints" / name)

    bar = tqdm(total=total, initial=step, desc=f"finetune {cfg.data.task or cfg.data.layout}", unit="step",
               disable=not progress, dynamic_ncols=True)
    last_val = None
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        gen.manual_seed(_epoch_seed(t.seed, epoch))
        train_ds.transform.set_random_state(seed=_epoch_seed(t.seed, epoch))
        adaptation.train_mode(model)
        for bi, batch in enumerate(loader):
            if bi < skip:
                continue
            x, y = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.grad_clip)
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            lv = float(loss.detach())
            log({"step": step, "epoch": epoch, "loss": lv, "lr": lr_now, "step_time": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}", best_dice=f"{best_dice:.4f}" if best_step >= 0 else "-")
            if step % t.val_every == 0 or step == total:
                summary, _ = validate(model, val_ds, cfg, device, val_cases, t.val_cases)
                adaptation.train_mode(model)
                md = summary["mean_dice"]
                last_val = md
                log({"step": step, "val_mean_dice": md,
                     "val_dice": {k: v["dice"] for k, v in summary["per_class"].items()}})
                if not math.isnan(md) and md > best_dice:
                    best_dice, best_step = md, step
                    checkpoint("best.pt", full=False)
                checkpoint("last.pt", full=True)
            if step >= total:
                break
    bar.close()
    mfile.close()
    out = {"best_dice": best_dice if best_step >= 0 else None, "best_step": best_step, "steps": step,
           "last_val_dice": last_val, "encoder": loaded_from, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out
