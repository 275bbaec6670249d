"""Weighted sum of objectives that share one ForwardContext, so a view is encoded once per micro-batch."""

from __future__ import annotations

import torch
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput
from sslkit.objectives.registry import build_objective


class Composite(Objective):
    """loss = sum_i weight_i * loss_i; logs 'loss/<name>' per objective (unweighted) plus each one's own logs."""

    name = "composite"

    def __init__(self, objectives: list[Objective], weights: list[float]):
        super().__init__()
        if len(objectives) != len(weights) or not objectives:
            raise ValueError("Composite needs one weight per objective and at least one objective")
        self.objectives = nn.ModuleList(objectives)
        self.weights = [float(w) for w in weights]
        self.last_encoder_calls = 0

    @classmethod
    def from_specs(cls, specs: list[dict], encoder: nn.Module) -> "Composite":
        objs = [build_objective(s, encoder, i) for i, s in enumerate(specs)]
        return cls(objs, [s.get("weight", 1.0) for s in specs])

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        total: torch.Tensor | None = None
        logs: dict = {}
        embeddings = teacher_embeddings = None
        for obj, w in zip(self.objectives, self.weights):
            out = obj(batch, encoder, ctx)
            total = w * out.loss if total is None else total + w * out.loss
            logs[f"loss/{obj.name}"] = out.loss.detach()  # a tensor: the engine reads a step's logs at once
            logs.update({f"{obj.name}/{k}": v for k, v in out.logs.items()})
            if embeddings is None and out.embeddings is not None:
                embeddings, teacher_embeddings = out.embeddings, out.teacher_embeddings
        self.last_encoder_calls = ctx.encoder_calls
        return ObjectiveOutput(total, logs, embeddings, teacher_embeddings)

    def data_requests(self) -> dict:
        """Merged data requests of the objectives (`Objective.data_requests`, `sslkit.data.pretrain`). ValueError
        when two objectives ask for the same thing with different settings."""
        merged: dict = {}
        for obj in self.objectives:
            for name, settings in obj.data_requests().items():
                if name in merged and merged[name] != settings:
                    raise ValueError(f"objectives ask for '{name}' data with different settings: "
                                     f"{merged[name]} and {settings}")
                merged[name] = dict(settings)
        return merged

    def check_config(self, cfg, index: int = 0) -> None:
        """Every objective's `check_config` with its own index in cfg.objectives, and their data requests merged
        (ConfigError when two ask for the same data with different settings)."""
        from sslkit.errors import ConfigError

        for i, obj in enumerate(self.objectives):
            obj.check_config(cfg, i)
        try:
            self.data_requests()
        except ValueError as e:
            raise ConfigError(f"objectives: {e}") from None

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        for obj in self.objectives:
            obj.on_optimizer_step(step, total_steps)

    def teachers(self) -> dict:
        return {f"{i}.{k}": t for i, o in enumerate(self.objectives) for k, t in o.teachers().items()}

    def generators(self) -> dict[str, torch.Generator]:
        return {f"{i}.{k}": g for i, o in enumerate(self.objectives) for k, g in o.generators().items()}

    def log_scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.objectives:
            out.update(o.log_scalars())
        return out
