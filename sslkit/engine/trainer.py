"""The pretraining loop: DeepSpeed engine, gradient accumulation, teacher EMA per optimizer step, metrics,
alarms, atomic checkpoints carrying the plan, exact resume, and stopping on a scheduler's signal.

One code path serves one process without a launcher (the CLI sets the launcher's variables), `torchrun`
on CPU (gloo) and CUDA (nccl). Schedules (lr, EMA tau) are indexed in optimizer steps. The run directory's
rules (refuse / resume / lock / config / logs) are sslkit.run's, shared with fine-tuning.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sslkit import run as R
from sslkit.config import Config
from sslkit.engine import checkpoint as C
from sslkit.engine import distributed as D
from sslkit.engine.sampler import EpochSampler, worker_init
from sslkit.engine.schedules import make_scheduler
from sslkit.errors import ConfigError, UserError
from sslkit.models import build_encoder
from sslkit.objectives.base import ObjectiveOutput
from sslkit.objectives.composite import Composite


class SSLModel(nn.Module):
    """Student encoder + objectives with their heads: the module DeepSpeed trains."""

    def __init__(self, encoder: nn.Module, objectives: Composite):
        super().__init__()
        self.encoder = encoder
        self.objectives = objectives

    def forward(self, batch: dict) -> ObjectiveOutput:
        return self.objectives(batch, self.encoder)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    stopped_by_alarm: bool = False
    stopped_by_signal: str | None = None
    stopped_by_nonfinite: str | None = None   # what was non-finite, and the last finite checkpoint
    last_metrics: dict = field(default_factory=dict)



# ------------------------------------------------------------------------------------------------ build


def build_model(cfg: Config) -> SSLModel:
    m = cfg.model
    encoder = build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)
    return SSLModel(encoder, Composite.from_specs(cfg.objectives, encoder))


def check_buildable(cfg: Config, device: torch.device) -> None:
    """Model, objective and run options, checked on empty (meta) weights before any scan is read: a typo costs
    seconds, not a corpus cache. One-line ConfigError naming the key."""
    from sslkit.data.views import validate_view_config
    from sslkit.models.base import empty_weights
    from sslkit.monitor.trackers import check_logging_config

    t = cfg.train
    validate_view_config(cfg.data.views)
    check_logging_config(cfg.logging)
    if cfg.model.init_from and not Path(cfg.model.init_from).expanduser().exists():
        raise ConfigError(f"model.init_from: {cfg.model.init_from} not found")
    if t.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    try:
        with empty_weights():
            model = build_model(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model / objectives: {str(e).splitlines()[0]}") from None
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if t.micro_batch_size < 2:
        for i, obj in enumerate(model.objectives.objectives):
            if any(isinstance(mod, norms) for mod in obj.modules()):
                raise ConfigError(f"train.micro_batch_size: 1 is too few for the BatchNorm heads of objectives[{i}] "
                                  f"({obj.name}); use 2 or more, or head_norm: layer")


def deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a torch optimizer avoids DeepSpeed's JIT-built fused Adam
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD with momentum betas[0]; no weight decay on biases and norm weights."""
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.betas[0])
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas))


def make_dataset(cfg: Config, run_dir: Path, progress: bool = True):
    """The pretraining dataset over the store in `cache_dir_of(cfg, run_dir)`, holding what the objectives request
    (`Composite.data_requests`). One process prepares missing volumes itself; under a launcher every rank prepares
    its part of the datalist at once, waiting for the others by polling markers in the run directory (no
    collective is held while scans are preprocessed), then opens the complete store."""
    import random

    from sslkit.data.datalist import load_datalist
    from sslkit.data.prepare import MARKERS, prepare_with_ranks
    from sslkit.data.pretrain import PretrainDataset
    from sslkit.models.base import empty_weights

    with empty_weights():
        requests = build_model(cfg).objectives.data_requests()
    items = load_datalist(cfg.data.datalist, key=cfg.data.datalist_key)
    ds = PretrainDataset(items, cfg.data, cache_dir_of(cfg, run_dir), seed=cfg.train.seed,
                         skipped_log=run_dir / "skipped.jsonl", spatial_dims=cfg.model.spatial_dims,
                         requests=requests)
    rank, world = D.rank(), D.world_size()
    if world == 1:
        return ds.prepare(progress=progress)
    token = D.broadcast_int(random.SystemRandom().randrange(1, 2**62) if rank == 0 else 0)
    return prepare_with_ranks(ds, rank, world, Path(run_dir) / MARKERS / f"{token:x}", D.barrier,
                              progress=progress and rank == 0)


