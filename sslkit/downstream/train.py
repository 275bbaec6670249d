"""Fine-tuning: a pretrained (or scratch) encoder + decoder, the plan's preprocessing, sliding-window validation,
on the one training loop and run layer pretraining uses (sslkit.engine.loop, sslkit.run).

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
from sslkit.engine.compile import compile_in_place, compile_mode, eager
from sslkit.engine.distributed import read_scalars
from sslkit.engine.loop import StepOutcome, StepReport
from sslkit.engine.sampler import worker_init
from sslkit.errors import ConfigError, user_error_in


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31)


def _warn(line: str) -> None:
    print(f"sslkit: warning: {line}", file=sys.stderr, flush=True)


def resolve_recipe(recipe: dict | DownstreamConfig, encoder_path: str | Path | None = None,
                   strict_plan: bool = False):
    """(DownstreamConfig, encoder plan or None, encoder weights file or None): the recipe with the plan of its
    encoder (`encoder_path`, else the recipe's model.init_from) filled in; differences are one warning line, or a
    ConfigError with strict_plan."""
    from sslkit.engine.export import resolve_encoder

    raw = recipe if isinstance(recipe, dict) else _explicit(recipe)
    if encoder_path:  # RUN@best-probe (@healthy, @last) names a checkpoint of a pretraining run
        raw = {**raw, "model": {**raw.get("model", {}), "init_from": resolve_encoder(encoder_path)}}
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
    except RuntimeError as e:  # MONAI wraps a transform's DataError in RuntimeError: surface the user error
        u = user_error_in(e)
        if u is not None:
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


def autocast(precision: str, device: torch.device):
    """`train.precision: bf16`: the forward under bf16 autocast (matmuls and convolutions in bf16; the weights, their
    gradients and the optimizer state stay fp32); fp32: nothing changes."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _input_stats(datasets) -> dict:
    cases = datasets.preprocessed_train
    return summarize_stats([case_stats(cases[i]["image"]) for i in range(len(cases))])


def _finetune(cfg, run: R.RunDir, device, encoder, progress: bool, stop: R.StopSignals, recipe_path) -> dict:
    from sslkit.engine.loop import Loop

    task = FinetuneTask(cfg, run, device, encoder, stop, recipe_path)
    Loop(task, run, cfg, task.total, progress, f"finetune {cfg.data.task or cfg.data.layout}",
         postfix=task.postfix).run()
    return task.summary


class FinetuneTask:
    """The fine-tuning side of the one loop (sslkit.engine.loop): one batch per optimizer step, the adaptation's
    param groups and transfer schedule, validation every train.val_every steps (the best model kept as
    model.safetensors), checkpoints at every validation."""

    def __init__(self, cfg, run: R.RunDir, device, encoder, stop: R.StopSignals, recipe_path):
        from monai.data import DataLoader

        from sslkit.downstream.data import make_datasets
        from sslkit.engine.optim import make_optimizer
        from sslkit.engine.schedules import make_scheduler
        from sslkit.plan import recipe_record

        weights, enc_plan, enc_file = encoder
        t = cfg.train
        self.cfg, self.run, self.device, self.stop = cfg, run, device, stop
        if t.threads:
            torch.set_num_threads(t.threads)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.model = model = build_model(cfg)  # right after seeding: the initial weights depend only on train.seed
        self.data = make_datasets(cfg.data)
        if weights is not None and run.resume_from is None:
            print(f"encoder weights: {load_encoder(model, weights)}", flush=True)
        model.to(device)
        self.adaptation = adapt(model, cfg.adapt, cfg.optim.lr, cfg.optim.layer_decay)
        compile_in_place([model], compile_mode(t.compile, device), fallback=t.compile == "auto")
        self.opt = make_optimizer(model, cfg.optim, groups=self.adaptation.param_groups)
        self.loss_fn = make_loss(cfg)
        encoder_file = str(enc_file) if (enc_file and weights is not None) else None
        self.plan = segmenter_plan(cfg, enc_plan, _input_stats(self.data), recipe_record(recipe_path),
                                   {"kind": "finetune", "encoder": encoder_file,
                                    "plan_from": str(enc_file) if enc_file else None})
        self.gen = torch.Generator()
        self.loader = DataLoader(self.data.train, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers,
                                 generator=self.gen, drop_last=False, worker_init_fn=worker_init(t.worker_nice))
        self.total = t.max_steps or t.max_epochs * len(self.loader)
        self.scheduler = make_scheduler(self.opt, cfg.optim, self.total,
                                        group_factors=self.adaptation.lr_factors(self.opt.param_groups))
        self.samples = t.batch_size * (1 if cfg.data.slices else cfg.data.samples_per_volume)
        self.step, self.best_dice, self.best_step, self.last_val = 0, -math.inf, -1, None
        self.batches = None
        self.summary = {}
        self.encoder_file = encoder_file

    # the loop's calls ------------------------------------------------------------------------------------

    def restore(self, path: Path) -> dict:
        from sslkit.plan import read_weights

        self.model.load_state_dict(read_weights(path / MODEL_FILE)[0], strict=True)
        state = R.load_state(path, "optimizer")
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(R.load_state(path, "rng")["torch"])
        tr = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        best = tr.get("best") or ({"step": tr["best_step"], "value": tr["best_dice"]} if "best_dice" in tr else None)
        if best and best.get("step", -1) >= 0:
            self.best_dice, self.best_step = float(best["value"]), int(best["step"])
        self.step = int(tr["step"])
        print(f"resumed from {path} at step {self.step}", flush=True)
        return {**tr, "best": best}

    def step_zero(self) -> dict:
        return {}

    def stop_requested(self) -> str | None:
        return self.stop.requested

    def optimizer_step(self, policy) -> StepOutcome:
        from sslkit.engine.loop import StepOutcome

        if self.batches is None:
            self.batches = self._batches()
        epoch, batch = next(self.batches)
        self.adaptation.set_step(self.model, self.step)  # transfer schedule: frozen encoder, then the whole model
        x, y = plain(batch["image"]).to(self.device), plain(batch["label"]).to(self.device)
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.cfg.train.precision, self.device):
            logits = self.model(x)
        loss = self.loss_fn(logits.float(), y)  # softmax, Dice and cross-entropy sums in fp32
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        lr_now = self.opt.param_groups[0]["lr"]
        read = read_scalars({"loss": loss.detach(), "grad_norm": norm})  # the step's one device-to-host transfer
        loss_v, norm_v = read["loss"], read["grad_norm"]
        bad = not (math.isfinite(loss_v) and math.isfinite(norm_v))
        why = policy.verdict(bad)
        if why:
            return StepOutcome(False, stop=why)
        if not bad:  # a bad step's gradients are dropped: weights unchanged, the schedule moves on
            self.opt.step()
        self.scheduler.step()
        self.step += 1
        logs = {"epoch": epoch, "loss": loss_v, "lr": lr_now, "grad_norm": norm_v}
        return StepOutcome(not bad, logs, samples=self.samples)

    def end_step(self, step: int, outcome) -> StepReport:
        from sslkit.engine.loop import StepReport

        t = self.cfg.train
        report = StepReport()
        if step % t.val_every == 0 or step == self.total:
            with eager():  # sliding windows in eval mode: eager (a compile per window batch shape)
                summary, _ = validate(self.model, self.data.val, self.cfg, self.device, self.data.val_cases,
                                      t.val_cases)
            self.adaptation.train_mode(self.model)
            md = self.last_val = summary["mean_dice"]
            report.metrics = {"val_mean_dice": md,
                              "val_dice": {k: v["dice"] for k, v in summary["per_class"].items()}}
            report.checkpoint = True
            if not math.isnan(md) and md > self.best_dice:
                self.best_dice, self.best_step = md, step
                report.best = md
                save_model(self.model, self.cfg, self.plan, self.run.root / MODEL_FILE)
        return report

    def save(self, step: int, trainer_state: dict, protect: set[str]) -> Path:
        tmp = R.begin_checkpoint(self.run.checkpoints, step)
        try:
            save_model(self.model, self.cfg, self.plan, tmp / MODEL_FILE)
            R.save_state(tmp, "optimizer", {"optimizer": self.opt.state_dict(), "scheduler": self.scheduler.state_dict()})
            R.save_state(tmp, "rng", {"torch": torch.get_rng_state()})
            R.atomic_write_json(tmp / "trainer.json", trainer_state)
        except BaseException:
            R.abandon_checkpoint(tmp)
            raise
        return R.finish_checkpoint(tmp, step, self.cfg.train.keep_last, protect)

    def finish(self, result) -> list[Path]:
        """summary.json; the best model is the file the trackers keep."""
        self.summary = {"best_dice": self.best_dice if self.best_step >= 0 else None, "best_step": self.best_step,
                        "steps": result.steps, "stopped_by_nonfinite": bool(result.nonfinite),
                        "last_val_dice": self.last_val, "encoder": self.encoder_file, "run_dir": str(self.run.root),
                        "stopped_by_signal": result.stopped_by_signal}
        R.atomic_write_json(self.run.root / "summary.json", self.summary)
        return [p for p in (self.run.root / MODEL_FILE,) if p.is_file()]

    # helpers ---------------------------------------------------------------------------------------------

    def postfix(self, row: dict) -> dict:
        best = f"{self.best_dice:.4f}" if self.best_step >= 0 else "-"
        return {"loss": f"{row['loss']:.4f}", "best_dice": best}

    def _batches(self):
        """(epoch, batch) from the step the run stands at: each epoch's order and augmentation are seeded by (seed,
        epoch), and the batches of the current epoch already used are skipped."""
        t = self.cfg.train
        epoch, skip = divmod(self.step, len(self.loader))
        while True:
            self.gen.manual_seed(_epoch_seed(t.seed, epoch))
            self.data.train.transform.set_random_state(seed=_epoch_seed(t.seed, epoch))
            self.adaptation.train_mode(self.model)
            for i, batch in enumerate(self.loader):
                if i >= skip:
                    yield epoch, batch
            epoch, skip = epoch + 1, 0
