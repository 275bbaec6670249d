"""Learning-rate schedules indexed in optimizer steps, one set for both training loops (`optim.schedule`)."""

from __future__ import annotations

import functools
import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int, group_factors=None):
    """The schedule `optim.schedule` names, stepped once per optimizer step over `total_steps`:
    cosine      linear warm-up over optim.warmup_steps, then cosine to optim.min_lr_ratio x lr
    constant    linear warm-up, then lr
    one_cycle   torch's OneCycleLR peaking at each parameter group's lr (PUNet prompt tuning).
    `group_factors`: one multiplier fn(step) per parameter group on top of cosine / constant (a fine-tuning transfer
    schedule, sslkit.downstream.adapt)."""
    o = optim_cfg
    if o.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=max(2, total_steps))
    if o.schedule == "constant":
        base = functools.partial(warmup_constant, warmup_steps=o.warmup_steps)
    else:
        base = functools.partial(warmup_cosine, warmup_steps=o.warmup_steps, total_steps=total_steps,
                                 min_ratio=o.min_lr_ratio)
    if group_factors is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [functools.partial(_times, base, f) for f in group_factors])


def _times(base, factor, step: int) -> float:
    return base(step) * factor(step)