def cache_dir_of(cfg: Config, run_dir: Path) -> Path:
    """data.cache_dir (a store prepared by `sslkit data prepare`, or one pretraining fills), else
    <run_dir>/../.cache/sslkit."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(run_dir).parent / ".cache" / "sslkit"


def pretraining_plan(cfg: Config, recipe: dict | None, corpus: dict | None, strides: list) -> dict:
    """The plan every checkpoint and export of this run carries (sslkit.plan)."""
    from sslkit.plan import make_plan, preprocessing_plan

    m = cfg.model
    prep = preprocessing_plan(cfg.data, m.spatial_dims, m.in_channels, slices=m.spatial_dims == 2)
    channels = [int(c) for c in getattr(build_model_encoder_shape(cfg), "feature_channels", [])]
    return make_plan(m.name, m.args, prep, channels, strides, recipe=recipe, corpus=corpus,
                     source={"kind": "pretrain", "objectives": [o["name"] for o in cfg.objectives]})


def build_model_encoder_shape(cfg: Config):
    """The encoder on empty weights (for its attributes only)."""
    from sslkit.models.base import empty_weights

    with empty_weights():
        m = cfg.model
        return build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)


# ------------------------------------------------------------------------------------------------ helpers


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 state dict of a module whose parameters may be ZeRO-3 partitioned (collective)."""
    params = list(module.parameters())
    with D.zero3_gather(params):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _param_snapshot(module: nn.Module) -> list[torch.Tensor] | None:
    params = [p for p in module.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in params):
        return None  # ZeRO-3: parameters are partitioned; the ratio is not computed
    return [p.detach().float().clone() for p in params]


