"""The pretraining loop: DeepSpeed engine, gradient accumulation, teacher EMA per optimizer step, metrics,
alarms, atomic checkpoints carrying the plan, exact resume, and stopping on a scheduler's signal.

One code path serves one process without a launcher (the CLI sets the launcher's variables), `torchrun`
on CPU (gloo) and CUDA (nccl). Schedules (lr, EMA tau) are indexed in optimizer steps. The run directory's
rules (refuse / resume / lock / config / logs) are sslkit.run's, shared with fine-tuning.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sslkit import run as R
from sslkit.config import Config
from sslkit.engine import checkpoint as C
from sslkit.engine import distributed as D
from sslkit.engine.compile import compile_in_place, compile_mode, eager, pretraining_modules
from sslkit.engine.optim import make_optimizer
from sslkit.data.pretrain import cache_dir_of
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
    encoder = build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels,
                            activation_checkpointing=m.activation_checkpointing, **m.args)
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
    if t.zero_stage == 3 and t.compile not in ("auto", "off"):
        raise ConfigError(f"train.compile: {t.compile} needs train.zero_stage 0, 1 or 2 (ZeRO-3 gathers parameters in "
                          "hooks around every module call); use off")
    try:
        with empty_weights():
            model = build_model(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model / objectives: {str(e).splitlines()[0]}") from None
    model.objectives.check_config(cfg)  # each objective against the rest of the recipe (its labels, crops, model)
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
        # bf16: torch.autocast around the forward (weights, gradients, optimizer state and EMA teachers stay fp32);
        # DeepSpeed's own bf16 mode keeps bf16 weights and checks every gradient for overflow with one host sync each
        "torch_autocast": {"enabled": t.precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a torch optimizer avoids DeepSpeed's JIT-built fused Adam
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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


def pretraining_plan(cfg: Config, recipe: dict | None, corpus: dict | None, strides: list,
                     device: str | None = None) -> dict:
    """The plan every checkpoint and export of this run carries (sslkit.plan); `device`: what it trained on."""
    from sslkit.plan import make_plan, preprocessing_plan

    m = cfg.model
    prep = preprocessing_plan(cfg.data, m.spatial_dims, m.in_channels, slices=m.spatial_dims == 2)
    channels = [int(c) for c in getattr(build_model_encoder_shape(cfg), "feature_channels", [])]
    source = {"kind": "pretrain", "objectives": [o["name"] for o in cfg.objectives]}
    if device:
        source["device"] = device
    return make_plan(m.name, m.args, prep, channels, strides, recipe=recipe, corpus=corpus, source=source)


def device_description(device: torch.device, world: int) -> str:
    """'2 x cuda (NVIDIA H100 80GB HBM3)' or '1 x cpu (2 threads)': what a run trained on, for its plan."""
    what = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    return f"{world} x {what}"


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


def _update_to_weight(module: nn.Module, before: list[torch.Tensor] | None) -> torch.Tensor | None:
    """||w - w_before|| / ||w_before|| over every trainable parameter, on the device (read by the caller)."""
    if before is None:
        return None
    params = [p.detach().float() for p in module.parameters() if p.requires_grad]
    return _total_norm(torch._foreach_sub(params, before)) / _total_norm(before).clamp_min(1e-12)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of `tensors`, as a 0-d fp32 tensor on their device (no host sync)."""
    return torch.nn.utils.get_total_norm([t.float() for t in tensors], 2.0)


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


# ------------------------------------------------------------------------------------------------ the run


def pretrain(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True,
             recipe: str | Path | None = None) -> RunResult:
    """Run (or resume) pretraining into `run_dir`. Collective under torchrun. `recipe`: the YAML file the config
    came from (recorded in the plan)."""
    from sslkit.engine.loop import Loop

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
            task = PretrainTask(cfg, run, device, stop, recipe, progress)
            res = Loop(task, run, cfg, cfg.train.max_steps, progress, "pretrain", postfix=_postfix).run()
        ok = True
        return RunResult(run_dir, res.steps, res.stopped_by_alarm, res.stopped_by_signal, res.nonfinite, res.last)
    finally:
        run.close(ok)


class _StepSums:
    """Loss and logs summed over the micro-batches of one optimizer step, tensors kept on the device (no host sync):
    the step reads them once, at its end."""

    def __init__(self):
        self.loss, self.logs, self.n = 0.0, {}, 0

    def add(self, loss: torch.Tensor, logs: dict) -> None:
        self.loss = self.loss + loss.detach().float()
        for k, v in logs.items():
            v = v.detach().float() if torch.is_tensor(v) else v
            self.logs[k] = self.logs.get(k, 0.0) + v
        self.n += 1

    def means(self) -> dict:
        return {"loss": self.loss / self.n, **{k: v / self.n for k, v in self.logs.items()}}


