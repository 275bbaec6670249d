"""The Objective contract (DESIGN.md, "Contracts") and the per-step context that shares encoder forwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """loss: scalar tensor with grad; logs: metrics.jsonl values, floats or 0-d tensors (detached; keep them tensors
    in forward: the engine reads a step's logs from the device at once, a float() per log would wait on the device
    each micro-batch); embeddings: (B, D) for the collapse monitor."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    # Optional extra: teacher embeddings aligned with `embeddings`, for the teacher-student cosine.
    teacher_embeddings: torch.Tensor | None = None


class ForwardContext:
    """Memoises derived views and encoder forwards within one micro-batch.

    Objectives that need the same input ask for it by the same name, so the encoder runs once per view:
        x = ctx.view("rot_cutout", make_rot_cutout)       # dict built once, by the first caller
        feats = ctx.features("rot_cutout:input", x["input"])  # encoder(x) once
    `encoder_calls` counts real encoder forwards (tests use it).
    """

    def __init__(self, batch: dict, encoder: nn.Module):
        self.batch = batch
        self.encoder = encoder
        self._views: dict[str, dict] = {}
        self._features: dict[str, list[torch.Tensor]] = {}
        self.encoder_calls = 0

    def view(self, name: str, make: Callable[[dict], dict]) -> dict:
        if name not in self._views:
            self._views[name] = make(self.batch)
        return self._views[name]

    def features(self, key: str, inputs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Encoder stage maps of `inputs` (default: batch[key]), computed once per key."""
        if key not in self._features:
            x = self.batch[key] if inputs is None else inputs
            self._features[key] = self.encoder(x)
            self.encoder_calls += 1
        return self._features[key]


class Objective(nn.Module):
    """A self-supervised objective. Owns its math and its heads (as parameters); the engine owns the loop.

    forward(batch, encoder, ctx=None) -> ObjectiveOutput
    on_optimizer_step(step, total_steps): called by the engine after each real optimizer step (never per
        micro-batch); teachers and schedules advance here.
    teachers(): EMA teachers kept outside the optimizer; the engine moves, gathers and checkpoints them.
    data_requests(): what the data pipeline must put in each item (sslkit.data.pretrain, "Data requests").
    check_config(cfg, index): checks against the rest of the recipe, before any scan is read.
    """

    name: str = "objective"

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        raise NotImplementedError

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        """Default: nothing to advance."""

    def data_requests(self) -> dict:
        """Data this objective reads, by request name (sslkit.data.pretrain, "Data requests"). Default: the crop
        and its two augmented views, {"views": {}}."""
        return {"views": {}}

    def check_config(self, cfg, index: int) -> None:
        """Check this objective against the rest of the pretraining config (`sslkit.config.Config`: data, model,
        train) before any scan is read; raise ConfigError naming `objectives[index]` and the key to change.
        Default: nothing to check."""

    def teachers(self) -> dict:
        """EMA teachers (sslkit.objectives.teacher.EMATeacher) this objective owns, by name. Default: none."""
        return {}

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """Teacher tensors a checkpoint must hold (they live outside the optimizer)."""
        return {f"{n}.{k}": v for n, t in self.teachers().items() for k, v in t.state_dict().items()}

    def load_teacher_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in self.teachers().items():
            prefix = f"{n}."
            t.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def log_scalars(self) -> dict[str, float]:
        """Scalars logged once per optimizer step (e.g. ema_tau). Default: none."""
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        """Private random generators (CPU) this objective draws from, by name. The engine seeds them per rank and
        saves their states in checkpoints, so a resumed run continues the same streams. Default: none."""
        return {}


def full_precision(device: torch.device):
    """A region with autocast off (train.precision bf16): losses built on matmuls of embeddings (contrastive logits,
    position logits) stay fp32, as their temperatures and small differences need; inputs must be .float()."""
    return torch.autocast(device.type, enabled=False)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """Global average pool of a stage map: (B, C, *spatial) -> (B, C)."""
    return feature.flatten(2).mean(-1)
