"""BYOL (Grill et al. 2020) with an EMA teacher updated once per optimizer step.

loss = 1/2 [ (2 - 2 cos(q1, sg(z2'))) + (2 - 2 cos(q2, sg(z1'))) ], averaged over the batch, where
q_i = predictor(projector(pool(encoder(view_i)[-1]))) and z_i' = teacher projector(pool(teacher encoder(view_i))).
The teacher follows tau_k = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2 with k, K counted in optimizer steps;
the engine calls `on_optimizer_step` only after a real optimizer step, never per micro-batch (this fixes the
QT-UNet thesis quirk, §5.1.5, where the teacher moved once per micro-batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.heads import MLPHead
from sslkit.objectives.registry import register_objective
from sslkit.objectives.teacher import EMATeacher
from sslkit.objectives.views import CorruptionSpec, feature_key, shared_view


_NEG_COS = NegativeCosineSimilarity(dim=-1)


def byol_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(q, z) per sample, averaged: q, z (B, D); z is detached by the caller. lightly's
    NegativeCosineSimilarity gives -mean cos(q, z)."""
    return 2.0 + 2.0 * _NEG_COS(q, z)


@register_objective("byol")
class BYOL(Objective):
    """Options: hidden_dim (4096), out_dim (256), head_norm (batch | sync | layer | none), tau_base (0.996),
    tau_schedule (cosine | constant), use_predictor (True; False gives the collapse-prone variant the
    monitor tests use), views (the two batch keys), view ("plain": the batch views as they are; "rot_cutout"
    etc.: share the corrupted view that rotation / inpainting objectives read, so the encoder runs once per
    view - the QT-UNet thesis SSL set), plane (rotation plane when the view rotates).
    """

    def __init__(self, encoder: nn.Module, hidden_dim: int = 4096, out_dim: int = 256, head_norm: str = "batch",
                 tau_base: float = 0.996, tau_schedule: str = "cosine", use_predictor: bool = True,
                 views: list[str] = ("view1", "view2"), view: str = "plain", plane: list[int] = (-2, -1)):
        super().__init__()
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
        self.views = tuple(views)
        self.view = view
        self.spec = CorruptionSpec.from_view_name(view, plane=tuple(plane), keys=self.views)
        self.projector = MLPHead(encoder.out_channels, hidden_dim, out_dim, head_norm)
        self.predictor = MLPHead(out_dim, hidden_dim, out_dim, head_norm) if use_predictor else nn.Identity()
        self.teacher = EMATeacher({"encoder": encoder, "projector": self.projector}, tau_base, tau_schedule)

    def teachers(self) -> dict[str, EMATeacher]:
        return {"teacher": self.teacher}

    @torch.no_grad()
    def _teacher_embed(self, x: torch.Tensor) -> torch.Tensor:
        enc, proj = self.teacher["encoder"], self.teacher["projector"]
        feats = enc(x.to(next(enc.parameters()).dtype))
        return proj(pooled(feats[-1]))

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        a, b = self.views
        inputs = batch if self.view == "plain" else shared_view(ctx, self.view, self.spec, check=("keys",))
        z1 = self.projector(pooled(ctx.features(feature_key(self.view, a), inputs[a])[-1]))  # (B, C) -> (B, out)
        z2 = self.projector(pooled(ctx.features(feature_key(self.view, b), inputs[b])[-1]))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = self._teacher_embed(inputs[a]), self._teacher_embed(inputs[b])
        loss = 0.5 * (byol_loss(q1.float(), t2) + byol_loss(q2.float(), t1))
        logs = {"cos_q_t": F.cosine_similarity(q1.detach().float(), t2, dim=-1).mean()}
        return ObjectiveOutput(loss, logs, embeddings=z1.detach().float(), teacher_embeddings=t1)

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(step, total_steps)

    def log_scalars(self) -> dict[str, float]:
        return {"ema_tau": self.teacher.tau, "ema_updates": float(self.teacher.updates)}
