"""DINO (Caron et al., ICCV 2021, arXiv 2104.14294) for 2-D / 3-D encoders: self-distillation with multi-crop.

The data pipeline cuts G global crops (data.roi) and L local crops (local_size x roi) per item from one region
(`sslkit.data.pretrain`, the "multicrop" request; `sslkit.data.multicrop.crop_boxes`). With h = pool(encoder(x)[-1])
and the head g = DINOHead (lightly's DINOProjectionHead: MLP -> L2 norm -> weight-normalised layer to K prototypes):

    student  s_v = g(h(x_v)) for every crop v (globals in one encoder forward, locals in another)
    teacher  t_v = g'(h'(x_v)) for the global crops only (EMA copy of encoder and head, no gradient)
    loss     = mean over pairs (teacher view i, student view j != i) of
               mean_b  -sum_k softmax((t_i - c) / T_t)_k  log softmax(s_j / T_s)_k         (lightly's DINOLoss)
    c        <- m c + (1 - m) mean(t)   after every forward (all-reduced over ranks), m = center_momentum
    + koleo_weight * sum over global views of KoLeo(h(x_v))                              (optional, DINOv2)

T_t is warmed up from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_steps optimizer steps; the
teacher moves by tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 once per optimizer step (sslkit.objectives.teacher,
k and K in optimizer steps, fp32, outside ZeRO); the last layer takes no gradient for the first
freeze_last_layer_steps steps (DINO: the first epoch).

Published 3-D settings (SPECS.md): 3DINO (AICONSlab/3DINO) 2 global 96^3 + 8 local 48^3 crops, momentum 0.992 -> 1,
teacher temperature 0.04 -> 0.07 over 30 epochs, heads 65536 / 256 / 2048, KoLeo 0.1; VoxelFM (rmaguado/VoxelFM)
2 global 112^3 (scale 0.32-1.0) + 8 local 56^3 (0.05-0.32), momentum 0.994, KoLeo 0.1. DINO's own defaults:
student temperature 0.1, centre momentum 0.9. sslkit's crops are cubic boxes holding a volume fraction of a region
of `region` x roi voxels (3DINO draws in-slice and cross-slice scales apart).

Batch keys: "global_crops" (B, G, C, *roi), "local_crops" (B, L, C, *local_roi) (absent when n_local is 0).
    obj = DINO(encoder, out_dim=1024, hidden_dim=256, bottleneck_dim=64, n_local=2)
    out = obj({"global_crops": g, "local_crops": l}, encoder)   # out.loss, out.logs["teacher_temp"]
Embeddings for the monitor: the head's bottleneck of the first global crop (teacher: the same crop).
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss, KoLeoLoss
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.distill import DINOHead, views_to_batch, warmup_value
from sslkit.objectives.registry import register_objective
from sslkit.objectives.teacher import EMATeacher


def _check_range(name: str, value, low: float = 0.0, high: float = 1.0) -> list[float]:
    lo, hi = (float(v) for v in value)
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} {list(value)} must satisfy {low} < low <= high <= {high}")
    return [lo, hi]


@register_objective("dino")
class DINO(Objective):
    """Options: out_dim (K prototypes, 65536), hidden_dim (2048), bottleneck_dim (256), batch_norm (False),
    norm_last_layer (True), student_temp (0.1), teacher_temp (0.04), warmup_teacher_temp (0.04),
    warmup_teacher_temp_steps (0), center_momentum (0.9), tau_base (0.996), tau_schedule (cosine | constant),
    freeze_last_layer_steps (0), koleo_weight (0: off); crops, cut by the data pipeline: n_global (2), n_local (8),
    local_size (0.5 of roi), region (1.5: edge of the region the crops come from, in roi), global_scale
    ([0.32, 1.0]) and local_scale ([0.05, 0.32]) (volume fractions of the region, VoxelFM's).
    Logs: dino (the distillation term), teacher_temp, koleo (when on), teacher_entropy (mean entropy of the centred,
    sharpened teacher distribution per crop: log K for a teacher flattened to uniform; the loss minus it is the
    student's KL to the teacher)."""

    def __init__(self, encoder: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 batch_norm: bool = False, norm_last_layer: bool = True, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 center_momentum: float = 0.9, tau_base: float = 0.996, tau_schedule: str = "cosine",
                 freeze_last_layer_steps: int = 0, koleo_weight: float = 0.0, n_global: int = 2, n_local: int = 8,
                 local_size: float = 0.5, region: float = 1.5, global_scale: list[float] = (0.32, 1.0),
                 local_scale: list[float] = (0.05, 0.32)):
        super().__init__()
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError("student_temp, teacher_temp and warmup_teacher_temp must be positive")
        if int(n_global) < 1 or int(n_global) + int(n_local) < 2:
            raise ValueError(f"dino needs n_global >= 1 and at least two crops, got n_global {n_global}, "
                             f"n_local {n_local}")
        self.crops = {"n_global": int(n_global), "n_local": int(n_local), "local_size": float(local_size),
                      "region": float(region), "global_scale": _check_range("global_scale", global_scale),
                      "local_scale": _check_range("local_scale", local_scale)}
        self.temps = (float(warmup_teacher_temp), float(teacher_temp), int(warmup_teacher_temp_steps))
        self.freeze_last_layer_steps = int(freeze_last_layer_steps)
        self.koleo_weight = float(koleo_weight)
        self.head = DINOHead(encoder.out_channels, hidden_dim, bottleneck_dim, out_dim, batch_norm, norm_last_layer)
        self.loss_fn = DINOLoss(out_dim, warmup_teacher_temp, teacher_temp, 1, student_temp, center_momentum)
        self.koleo = KoLeoLoss()
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))  # optimizer steps, checkpointed
        self.teacher = EMATeacher({"encoder": encoder, "head": self.head}, tau_base, tau_schedule)

    def data_requests(self) -> dict:
        return {"multicrop": dict(self.crops)}

    def teachers(self) -> dict[str, EMATeacher]:
        return {"teacher": self.teacher}

    def teacher_temp(self) -> float:
        start, end, warmup = self.temps
        return warmup_value(int(self.steps_done), start, end, warmup)

    def _last_layers(self) -> list[nn.Module]:
        return [self.head.last_layer]

    # ------------------------------------------------------------------------------------ forward parts

    @staticmethod
    def global_crops(batch: dict) -> tuple[torch.Tensor, int, int]:
        """(G * B, C, *roi) view-major, G, B."""
        if "global_crops" not in batch:
            raise ValueError(f"this objective needs batch key 'global_crops' (the multicrop data request), got "
                             f"{', '.join(sorted(batch))}")
        g = batch["global_crops"]
        return views_to_batch(g), g.shape[1], g.shape[0]

    def student_globals(self, x: torch.Tensor, batch: dict, encoder: nn.Module, ctx: ForwardContext
                        ) -> list[torch.Tensor]:
        """Student stage maps of the global crops (DINO: as they are; iBOT masks them)."""
        return ctx.features("multicrop:global", x)

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.teacher["encoder"]
        return enc(x.to(next(enc.parameters()).dtype))

    def extra_terms(self, student: list[torch.Tensor], teacher: list[torch.Tensor], batch: dict
                    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Further loss terms on the global crops' stage maps (iBOT's patch term). DINO: none."""
        return None, {}

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        x, n_g, b = self.global_crops(batch)
        for layer in self._last_layers():
            layer.frozen = int(self.steps_done) < self.freeze_last_layer_steps
        s_feats = self.student_globals(x, batch, encoder, ctx)
        h = pooled(s_feats[-1])  # (G*B, C_deep)
        crops = [h]
        if self.crops["n_local"]:
            loc = views_to_batch(batch["local_crops"])  # (L*B, C, *local_roi): the second encoder forward
            crops.append(pooled(ctx.features("multicrop:local", loc)[-1]))
        z, out = self.head.project(torch.cat(crops))  # one head call over every crop, as DINO's multi-crop wrapper
        z = z[: h.shape[0]]
        student = list(out.float().chunk(n_g + self.crops["n_local"]))  # one (B, K) per crop, globals first
        t_feats = self.teacher_features(x)
        with torch.no_grad():
            t_z, t_out = self.teacher["head"].project(pooled(t_feats[-1]))
        temp = self.teacher_temp()
        t_out = t_out.float()
        entropy = _teacher_entropy(t_out, self.loss_fn.center, temp)
        loss = self.loss_fn(list(t_out.chunk(n_g)), student, teacher_temp=temp)
        logs = {"dino": float(loss.detach()), "teacher_temp": temp, "teacher_entropy": entropy}
        if self.koleo_weight:
            koleo = sum(self.koleo(v) for v in h.float().chunk(n_g))
            loss = loss + self.koleo_weight * koleo
            logs["koleo"] = float(koleo.detach())
        extra, extra_logs = self.extra_terms(s_feats, t_feats, batch)
        if extra is not None:
            loss = loss + extra
        logs.update(extra_logs)
        return ObjectiveOutput(loss, logs, embeddings=z[:b].detach().float(), teacher_embeddings=t_z[:b].float())

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(step, total_steps)
        self.steps_done.fill_(step)

    def log_scalars(self) -> dict[str, float]:
        return {"ema_tau": self.teacher.tau, "ema_updates": float(self.teacher.updates)}


@torch.no_grad()
def _teacher_entropy(t_out: torch.Tensor, center: torch.Tensor, temp: float) -> float:
    """Mean over crops of the entropy of the teacher's distribution softmax((t - c) / T): near log K when the
    teacher has flattened to uniform (DINO's collapse by centring), low when it is sharp."""
    logp = torch.log_softmax((t_out - center.reshape(1, -1).to(t_out)) / temp, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())
