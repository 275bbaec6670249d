"""The optimizer factory both loops use, with one weight-decay policy: biases and normalisation weights (every
parameter of one dimension) are never decayed.

    opt = make_optimizer(model, cfg.optim)                         # every trainable parameter
    opt = make_optimizer(model, cfg.optim, groups=adaptation.groups)  # groups with their own lr / weight decay
"""

from __future__ import annotations

import torch
from torch import nn


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether weight decay applies: not to biases nor to norm weights / scales (1-D parameters)."""
    return p.ndim > 1 and not name.endswith(".bias")


def split_decay(model: nn.Module, groups: list[dict], weight_decay: float) -> list[dict]:
    """Each group in two: its decayed parameters (the group's own weight_decay, else `weight_decay`) and the rest
    (weight decay 0). Other group keys (lr, name, ...) are kept; empty groups are dropped."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        wd = g.get("weight_decay", weight_decay)
        extra = {k: v for k, v in g.items() if k not in ("params", "weight_decay")}
        yes = [p for p in params if decays(names.get(id(p), ""), p)]
        no = [p for p in params if not decays(names.get(id(p), ""), p)]
        out += [{**extra, "params": ps, "weight_decay": w} for ps, w in ((yes, wd), (no, 0.0)) if ps]
    return out


def make_optimizer(model: nn.Module, o, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """`optim.name` (adamw | adam | sgd with momentum betas[0]) over `groups` (default: one group of every trainable
    parameter of `model`); a group may carry its own lr and weight_decay."""
    groups = split_decay(model, groups or [{"params": list(model.parameters())}], o.weight_decay)
    fused = _fusable(groups)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.betas[0], fused=fused)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), fused=fused)


def _fusable(groups: list[dict]) -> bool | None:
    """The fused kernels (one per device and dtype) where every parameter allows them: faster, and they keep the
    step counters on the device, so an update reads nothing back to the host (the default Adam reads each
    parameter's step count with .item())."""
    params = [p for g in groups for p in g["params"]]
    return True if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) else None