def _update_to_weight(module: nn.Module, before: list[torch.Tensor] | None) -> float | None:
    if before is None:
        return None
    num = den = 0.0
    params = [p for p in module.parameters() if p.requires_grad]
    for p, b in zip(params, before):
        num += float((p.detach().float() - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


def _open_run(cfg: Config, run_dir: Path, resume: str | None) -> R.RunDir:
    """Rank 0 opens the run directory (refuse / resume / lock); every rank learns the checkpoint it starts from."""
    rank = D.rank()
    run, error = None, None
    if rank == 0:
        try:
            run = R.RunDir.open(run_dir, resume, cfg.to_dict(), warn=lambda line: print(f"sslkit: warning: {line}",
                                                                                          file=sys.stderr))
        except UserError as e:
            error = e
    step = D.broadcast_int(-2 if error else (run.start_step if run and run.resume_from else -1))
    if error is not None:
        raise error
    if step == -2:
        raise UserError(f"{run_dir}: rank 0 could not open the run directory")
    if rank == 0:
        return run
    start = None
    if step >= 0:
        start = Path(resume) if resume not in (None, "auto") else run_dir / R.CHECKPOINTS / R.step_dir_name(step)
    return R.RunDir.open(run_dir, resume, {}, owner=False, resume_from=start)


def _seed_generators(objectives: Composite, seed: int, rank: int) -> None:
    """Each objective generator gets its own stream per rank (same seed and rank -> same stream)."""
    for i, (name, gen) in enumerate(sorted(objectives.generators().items())):
        gen.manual_seed((seed * 1_000_003 + rank * 7919 + i * 104_729) % (2**63))


def _nonfinite_params(module: nn.Module) -> bool:
    """True when any local parameter (or ZeRO-3 partition) holds a NaN / inf."""
    for p in module.parameters():
        t = getattr(p, "ds_tensor", p)
        if t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return True
    return False


# ------------------------------------------------------------------------------------------------ loop


def pretrain(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
             recipe: str | Path | None = None) -> RunResult:
    """Run (or resume) pretraining into `run_dir`. Collective under torchrun. `recipe`: the YAML file the config
    came from (recorded in the plan)."""
    run_dir = Path(run_dir)
    device = D.pick_device(cfg.train.device)
    check_buildable(cfg, device)
    D.init_distributed(device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run = _open_run(cfg, run_dir, resume)
    ok = False
    try:
        with R.StopSignals() as stop:
            result = _Training(cfg, run, device, progress, stop, recipe).run()
        ok = True
        return result
    finally:
        run.close(ok)


@dataclass
class _Counters:
    """Where the loop stands; all but `skipped_in_a_row` travel in every checkpoint's trainer state."""
    step: int = 0
    micro_step: int = 0
    elapsed: float = 0.0
    healthy: str | None = None     # the last checkpoint saved while the monitor raised no alarm
    skipped: int = 0               # optimizer steps dropped for a non-finite loss / gradient
    skipped_in_a_row: int = 0


class _StepSums:
    """Loss and logs summed over the micro-batches of one optimizer step."""

    def __init__(self):
        self.loss, self.logs, self.n = 0.0, {}, 0

    def add(self, loss: float, logs: dict) -> None:
        self.loss += loss
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v
        self.n += 1

    def means(self) -> dict:
        return {"loss": self.loss / self.n, **{k: v / self.n for k, v in self.logs.items()}}


class _Training:
    """One pretraining run in a process: built (and resumed) by the constructor, driven by `run()`."""

    def __init__(self, cfg: Config, run: R.RunDir, device: torch.device, progress: bool, stop: R.StopSignals,
                 recipe):
        import deepspeed

        from sslkit.monitor.monitor import Monitor

        self.cfg, self.dirs, self.device, self.stop, self.recipe = cfg, run, device, stop, recipe  # dirs: R.RunDir
        self.run_dir, t = run.root, cfg.train
        self.rank, self.world = D.rank(), D.world_size()
        self.dataset = make_dataset(cfg, self.run_dir, progress)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = model = build_model(cfg)
        if cfg.model.init_from and run.resume_from is None:
            from sslkit.models.weights import load_pretrained

            desc = load_pretrained(model.encoder, cfg.model.init_from)
            if self.rank == 0:
                print(f"encoder weights: {desc}", flush=True)
        optimizer = make_optimizer(cfg, model)
        self.sched = make_scheduler(optimizer, cfg.optim, t.max_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.sched,
                                                    config=deepspeed_config(cfg))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        self.objectives = model.objectives
        for teacher in self.objectives.teachers().values():
            teacher.to(device)
            teacher.gather = D.zero3_gather
        _seed_generators(self.objectives, t.seed, self.rank)
        self.generators = self.objectives.generators()
        self.monitor = Monitor(cfg.monitor, self.run_dir if self.rank == 0 else None)  # rank 0 decides and logs
        self.n = _Counters()
        torch.manual_seed(t.seed * 7919 + self.rank)  # run-time randomness (objective masks, rotations) per rank
        if run.resume_from is not None:
            self._resume(C.read_checkpoint(run.resume_from, self.engine))
        self.sampler = EpochSampler(len(self.dataset), t.micro_batch_size, t.seed, self.rank, self.world,
                                    start_micro_step=self.n.micro_step)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=t.micro_batch_size, sampler=self.sampler,
                                                  num_workers=t.num_workers, drop_last=True,
                                                  worker_init_fn=worker_init(t.worker_nice),
                                                  pin_memory=device.type == "cuda")
        self._open_outputs(progress)
        self.probe_crops = self.dataset.probe_crops(cfg.monitor.probe_crops) if cfg.monitor.probe_every else None
        self._plan = None
        self.sums = _StepSums()
        self.snapshot, self.local_norm, self.last = None, None, {}
        self.stopped, self.stop_signal, self.nonfinite_stop = False, None, None

    def _resume(self, state: dict) -> None:
        self.objectives.load_teacher_state(state["teacher"])
        C.set_rng_state(state["rank_tensors"], state["rank_plain"]["rng"])
        for name, gen in self.generators.items():
            gen.set_state(state["rank_tensors"][f"gen.{name}"])
        self.monitor.load_state_dict(_monitor_state_from(state))
        tr = state["trainer"]
        self.n = _Counters(tr["step"], tr["micro_step"], tr["elapsed"], tr.get("healthy"), tr.get("skipped_steps", 0))
        if self.rank == 0:
            print(f"resumed from {self.dirs.resume_from} at step {self.n.step}", flush=True)

    def _open_outputs(self, progress: bool) -> None:
        """metrics.jsonl, the trackers and the progress bar: rank 0 only."""
        from sslkit.monitor.trackers import Trackers

        self.metrics_out = self.trackers = self.bar = None
        if self.rank != 0:
            return
        self.metrics_out = R.JsonlWriter(self.run_dir / "metrics.jsonl")
        resumed = self.dirs.resume_from is not None
        self.trackers = Trackers.open(self.cfg.logging, self.run_dir, self.run_dir.name, self.cfg.to_dict(),
                                      resume_step=self.n.step if resumed else None)
        self.bar = _progress_bar(self.cfg.train.max_steps, self.n.step) if progress else None

    def plan(self) -> dict:
        if self._plan is None:
            from sslkit.models.base import measure_feature_strides
            from sslkit.plan import recipe_record

            partitioned = any(hasattr(p, "ds_id") for p in self.model.encoder.parameters())
            encoder = build_model(self.cfg).encoder if partitioned else self.model.encoder  # ZeRO-3: a CPU copy
            strides = measure_feature_strides(encoder, list(self.cfg.data.roi))
            self._plan = pretraining_plan(self.cfg, recipe_record(self.recipe), self.dataset.corpus_summary(),
                                          strides)
        return self._plan

    def save(self, step: int, healthy: bool) -> Path | None:
        student = _full_state(self.model)
        if D.any_flag(any(not bool(torch.isfinite(v).all()) for v in student.values() if v.is_floating_point())):
            _say(self.bar, f"step {step}: the weights hold NaN / inf values; no checkpoint written")
            return None
        rng_t, rng_p = C.rng_state()
        gen_t = {f"gen.{k}": g.get_state() for k, g in self.generators.items()}
        mon_t, mon_p = _split_state(self.monitor.state_dict())
        n = self.n
        if healthy:
            n.healthy = R.step_dir_name(step)
        trainer_state = {"step": step, "micro_step": n.micro_step, "epoch": self.sampler.epoch_of(n.micro_step),
                         "elapsed": n.elapsed, "healthy": n.healthy, "world_size": self.world,
                         "skipped_steps": n.skipped}
        return C.write_checkpoint(self.dirs.checkpoints, step, self.engine, student, self.objectives.teacher_state(),
                                  {**rng_t, **gen_t, **{f"mon.{k}": v for k, v in mon_t.items()}},
                                  {"rng": rng_p, "monitor": mon_p}, trainer_state, self.cfg.train.keep_last,
                                  protect={n.healthy} if n.healthy else set(),
                                  plan=self.plan() if self.rank == 0 else None)

    def run(self) -> RunResult:
        step_start = time.perf_counter()
        try:
            data_iter = iter(self.loader)
            while self.n.step < self.cfg.train.max_steps:
                boundary = self.engine.is_gradient_accumulation_boundary()
                applied = self._micro_batch(next(data_iter), boundary)
                if self.nonfinite_stop:
                    break
                if not boundary:
                    continue
                now = time.perf_counter()
                dt, step_start = now - step_start, now
                if self._end_step(applied, dt):
                    break
        except BaseException as e:  # the trackers learn that the run failed (or was interrupted), then it propagates
            if self.trackers is not None:
                self.trackers.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        return self._finish()

    def _micro_batch(self, batch: dict, boundary: bool) -> bool:
        """Forward, backward and engine.step() of one micro-batch; at a boundary, whether the update was applied.
        Sets `nonfinite_stop` when a non-finite loss / gradient ends the run."""
        engine, model, n = self.engine, self.model, self.n
        batch = _to_device(batch, self.device, self.dtype)
        if boundary and self.monitor.cfg.enabled:
            self.snapshot = _param_snapshot(model)
        out = engine(batch)
        engine.backward(out.loss)
        skipped_before = engine.skipped_steps
        loss_now = float(out.loss.detach())
        local_norm = _param_grad_norm(model) if boundary else None  # before step() clips and zeroes them
        bad = boundary and D.any_flag(not math.isfinite(self.sums.loss + loss_now) or
                                      (local_norm is not None and not math.isfinite(local_norm)))
        why = _why_stop(self.cfg.train.nonfinite, n.skipped_in_a_row + 1, model) if bad else None
        if why:
            self.nonfinite_stop = _nonfinite_message(n.step + 1, why, self.dirs, n.healthy)
            return False
        with _skipped_update(engine) if bad else _nothing():
            engine.step()
        if bad and engine.skipped_steps == skipped_before and D.any_flag(_nonfinite_params(model)):
            self.nonfinite_stop = _nonfinite_message(n.step + 1, "DeepSpeed applied the step: under ZeRO >= 1 in "
                                                     "fp32 it checks gradients only with train.grad_clip > 0",
                                                     self.dirs, n.healthy)
            return False
        n.micro_step += 1
        self.sums.add(loss_now, out.logs)
        self.monitor.observe(out.embeddings, out.teacher_embeddings)
        self.local_norm = local_norm
        return engine.skipped_steps == skipped_before and not bad  # overflow / non-finite: no update, no EMA

    def _end_step(self, applied: bool, dt: float) -> bool:
        """Close one optimizer step: EMA, metrics, probe, alarms, logs, checkpoint. True: leave the loop."""
        t, n, rank = self.cfg.train, self.n, self.rank
        n.step += 1
        if applied:
            self.objectives.on_optimizer_step(n.step, t.max_steps)
            n.skipped_in_a_row = 0
        else:
            n.skipped, n.skipped_in_a_row = n.skipped + 1, n.skipped_in_a_row + 1
        n.elapsed += dt
        losses = D.mean_across_ranks(self.sums.means())
        self.sums = _StepSums()
        extra = {**losses, "lr": self.sched.get_last_lr()[0],
                 "grad_norm": _grad_norm(self.engine) or self.local_norm,
                 "update_to_weight": _update_to_weight(self.model, self.snapshot) if applied else 0.0,
                 "skipped_steps": n.skipped}
        extra = {k: v for k, v in extra.items() if v is not None}
        metrics = self.monitor.end_step(n.step, extra)
        if self.probe_crops is not None and n.step % self.cfg.monitor.probe_every == 0:
            metrics.update(self.monitor.probe(self.model.encoder, self.probe_crops.to(self.device, self.dtype),
                                              n.step))
        events = self.monitor.check_alarms(n.step, {**extra, **metrics})
        samples = t.micro_batch_size * t.grad_accum_steps * self.world
        done = n.step / max(t.max_steps, 1)
        self.last = {"step": n.step, "micro_step": n.micro_step, "epoch": self.sampler.epoch_of(n.micro_step - 1),
                     **extra, **self.objectives.log_scalars(), **metrics, "samples_per_s": samples / max(dt, 1e-9),
                     "time": n.elapsed, "eta_s": n.elapsed / done * (1 - done) if done else None}
        if rank == 0:
            self._log(events)
        stop_events = [e for e in events if e.action in ("stop", "stop_keep_healthy")]
        if D.broadcast_flag(bool(stop_events)):  # every rank leaves the loop together
            self.stopped = True
            _finish_stop(self.run_dir, stop_events, n.healthy, rank)
            return True
        if D.any_flag(self.stop.requested is not None):  # a signal on any rank stops every rank after this step
            self.stop_signal = self.stop.requested or "a signal on another rank"
        if (t.ckpt_every and n.step % t.ckpt_every == 0) or n.step == t.max_steps or self.stop_signal:
            self.save(n.step, healthy=self.monitor.last_healthy_step == n.step)
        return bool(self.stop_signal)

    def _log(self, events) -> None:
        self.metrics_out.write(self.last)
        self.trackers.log_metrics(self.n.step, self.last)
        if self.bar is not None:
            _advance(self.bar, self.last)
        for e in events:
            _say(self.bar, f"ALARM [{e.action}] {e.message}")
            self.trackers.log_alarm(e)

    def _finish(self) -> RunResult:
        """Close the outputs; a run that reached max_steps exports its encoder and plan."""
        rank = self.rank
        if self.bar is not None:
            self.bar.close()
        if rank == 0:
            self.metrics_out.close()
        if self.nonfinite_stop and rank == 0:
            _say(None, self.nonfinite_stop)
        finished = not (self.stopped or self.stop_signal or self.nonfinite_stop)
        if finished:
            export_encoder(self.model, self.run_dir / "encoder.safetensors", self.plan() if rank == 0 else None)
            if rank == 0:
                R.atomic_write_json(self.run_dir / "plan.json", self.plan())
                self.trackers.log_artifact(self.run_dir / "encoder.safetensors")
                self.trackers.log_artifact(self.run_dir / "plan.json")
        if rank == 0:
            self.trackers.close("KILLED" if self.stop_signal else "FINISHED" if finished else "FAILED")
        D.barrier()
        return RunResult(self.run_dir, self.n.step, self.stopped, self.stop_signal or None, self.nonfinite_stop,
                         self.last)


def _nonfinite_message(step: int, why: str, run: R.RunDir, healthy: str | None) -> str:
    """The one line a run stopped by a non-finite loss / gradient prints."""
    last = R.newest_valid_checkpoint(run.checkpoints) if D.rank() == 0 else None
    where = f"last finite checkpoint: {last}" if last else "no checkpoint was written yet"
    return f"sslkit: stopped at step {step}: non-finite loss or gradient norm ({why}); {where}" + \
        (f"; last healthy: checkpoints/{healthy}" if healthy else "")


def _why_stop(mode: str, in_a_row: int, model: nn.Module) -> str | None:
    """Why a non-finite step ends the run (None: skip it). Collective."""
    if D.any_flag(_nonfinite_params(model)):
        return "the weights themselves hold NaN / inf"
    if mode == "stop":
        return "train.nonfinite: stop"
    return f"{in_a_row} non-finite steps in a row" if in_a_row >= R.MAX_SKIPPED_IN_A_ROW else None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _skipped_update:
    """engine.step() without touching the weights: the step's gradients are dropped, counters and the lr schedule
    move on. A plain torch optimizer (ZeRO 0) gets a no-op step; DeepSpeed's ZeRO optimizers skip non-finite
    gradients themselves (their overflow check), which the caller verifies through engine.skipped_steps."""

    def __init__(self, engine):
        self.opt = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else None

    def __enter__(self):
        if self.opt is not None:
            self.opt.step = lambda *a, **k: None  # instance attribute: hides the class's step for this call
        return self

    def __exit__(self, *exc):
        if self.opt is not None:
            del self.opt.step
        return False


def _grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # not computed without clipping on some ZeRO stages
        return None
    return None if g is None else float(g)


def _param_grad_norm(model: nn.Module) -> float | None:
    """Pre-clipping L2 norm of the (already averaged) gradients held on the parameters: ZeRO 0/1.
    None under ZeRO-2/3, whose gradients live in DeepSpeed's partitions."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _split_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    plain = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    return tensors, plain


def _monitor_state_from(state: dict) -> dict:
    tensors = {k[4:]: v for k, v in state["rank_tensors"].items() if k.startswith("mon.")}
    return {**state["rank_plain"].get("monitor", {}), **tensors}


def _finish_stop(run_dir: Path, events, healthy_ckpt: str | None, rank: int) -> None:
    """An alarm stopped the run. With stop_keep_healthy, mark the last checkpoint saved while healthy."""
    if rank != 0:
        return
    keep = any(e.action == "stop_keep_healthy" for e in events)
    msg = "; ".join(e.message for e in events)
    if keep and healthy_ckpt and (run_dir / "checkpoints" / healthy_ckpt).is_dir():
        R.atomic_write_text(run_dir / "checkpoints" / healthy_ckpt / "HEALTHY", msg + "\n")
        R.atomic_write_text(run_dir / "checkpoints" / "last_healthy", healthy_ckpt + "\n")
        msg += f" -- last healthy checkpoint: checkpoints/{healthy_ckpt}"
    elif keep:
        msg += " -- no healthy checkpoint was saved before the alarm"
    print(f"run stopped by alarm: {msg}", file=sys.stderr, flush=True)


def export_encoder(model: SSLModel, out: Path, plan: dict | None) -> None:
    """Student encoder weights as safetensors with the plan (collective under ZeRO-3; rank 0 writes)."""
    from sslkit.plan import write_weights

    state = _full_state(model.encoder)
    if D.rank() == 0:
        write_weights(out, state, plan)


# ------------------------------------------------------------------------------------------------ progress


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True,
                mininterval=1.0)


def _say(bar, text: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def _advance(bar, m: dict) -> None:
    post = {"loss": f"{m['loss']:.4f}", "samples/s": f"{m['samples_per_s']:.2f}", "lr": f"{m['lr']:.2e}"}
    if "monitor/embedding_std" in m:
        post["std"] = f"{m['monitor/embedding_std']:.2f}"
    bar.set_postfix(post, refresh=False)
    bar.update(m["step"] - bar.n)  # one refresh per step, showing this step's figures