class PretrainTask:
    """The pretraining side of the one loop (sslkit.engine.loop): a DeepSpeed engine over the student encoder and
    the objectives' heads, micro-batches accumulated into optimizer steps, the EMA teachers, the collapse monitor and
    probes, and checkpoints with DeepSpeed's state. Built in the constructor; the loop drives it."""

    def __init__(self, cfg: Config, run: R.RunDir, device: torch.device, stop: R.StopSignals, recipe, progress: bool):
        import deepspeed

        from sslkit.monitor.monitor import Monitor

        self.cfg, self.dirs, self.device, self.stop, self.recipe = cfg, run, device, stop, recipe  # dirs: R.RunDir
        self.run_dir, t = run.root, cfg.train
        self.rank, self.world = D.rank(), D.world_size()
        self.task_probe = make_task_probe(cfg)  # before the corpus: a probe that cannot run costs no preparation
        self.dataset = make_dataset(cfg, self.run_dir, progress)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = model = build_model(cfg)
        if cfg.model.init_from and run.resume_from is None:
            from sslkit.models.weights import load_pretrained

            desc = load_pretrained(model.encoder, cfg.model.init_from)
            if self.rank == 0:
                print(f"encoder weights: {desc}", flush=True)
        optimizer = make_optimizer(model, cfg.optim)
        self.sched = make_scheduler(optimizer, cfg.optim, t.max_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.sched,
                                                    config=deepspeed_config(cfg))
        self.dtype = torch.float16 if t.precision == "fp16" else torch.float32  # bf16: autocast casts per operation
        self.objectives = model.objectives
        for teacher in self.objectives.teachers().values():
            teacher.to(device)
            teacher.gather = D.zero3_gather
        compile_in_place(pretraining_modules(model), compile_mode(t.compile, device, t.zero_stage),
                         fallback=t.compile == "auto")
        _seed_generators(self.objectives, t.seed, self.rank)
        self.generators = self.objectives.generators()
        self.monitor = Monitor(cfg.monitor, self.run_dir if self.rank == 0 else None)  # rank 0 decides and logs
        self.micro_step, self.best_probe, self.healthy, self.snapshot = 0, None, None, None
        self.step = 0  # optimizer steps done (the loop's counter, mirrored for the monitor's cadence)
        torch.manual_seed(t.seed * 7919 + self.rank)  # run-time randomness (objective masks, rotations) per rank
        self.probe_crops = self.dataset.probe_crops(cfg.monitor.probe_crops) if cfg.monitor.probe_every else None
        self._plan = None
        self.data_iter = None

    # the loop's calls ------------------------------------------------------------------------------------

    def restore(self, path: Path) -> dict:
        state = C.read_checkpoint(path, self.engine)
        self.objectives.load_teacher_state(state["teacher"])
        C.set_rng_state(state["rank_tensors"], state["rank_plain"]["rng"])
        for name, gen in self.generators.items():
            gen.set_state(state["rank_tensors"][f"gen.{name}"])
        self.monitor.load_state_dict(_monitor_state_from(state))
        tr = state["trainer"]
        self.micro_step, self.healthy, self.step = int(tr["micro_step"]), tr.get("healthy"), int(tr["step"])
        self.best_probe = (tr.get("best") or {}).get("value")
        if self.rank == 0:
            print(f"resumed from {path} at step {tr['step']}", flush=True)
        return tr

    def step_zero(self) -> dict:
        """The task probe of the initial encoder and its two reference lines (before any update)."""
        if self.task_probe is None:
            return {}
        figures = self._probe_task()
        random_encoder = _random_encoder(self.cfg) if self.cfg.model.init_from else None
        refs = self.task_probe.references(random_encoder)
        if random_encoder is None:  # the initial encoder is the random one
            refs.update({k.replace("task_probe/", "task_probe/ref_random/", 1): v for k, v in figures.items()})
        return {**figures, **refs}

    def stop_requested(self) -> str | None:
        return self.stop.requested

    def optimizer_step(self, policy) -> "StepOutcome":
        """Every micro-batch of one optimizer step: forward, backward, engine.step(). Loss, logs and the gradient norm
        stay on the device until the accumulation boundary, where they are read in one transfer (one all-reduce
        across ranks); the non-finite check then decides, with the policy, whether the update is applied."""
        from sslkit.engine.loop import StepOutcome

        if self.data_iter is None:
            self.data_iter = iter(self._loader())
        engine, model, t = self.engine, self.model, self.cfg.train
        sums = _StepSums()
        while True:
            boundary = engine.is_gradient_accumulation_boundary()
            batch = _to_device(next(self.data_iter), self.device, self.dtype)
            if boundary and self._monitor_due(self.step + 1):
                self.snapshot = _param_snapshot(model)
            out = engine(batch)
            engine.backward(out.loss)
            sums.add(out.loss, out.logs)
            self.monitor.observe(out.embeddings, out.teacher_embeddings)
            if boundary:
                break
            engine.step()
            self.micro_step += 1
        values = {**sums.means(), "grad_norm": _param_grad_norm(model)}  # before step() clips and zeroes them
        read = D.mean_across_ranks(values)  # the step's one device-to-host transfer
        logs = {k: read[k] for k in values if k in read}
        bad = not (math.isfinite(logs["loss"]) and math.isfinite(logs.get("grad_norm", 0.0)))
        why = policy.verdict(bad, poisoned=bad and D.any_flag(_nonfinite_params(model)))
        if why:
            return StepOutcome(False, stop=why)
        skipped_before = engine.skipped_steps
        with _skipped_update(engine) if bad else _nothing():
            engine.step()
        if bad and engine.skipped_steps == skipped_before and D.any_flag(_nonfinite_params(model)):
            return StepOutcome(False, stop="DeepSpeed applied the step: under ZeRO >= 1 in fp32 it checks "
                                           "gradients only with train.grad_clip > 0")
        self.micro_step += 1
        self.step += 1
        applied = engine.skipped_steps == skipped_before and not bad  # overflow / non-finite: no update, no EMA
        logs["lr"] = self.sched.get_last_lr()[0]
        if "grad_norm" not in logs:  # ZeRO-2/3: DeepSpeed's norm of its partitions, read after its step
            logs["grad_norm"] = _grad_norm(engine)
        samples = t.micro_batch_size * t.grad_accum_steps * self.world
        return StepOutcome(applied, logs, samples=samples)

    def _monitor_due(self, step: int) -> bool:
        """The collapse statistics (and update_to_weight) are computed, and read from the device, at this step."""
        return self.monitor.cfg.enabled and step % self.cfg.monitor.every == 0

    def end_step(self, step: int, outcome) -> "StepReport":
        """EMA teachers, collapse metrics and probes, alarms."""
        from sslkit.engine.loop import StepReport

        cfg = self.cfg
        if outcome.applied:
            self.objectives.on_optimizer_step(step, cfg.train.max_steps)
        extra = {"micro_step": self.micro_step, "epoch": self.sampler.epoch_of(self.micro_step - 1),
                 **self.objectives.log_scalars()}
        metrics = {}
        if self._monitor_due(step):  # the monitor's own step: it reads its statistics from the device
            change = _update_to_weight(self.model, self.snapshot) if outcome.applied else 0.0
            extra["update_to_weight"] = float(change) if change is not None else None
            metrics = self.monitor.end_step(step, {k: v for k, v in outcome.logs.items() if v is not None})
        if self.probe_crops is not None and step % cfg.monitor.probe_every == 0:
            with eager():
                metrics.update(self.monitor.probe(self.model.encoder, self.probe_crops.to(self.device, self.dtype),
                                                  step))
        report = StepReport(metrics={**extra, **metrics})
        if self.task_probe is not None and step % cfg.monitor.task_probe.every == 0:
            figures = self._probe_task()
            report.metrics.update(figures)
            value = figures["task_probe/dice_mean"]
            if math.isfinite(value) and (self.best_probe is None or value > self.best_probe):
                self.best_probe = report.best = value
                report.checkpoint = True  # the best-probe encoder must exist as a checkpoint to be selected
        events = self.monitor.check_alarms(step, {**outcome.logs, **report.metrics})
        report.events = events if self.rank == 0 else []
        stops = [e for e in events if e.action in ("stop", "stop_keep_healthy")]
        report.stop = bool(stops)  # the loop acts on rank 0's decision
        report.healthy = self.monitor.last_healthy_step == step
        if stops:
            _finish_stop(self.run_dir, stops, self.healthy, self.rank)
        return report

    def save(self, step: int, trainer_state: dict, protect: set[str]) -> Path | None:
        student = _full_state(self.model)
        if D.any_flag(any(not bool(torch.isfinite(v).all()) for v in student.values() if v.is_floating_point())):
            _say(f"step {step}: the weights hold NaN / inf values; no checkpoint written")
            return None
        rng_t, rng_p = C.rng_state()
        gen_t = {f"gen.{k}": g.get_state() for k, g in self.generators.items()}
        mon_t, mon_p = _split_state(self.monitor.state_dict())
        self.healthy = trainer_state.get("healthy")
        state = {**trainer_state, "micro_step": self.micro_step, "epoch": self.sampler.epoch_of(self.micro_step),
                 "world_size": self.world}
        return C.write_checkpoint(self.dirs.checkpoints, step, self.engine, student, self.objectives.teacher_state(),
                                  {**rng_t, **gen_t, **{f"mon.{k}": v for k, v in mon_t.items()}},
                                  {"rng": rng_p, "monitor": mon_p}, state, self.cfg.train.keep_last,
                                  protect=protect, plan=self.plan() if self.rank == 0 else None)

    def finish(self, result) -> list[Path]:
        """A run that reached max_steps exports its encoder and plan (the files the trackers keep); one whose final
        weights are non-finite exports the encoder of its last finite checkpoint, if there is one."""
        from sslkit.monitor.task_probe import probe_record

        if result.fallback is not None:
            if self.rank == 0:
                from sslkit.engine.export import export_from_run

                export_from_run(self.run_dir, self.run_dir / "encoder.safetensors", checkpoint=str(result.fallback))
            D.barrier()
            return [self.run_dir / "encoder.safetensors"]
        if not result.finished:
            return []
        plan = self.plan() if self.rank == 0 else None
        if plan is not None:
            plan = {**plan, **probe_record(self.run_dir)}
        export_encoder(self.model, self.run_dir / "encoder.safetensors", plan)
        if self.rank == 0:
            R.atomic_write_json(self.run_dir / "plan.json", plan)
        D.barrier()
        return [self.run_dir / "encoder.safetensors", self.run_dir / "plan.json"]

    # helpers ---------------------------------------------------------------------------------------------

    def _loader(self):
        t = self.cfg.train
        self.sampler = EpochSampler(len(self.dataset), t.micro_batch_size, t.seed, self.rank, self.world,
                                    start_micro_step=self.micro_step)
        return torch.utils.data.DataLoader(self.dataset, batch_size=t.micro_batch_size, sampler=self.sampler,
                                           num_workers=t.num_workers, drop_last=True,
                                           worker_init_fn=worker_init(t.worker_nice),
                                           pin_memory=self.device.type == "cuda")

    def _probe_task(self) -> dict:
        """Task-probe figures of the encoder the probe reads (the teacher's where there is one); collective
        under ZeRO-3 (every rank embeds; the figures are the same on every rank)."""
        from sslkit.monitor.task_probe import probe_encoder

        encoder = probe_encoder(self.objectives, self.model.encoder)
        with D.zero3_gather(list(encoder.parameters())), eager():
            return self.task_probe.measure(encoder)

    def plan(self) -> dict:
        if self._plan is None:
            from sslkit.models.base import measure_feature_strides
            from sslkit.plan import recipe_record

            partitioned = any(hasattr(p, "ds_id") for p in self.model.encoder.parameters())
            encoder = build_model(self.cfg).encoder if partitioned else self.model.encoder  # ZeRO-3: a CPU copy
            with eager():
                strides = measure_feature_strides(encoder, list(self.cfg.data.roi))
            self._plan = pretraining_plan(self.cfg, recipe_record(self.recipe), self.dataset.corpus_summary(),
                                          strides, device_description(self.device, self.world))
        return self._plan


