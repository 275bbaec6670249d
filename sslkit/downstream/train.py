"""Fine-tuning loop: a pretrained (or scratch) encoder + decoder, the plan's preprocessing, sliding-window
validation, on the run layer pretraining uses (sslkit.run).

Run directory:
  config.yaml            resolved DownstreamConfig (the encoder's plan filled in)
  metrics.jsonl          one JSON object per optimizer step: step, epoch, loss, lr, samples_per_s, eta_s, and on
                         validation steps val_mean_dice / val_dice
  tb/                    TensorBoard scalars (the same keys)
  checkpoints/step_*/    model.safetensors (plan + config in its metadata), optimizer / rng state (safetensors +
                         JSON), trainer.json; written atomically at every validation, the last train.keep_last kept
  model.safetensors      the best model so far (validation mean Dice), with its plan: what evaluate / predict use
  summary.json           best Dice / step at the end
Resuming (`--resume auto`: the newest valid checkpoint) continues the same data stream: each epoch's shuffling and
augmentation are seeded by (seed, epoch) and the batches of the current epoch already used are skipped. Keep
train.num_workers = 0 for bit-exact resumption.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sslkit import run as R
from sslkit.downstream.adapt import MODEL_FILE, adapt, build_model, check_buildable, encoder_plan, load_encoder, save_model
from sslkit.downstream.config import DownstreamConfig, downstream_config_from_dict
from sslkit.downstream.evaluate import plain, validate
from sslkit.downstream.from_plan import (
    case_stats,
    differences_line,
    recipe_from_plan,
    segmenter_plan,
    summarize_stats,
)
from sslkit.engine.sampler import worker_init
from sslkit.errors import ConfigError, UserError


def unwrap_user_error(e: BaseException) -> BaseException:
    """MONAI wraps transform exceptions in RuntimeError; surface a UserError (e.g. DataError) from the chain."""
    seen = e
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31)


def _warn(line: str) -> None:
    print(f"sslkit: warning: {line}", file=sys.stderr, flush=True)


def resolve_recipe(recipe: dict | DownstreamConfig, encoder_path: str | Path | None = None,
                   strict_plan: bool = False):
    """(DownstreamConfig, encoder plan or None, encoder weights file or None): the recipe with the plan of its
    encoder (`encoder_path`, else the recipe's model.init_from) filled in; differences are one warning line, or a
    ConfigError with strict_plan."""
    raw = recipe if isinstance(recipe, dict) else _explicit(recipe)
    if encoder_path:
        raw = {**raw, "model": {**raw.get("model", {}), "init_from": str(encoder_path)}}
    source = raw.get("model", {}).get("init_from")
    plan, enc_file = encoder_plan(source) if source else (None, None)
    raw, diffs = recipe_from_plan(raw, plan)
    if diffs:
        line = differences_line(diffs)
        if strict_plan:
            raise ConfigError(f"{enc_file}: {line} (--strict-plan)")
        _warn(line)
    return downstream_config_from_dict(raw), plan, enc_file


def _explicit(cfg: DownstreamConfig) -> dict:
    """A config object as a recipe: every key set, except an empty model section (left to the plan)."""
    raw = cfg.to_dict()
    if not cfg.model.name:
        raw.pop("model")
    return raw


def finetune(recipe: dict | DownstreamConfig, run_dir: str | Path, encoder_path: str | None = None,
             resume: str | None = None, progress: bool = True, strict_plan: bool = False,
             recipe_path: str | Path | None = None, scratch: bool = False) -> dict:
    """Train a segmenter on the recipe's labelled data; returns {'best_dice', 'best_step', 'steps', 'run_dir',
    'stopped_by_signal'}. `recipe`: a raw recipe mapping (keys it leaves out follow the encoder's plan) or a
    DownstreamConfig. `scratch`: follow the encoder's plan (architecture, preprocessing) but start from random
    weights: the from-scratch baseline of the same model."""
    try:
        cfg, enc_plan, enc_file = resolve_recipe(recipe, encoder_path, strict_plan)
        weights = None if scratch else enc_file
        if scratch:
            cfg.model.init_from = ""  # the plan's architecture and preprocessing, not its weights
        device = R.pick_device(cfg.train.device)
        check_buildable(cfg)
        run = R.RunDir.open(run_dir, resume, cfg.to_dict(), warn=_warn)
        ok = False
        try:
            with R.StopSignals() as stop:
                out = _finetune(cfg, run, device, (weights, enc_plan, enc_file), progress, stop, recipe_path)
            ok = True
            return out
        finally:
            run.close(ok)
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


def make_optimizer(param_groups: list[dict], o) -> torch.optim.Optimizer:
    """optim.name over the adaptation's groups (a group may carry its own lr / weight_decay)."""
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))


