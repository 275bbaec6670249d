"""The pretraining loop: DeepSpeed engine, gradient accumulation, teacher EMA per optimizer step, metrics,
alarms, atomic checkpoints and exact resume.

One code path serves one process without a launcher (the CLI sets the launcher's variables), `torchrun`
on CPU (gloo) and CUDA (nccl). Schedules (lr, EMA tau) are indexed in optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sslkit.config import Config, save_config
from sslkit.engine import checkpoint as C
from sslkit.engine import distributed as D
from sslkit.engine.sampler import EpochSampler
from sslkit.engine.schedules import warmup_cosine
from sslkit.errors import ConfigError
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
    last_metrics: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ build


def build_model(cfg: Config) -> SSLModel:
    m = cfg.model
    encoder = build_encoder(m.name, spatial_dims=m.spatial_dims, in_channels=m.in_channels, **m.args)
    return SSLModel(encoder, Composite.from_specs(cfg.objectives, encoder))


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
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}.get(o.name)
    if cls is None:
        raise ConfigError(f"optim.name: '{o.name}' is not one of adamw, adam, sgd")
    return cls(groups, lr=o.lr, betas=tuple(o.betas))


def make_dataset(cfg: Config, run_dir: Path):
    from sslkit.data import PretrainDataset, load_datalist

    if not cfg.data.datalist:
        raise ConfigError("data.datalist: no datalist given (a JSON file or a folder of scans)")
    items = load_datalist(cfg.data.datalist, key=cfg.data.datalist_key)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir.parent / ".cache" / "sslkit"
    ds = PretrainDataset(items, cfg.data, cache, seed=cfg.train.seed, skipped_log=run_dir / "skipped.jsonl")
    if D.rank() == 0:
        ds.prepare(progress=True)
    D.barrier()
    if D.rank() != 0:
        ds.prepare(progress=False)  # reads the cache rank 0 just wrote
    return ds


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


class _JsonlWriter:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")

    def close(self) -> None:
        self.f.close()


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        if C.latest_checkpoint(run_dir / "checkpoints") is not None:
            raise ConfigError(f"{run_dir}: already holds a run with checkpoints; continue it with --resume auto "
                              f"or choose another --run-dir")
        return None
    if resume == "auto":
        return C.latest_checkpoint(run_dir / "checkpoints")
    p = Path(resume)
    if not (p / C.COMPLETE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint directory")
    return p


# ------------------------------------------------------------------------------------------------ loop


def pretrain(cfg: Config, run_dir: str | Path, resume: str | None = None, progress: bool = True) -> RunResult:
    """Run (or resume) pretraining into `run_dir`. Collective under torchrun."""
    import deepspeed

    from sslkit.monitor.monitor import Monitor, TBLogger

    run_dir = Path(run_dir)
    t = cfg.train
    device = D.pick_device(t.device)
    D.init_distributed(device)
    rank, world = D.rank(), D.world_size()
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    ckpt_path = resolve_resume(run_dir, resume)  # before anything is written: a refusal changes nothing
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()
    if rank == 0:  # lines of steps the (re)started run will write again
        start = C.read_trainer_state(ckpt_path)["step"] if ckpt_path is not None else 0
        for name in ("metrics.jsonl", "alarms.jsonl"):
            C.truncate_jsonl(run_dir / name, start)
    dataset = make_dataset(cfg, run_dir)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, t.max_steps, cfg.optim.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                           config=deepspeed_config(cfg))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    objectives = model.objectives
    for teacher in objectives.teachers().values():
        teacher.to(device)
        teacher.gather = D.zero3_gather

    monitor = Monitor(cfg.monitor, run_dir if rank == 0 else None)  # rank 0 decides and logs alarms
    step, micro_step, elapsed, healthy_ckpt = 0, 0, 0.0, None
    torch.manual_seed(t.seed * 7919 + rank)  # run-time randomness (objective masks, rotations) per rank
    if ckpt_path is not None:
        state = C.read_checkpoint(ckpt_path, engine)
        objectives.load_teacher_state(state["teacher"])
        C.set_rng_state(state["rank_tensors"], state["rank_plain"]["rng"])
        monitor.load_state_dict(_monitor_state_from(state))
        tr = state["trainer"]
        step, micro_step, elapsed, healthy_ckpt = tr["step"], tr["micro_step"], tr["elapsed"], tr.get("healthy")
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)

    sampler = EpochSampler(len(dataset), t.micro_batch_size, t.seed, rank, world, start_micro_step=micro_step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.micro_batch_size, sampler=sampler,
                                         num_workers=t.num_workers, drop_last=True,
                                         pin_memory=device.type == "cuda")
    metrics_out = _JsonlWriter(run_dir / "metrics.jsonl") if rank == 0 else None
    tb = TBLogger(run_dir) if rank == 0 else None
    bar = _progress_bar(t.max_steps, step) if (rank == 0 and progress) else None
    probe_crops = dataset.probe_crops(cfg.monitor.probe_crops) if cfg.monitor.probe_every else None

    def save(final_step: int, healthy: bool) -> Path:
        nonlocal healthy_ckpt
        rng_t, rng_p = C.rng_state()
        mon_t, mon_p = _split_state(monitor.state_dict())
        name = C.step_dir_name(final_step)
        if healthy:
            healthy_ckpt = name
        trainer_state = {"step": final_step, "micro_step": micro_step, "epoch": sampler.epoch_of(micro_step),
                         "elapsed": elapsed, "healthy": healthy_ckpt, "world_size": world}
        return C.write_checkpoint(run_dir / "checkpoints", final_step, engine, _full_state(model),
                                  objectives.teacher_state(), {**rng_t, **{f"mon.{k}": v for k, v in mon_t.items()}},
                                  {"rng": rng_p, "monitor": mon_p}, trainer_state, t.keep_last,
                                  protect={healthy_ckpt} if healthy_ckpt else set())

    stopped, last, loss_acc, logs_acc, n_acc = False, {}, 0.0, {}, 0
    step_start = time.perf_counter()
    snapshot = None
    data_iter = iter(loader)
    while step < t.max_steps:
        batch = _to_device(next(data_iter), device, dtype)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and monitor.cfg.enabled:
            snapshot = _param_snapshot(model)
        out = engine(batch)
        engine.backward(out.loss)
        skipped_before = engine.skipped_steps
        local_norm = _param_grad_norm(model) if boundary else None  # before step() clips and zeroes them
        engine.step()
        micro_step += 1
        loss_acc += float(out.loss.detach())
        for k, v in out.logs.items():
            logs_acc[k] = logs_acc.get(k, 0.0) + v
        n_acc += 1
        monitor.observe(out.embeddings, out.teacher_embeddings)
        if not boundary:
            continue
        step += 1
        if engine.skipped_steps == skipped_before:  # fp16 overflow skips the optimizer step: no EMA then
            objectives.on_optimizer_step(step, t.max_steps)
        now = time.perf_counter()
        dt, step_start = now - step_start, now
        elapsed += dt
        extra = {"loss": loss_acc / n_acc, **{k: v / n_acc for k, v in logs_acc.items()},
                 "lr": sched.get_last_lr()[0], "grad_norm": _grad_norm(engine) or local_norm,
                 "update_to_weight": _update_to_weight(model, snapshot)}
        extra = {k: v for k, v in extra.items() if v is not None}
        loss_acc, logs_acc, n_acc = 0.0, {}, 0
        metrics = monitor.end_step(step, extra)
        if probe_crops is not None and step % cfg.monitor.probe_every == 0:
            metrics.update(monitor.probe(model.encoder, probe_crops.to(device, dtype), step))
        events = monitor.check_alarms(step, {**extra, **metrics})
        samples = t.micro_batch_size * t.grad_accum_steps * world
        last = {"step": step, "micro_step": micro_step, "epoch": sampler.epoch_of(micro_step - 1), **extra,
                **objectives.log_scalars(), **metrics, "samples_per_s": samples / max(dt, 1e-9),
                "time": elapsed}
        if rank == 0:
            metrics_out.write(last)
            tb.log(step, last)
            if bar is not None:
                _advance(bar, last)
            for e in events:
                _say(bar, f"ALARM [{e.action}] {e.message}")
        stop_events = [e for e in events if e.action in ("stop", "stop_keep_healthy")]
        if D.broadcast_flag(bool(stop_events), device):  # every rank leaves the loop together
            stopped = True
            _finish_stop(run_dir, stop_events, healthy_ckpt, rank)
            break
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps:
            save(step, healthy=monitor.last_healthy_step == step)
    if bar is not None:
        bar.close()
    if rank == 0:
        metrics_out.close()
        tb.close()
    if not stopped:
        export_encoder(model, run_dir / "encoder.safetensors")
    D.barrier()
    return RunResult(run_dir, step, stopped, last)


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
        (run_dir / "checkpoints" / healthy_ckpt / "HEALTHY").write_text(msg + "\n", encoding="utf-8")
        (run_dir / "checkpoints" / "last_healthy").write_text(healthy_ckpt + "\n", encoding="utf-8")
        msg += f" -- last healthy checkpoint: checkpoints/{healthy_ckpt}"
    elif keep:
        msg += " -- no healthy checkpoint was saved before the alarm"
    print(f"run stopped by alarm: {msg}", file=sys.stderr, flush=True)


def export_encoder(model: SSLModel, out: Path) -> None:
    """Student encoder weights as safetensors (collective under ZeRO-3; rank 0 writes)."""
    state = _full_state(model.encoder)
    if D.rank() == 0:
        tmp = out.with_suffix(".tmp")
        C.save_tensors(state, tmp)
        os.replace(tmp, out)


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
    bar.update(m["step"] - bar.n)
    post = {"loss": f"{m['loss']:.4f}", "samples/s": f"{m['samples_per_s']:.2f}", "lr": f"{m['lr']:.2e}"}
    if "monitor/embedding_std" in m:
        post["std"] = f"{m['monitor/embedding_std']:.2f}"
    bar.set_postfix(post, refresh=False)