def make_task_probe(cfg: Config):
    """The run's task probe (sslkit.monitor.task_probe), or None without monitor.task_probe.datalist."""
    tp = cfg.monitor.task_probe
    if not tp.datalist:
        return None
    from sslkit.monitor.task_probe import TaskProbe, load_probe_set

    return TaskProbe(load_probe_set(tp, cfg.data, cfg.model.spatial_dims, cfg.train.seed), tp, cfg.train.seed)


def _random_encoder(cfg: Config) -> nn.Module:
    """A freshly initialised encoder of the run's architecture (seeded; the global random stream is not moved)."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)


def _postfix(m: dict) -> dict:
    post = {"loss": f"{m['loss']:.4f}", "samples/s": f"{m['samples_per_s']:.2f}", "lr": f"{m['lr']:.2e}"}
    if "monitor/embedding_std" in m:
        post["std"] = f"{m['monitor/embedding_std']:.2f}"
    if "task_probe/dice_mean" in m:
        post["probe_dice"] = f"{m['task_probe/dice_mean']:.3f}"
    return post


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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


def _param_grad_norm(model: nn.Module) -> torch.Tensor | None:
    """Pre-clipping L2 norm of the (already averaged) gradients held on the parameters (ZeRO 0/1), a tensor on the
    device. None under ZeRO-2/3, whose gradients live in DeepSpeed's partitions."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return _total_norm(grads) if grads else None


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