def _input_stats(datasets) -> dict:
    cases = datasets.preprocessed_train
    return summarize_stats([case_stats(cases[i]["image"]) for i in range(len(cases))])


def _finetune(cfg, run: R.RunDir, device, encoder, progress: bool, stop: R.StopSignals, recipe_path) -> dict:
    from monai.data import DataLoader
    from tqdm import tqdm

    from sslkit.downstream.data import make_datasets
    from sslkit.engine.schedules import make_scheduler
    from sslkit.monitor.trackers import Trackers
    from sslkit.plan import recipe_record

    weights, enc_plan, enc_file = encoder
    t, run_dir = cfg.train, run.root
    if t.threads:
        torch.set_num_threads(t.threads)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    model = build_model(cfg)  # right after seeding: the initial weights depend only on train.seed
    data = make_datasets(cfg.data)
    if weights is not None and run.resume_from is None:
        print(f"encoder weights: {load_encoder(model, weights)}", flush=True)
    model.to(device)
    adaptation = adapt(model, cfg.adapt, cfg.optim.lr)
    opt = make_optimizer(adaptation.param_groups, cfg.optim)
    loss_fn = make_loss(cfg)
    plan = segmenter_plan(cfg, enc_plan, _input_stats(data), recipe_record(recipe_path),
                          {"kind": "finetune", "encoder": str(enc_file) if (enc_file and weights is not None) else None,
                           "plan_from": str(enc_file) if enc_file else None})

    gen = torch.Generator()
    loader = DataLoader(data.train, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers,
                        generator=gen, drop_last=False, worker_init_fn=worker_init(t.worker_nice))
    steps_per_epoch = len(loader)
    total = t.max_steps or t.max_epochs * steps_per_epoch
    scheduler = make_scheduler(opt, cfg.optim, total)

    step, best_dice, best_step = 0, -math.inf, -1
    if run.resume_from is not None:
        step, best_dice, best_step = _restore(run.resume_from, model, opt, scheduler)
        print(f"resumed from {run.resume_from} at step {step}", flush=True)

    def checkpoint() -> None:
        tmp = R.begin_checkpoint(run.checkpoints, step)
        try:
            save_model(model, cfg, plan, tmp / MODEL_FILE)
            R.save_state(tmp, "optimizer", {"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()})
            R.save_state(tmp, "rng", {"torch": torch.get_rng_state()})
            R.atomic_write_json(tmp / "trainer.json", {"step": step, "best_dice": best_dice, "best_step": best_step})
        except BaseException:
            R.abandon_checkpoint(tmp)
            raise
        R.finish_checkpoint(tmp, step, t.keep_last)

    metrics = R.JsonlWriter(run_dir / "metrics.jsonl")
    trackers = Trackers.open(cfg.logging, run_dir, run_dir.name, cfg.to_dict(),
                             resume_step=step if run.resume_from is not None else None)
    bar = tqdm(total=total, initial=step, desc=f"finetune {cfg.data.task or cfg.data.layout}", unit="step",
               disable=not progress, dynamic_ncols=True, mininterval=0)
    last_val, stopped_by, elapsed, skipped, skipped_in_a_row = None, None, 0.0, 0, 0
    samples = t.batch_size * (1 if cfg.data.slices else cfg.data.samples_per_volume)
    try:
        while step < total and not stopped_by:
            epoch, skip = divmod(step, steps_per_epoch)
            gen.manual_seed(_epoch_seed(t.seed, epoch))
            data.train.transform.set_random_state(seed=_epoch_seed(t.seed, epoch))
            adaptation.train_mode(model)
            for bi, batch in enumerate(loader):
                if bi < skip:
                    continue
                x, y = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                params = [p for g in opt.param_groups for p in g["params"]]
                norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
                lr_now = opt.param_groups[0]["lr"]
                bad = not (math.isfinite(float(loss.detach())) and math.isfinite(float(norm)))
                skipped_in_a_row = skipped_in_a_row + 1 if bad else 0
                if bad and (t.nonfinite == "stop" or skipped_in_a_row >= R.MAX_SKIPPED_IN_A_ROW):
                    last_ck = R.newest_valid_checkpoint(run.checkpoints)
                    stopped_by = "nonfinite"
                    print(f"sslkit: stopped at step {step + 1}: non-finite loss or gradient norm; "
                          + (f"last finite checkpoint: {last_ck}" if last_ck else "no checkpoint was written yet"),
                          file=sys.stderr, flush=True)
                    break
                if bad:
                    skipped += 1  # the gradients are dropped: weights unchanged, the schedule moves on
                else:
                    opt.step()
                scheduler.step()
                step += 1
                dt = time.perf_counter() - t0
                elapsed += dt
                row = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": lr_now, "step_time": dt,
                       "samples_per_s": samples / max(dt, 1e-9), "eta_s": elapsed / step * (total - step),
                       "grad_norm": float(norm), "skipped_steps": skipped}
                validating = step % t.val_every == 0 or step == total
                if validating:
                    summary, _ = validate(model, data.val, cfg, device, data.val_cases, t.val_cases)
                    adaptation.train_mode(model)
                    md = last_val = summary["mean_dice"]
                    row.update(val_mean_dice=md, val_dice={k: v["dice"] for k, v in summary["per_class"].items()})
                    if not math.isnan(md) and md > best_dice:
                        best_dice, best_step = md, step
                        save_model(model, cfg, plan, run_dir / MODEL_FILE)
                metrics.write(row)  # before the checkpoint: a run resumed from it has every row up to its step
                trackers.log_metrics(step, row)
                if validating or stop.requested:
                    checkpoint()
                bar.set_postfix(loss=f"{row['loss']:.4f}", best_dice=f"{best_dice:.4f}" if best_step >= 0 else "-",
                                refresh=False)
                bar.update(1)  # one refresh per step
                if stop.requested:
                    stopped_by = stop.requested
                    break
                if step >= total:
                    break
    except BaseException as e:  # the trackers learn that the run failed (or was interrupted), then it propagates
        trackers.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    bar.close()
    metrics.close()
    if (run_dir / MODEL_FILE).is_file():
        trackers.log_artifact(run_dir / MODEL_FILE)
    trackers.close("KILLED" if stopped_by else "FINISHED")
    nonfinite = stopped_by == "nonfinite"
    stopped_by = None if nonfinite else stopped_by
    out = {"best_dice": best_dice if best_step >= 0 else None, "best_step": best_step, "steps": step,
           "stopped_by_nonfinite": nonfinite,
           "last_val_dice": last_val, "encoder": str(enc_file) if (enc_file and weights is not None) else None,
           "run_dir": str(run_dir),
           "stopped_by_signal": stopped_by}
    R.atomic_write_json(run_dir / "summary.json", out)
    return out


def _restore(ckpt: Path, model, opt, scheduler) -> tuple[int, float, int]:
    """Weights, optimizer, schedule and RNG of a fine-tuning checkpoint; (step, best Dice, best step)."""
    from sslkit.plan import read_weights

    model.load_state_dict(read_weights(ckpt / MODEL_FILE)[0], strict=True)
    state = R.load_state(ckpt, "optimizer")
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(R.load_state(ckpt, "rng")["torch"])
    tr = json.loads((ckpt / "trainer.json").read_text(encoding="utf-8"))
    return int(tr["step"]), float(tr["best_dice"]), int(tr["best_step"])
