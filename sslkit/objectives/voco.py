"""VoCo, volume contrast (Wu, Zhuang, Chen, CVPR 2024, arXiv 2402.17300): predict where a random crop lies among
the base crops of its volume by its similarity to them, and keep the base crops of one volume apart.

Per volume b, with G = n x n base crops q_g (B, G, D) and R random crops p_r (B, R, D) (projected global
embeddings) and overlap targets y (B, R, G) (`sslkit.data.multicrop.overlap_targets`):

    l[r, g]  = max(0, cos(p_r, sg(q_g)))                                    position logits, base detached
    pos_b    = sum_{r,g} y[r,g] * -log(1 - |y[r,g] - l[r,g]| + 1e-6) / (sum_{r,g} y[r,g] + 1e-6)
    neg_b    = sum_{r,g: y[r,g]=0} l[r,g]^2 / (#{y[r,g] = 0} + 1e-6)
    reg_b    = mean_{i<j} max(0, cos(q_i, sg(q_j)))^2                       base crops pushed towards cos 0
    loss     = mean_b (pos_b + neg_b) + reg_weight * mean_b reg_b

This is the authors' code (`Luffy03/VoCo` models/voco_head.py: `online_assign`, `ce_loss`, `regularization_loss`;
voco_train.py logs pos, neg and base and sums them with weight 1). The paper's Eq. 3, as MIC-DKFZ/nnssl's
reimplementation reads it, is one uniform term over all pairs; `prediction="uniform"` gives that form:
    pred_b = -mean_{r,g} log(1 - |y[r,g] - l[r,g]| + 1e-6).

With its teacher (`teacher: ema`, the default: the journal version, `Luffy03/Large-Scale-Medical`
Self-supervised/models/voco_head.py): one backbone, a student projector p and an EMA teacher projector p' (momentum
0.9, constant) on the same backbone embeddings; the student's embeddings pass a Dropout1d(0.2) first (on (N, D)
embeddings it zeroes whole embeddings, as the release's call does). Per volume b, with b' = (b + 1) mod B:
    intra_b  = ce(y, l(p(rand_b), p'(base_b)))                             student crops vs teacher bases
    inter_b  = ce(sg(l(p'(rand_b), p'(base_b'))), l(p(rand_b), p(base_b')))  another volume's bases, teacher target
    loss     = mean_b intra_b + inter_weight * mean_b inter_b + reg_weight * mean_b reg_b(p(base_b))
    ce(y, l) = pos as above + neg_b = -sum_{y=0} log(1 - l + 1e-6) / (#{y = 0} + 1e-6)   (negative: log)
The teacher moves once per optimizer step (sslkit.objectives.teacher), which with no accumulation is the release's
update before every forward. `teacher: none` is the single-encoder CVPR form above (the student's own base
embeddings detached, negative: square, no dropout, no inter term). `Luffy03/VoCo` (the CVPR code's 2024 update)
instead keeps a whole EMA network and averages student-vs-teacher and teacher-vs-student logits; not offered here.
Projector as the authors': Linear(in, 2048) -> BN -> ReLU -> Linear(2048, 2048) -> BN -> ReLU ->
Linear(2048, 2048), BatchNorm without affine or running statistics ("norm on all instances": base and random
crops of the whole micro-batch are encoded and normalised together). Its input here is the pooled deepest stage
(768-d for Swin-UNETR feature_size 48); the 10k release concatenates five pooled stages (1152-d).

Paper / code defaults in sslkit terms:
- VoCo repo (CVPR release, "10k" corpus): CT clipped -175..250 HU -> [0, 1], foreground crop, volume resized
  to 384 x 384 x 96; grid n = 4 of 96^3 base crops (each resized to 64^3 for the network), 2 random 96^3 crops
  per volume in the region (full depth), batch 2 volumes, AdamW lr 1e-4 (amsgrad, default weight decay 0.01),
  warm-up 5000 steps then cosine, 250k steps, Swin-UNETR feature_size 48.
- Large-Scale-Medical (journal version): spacing 1.5 mm, a random 192 x 192 x 64 region, grid n = 3 of 64^3
  crops, 2 random crops per volume, batch 2-4 volumes per GPU on 8 GPUs, AdamW lr 1e-4 (amsgrad), warm-up 5000.
  In a recipe: data.roi [64, 64, 64], spacing [1.5, 1.5, 1.5], objective options grid 3, n_random 2.

The crops come from the data pipeline: `data_requests()` returns {"voco": {"grid", "n_random"}}, which the trainer
hands to `sslkit.data.pretrain.PretrainDataset`; each item is then one volume's sample (a micro-batch counts volumes).

Batch keys: "voco_base" (B, G, C, *roi), "voco_random" (B, R, C, *roi), "voco_targets" (B, R, G) float.
    obj = VoCo(encoder, hidden_dim=256, out_dim=256)
    out = obj({"voco_base": base, "voco_random": rand, "voco_targets": y}, encoder)  # out.loss, out.logs
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, full_precision, pooled
from sslkit.objectives.registry import register_objective
from sslkit.objectives.teacher import EMATeacher

PROJECTOR_NORMS = ("batch", "sync", "layer", "none")
PREDICTIONS = ("official", "uniform")
TEACHERS = ("ema", "none")
NEGATIVES = ("square", "log")
_EPS = 1e-6


def _projector_norm(kind: str, dim: int) -> nn.Module:
    """The authors' BatchNorm1d(affine=False, track_running_stats=False): batch statistics in train and eval."""
    if kind == "batch":
        return nn.BatchNorm1d(dim, affine=False, track_running_stats=False)
    if kind == "sync":
        return nn.SyncBatchNorm(dim, affine=False, track_running_stats=False)
    if kind == "layer":
        return nn.LayerNorm(dim, elementwise_affine=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"head_norm '{kind}' is not one of {', '.join(PROJECTOR_NORMS)}")


class VoCoProjector(nn.Sequential):
    """Three-layer projector: Linear(in, hidden) -> norm -> ReLU -> Linear(hidden, hidden) -> norm -> ReLU ->
    Linear(hidden, out). (N, in_dim) -> (N, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, norm: str = "batch"):
        super().__init__(nn.Linear(in_dim, hidden_dim), _projector_norm(norm, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim), _projector_norm(norm, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def position_logits(rand_proj: torch.Tensor, base_proj: torch.Tensor, detach_base: bool = True) -> torch.Tensor:
    """l = max(0, cos(p_r, sg(q_g))): rand_proj (B, R, D), base_proj (B, G, D) -> (B, R, G). The base side is
    detached (unless detach_base is False), so the prediction term trains the encoder only through the random
    crops."""
    p = F.normalize(rand_proj.float(), dim=-1)
    q = F.normalize((base_proj.detach() if detach_base else base_proj).float(), dim=-1)
    with full_precision(p.device):  # fp32 cosines under bf16 autocast: the targets are overlap fractions
        return torch.relu(p @ q.transpose(1, 2))


def prediction_loss(logits: torch.Tensor, targets: torch.Tensor, form: str = "official", negative: str = "square"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, pos, neg) averaged over volumes; logits, targets (B, R, G).

    official: pos_b = sum y * -log(1 - |y - l| + 1e-6) / (sum y + 1e-6); neg_b = mean over the zero targets of l^2
    (negative: square, the CVPR code) or of -log(1 - l + 1e-6) (negative: log, the journal code); pred = pos + neg.
    uniform: pred = pos = -mean log(1 - |y - l| + 1e-6) over all pairs, neg = 0."""
    if negative not in NEGATIVES:
        raise ValueError(f"negative '{negative}' is not one of {', '.join(NEGATIVES)}")
    y = targets.float()
    nll = -torch.log(1.0 - (y - logits).abs() + _EPS)  # (B, R, G)
    if form == "uniform":
        pos = nll.flatten(1).mean(1).mean()
        return pos, pos, torch.zeros((), device=logits.device)
    if form != "official":
        raise ValueError(f"prediction '{form}' is not one of {', '.join(PREDICTIONS)}")
    pos = ((y * nll).flatten(1).sum(1) / (y.flatten(1).sum(1) + _EPS)).mean()
    zero = (y == 0).to(logits.dtype)
    penalty = logits**2 if negative == "square" else -torch.log(1.0 - logits + _EPS)
    neg = ((zero * penalty).flatten(1).sum(1) / (zero.flatten(1).sum(1) + _EPS)).mean()
    return pos + neg, pos, neg


def regularization_loss(base_proj: torch.Tensor) -> torch.Tensor:
    """mean_b mean_{i<j} max(0, cos(q_i, sg(q_j)))^2 over the G base crops of each volume: (B, G, D) -> scalar.
    As the authors', the later crop of each pair is detached (the gradient moves q_i away from q_j)."""
    g = base_proj.shape[1]
    if g < 2:
        return base_proj.sum() * 0.0
    q = F.normalize(base_proj.float(), dim=-1)
    with full_precision(q.device):
        sim = torch.relu(q @ q.detach().transpose(1, 2))  # (B, G, G): row i has the gradient
    i, j = torch.triu_indices(g, g, offset=1, device=base_proj.device)
    return (sim[:, i, j] ** 2).mean()


@register_objective("voco")
class VoCo(Objective):
    """Volume contrast on a pooled global embedding of the deepest stage (any encoder, 2-D or 3-D).

    Options: hidden_dim (2048), out_dim (2048), head_norm (batch | sync | layer | none; the authors' batch
    norm has no affine and no running statistics), reg_weight (1.0), prediction (official | uniform), grid (n of
    the n x n base crops, 3) and n_random (random crops per volume, 2), which the data pipeline cuts;
    teacher (ema: the journal version's EMA projector | none: the single-encoder CVPR form), momentum (0.9, the
    teacher's constant EMA momentum per optimizer step), and, defaulting by teacher (ema / none): negative (log /
    square), feature_dropout (0.2 / 0.0: probability of zeroing a student embedding), inter_weight (1.0 / 0.0:
    the inter-volume term, needs the teacher).
    Logs: pred, pos, neg, reg, acc (share of random crops whose largest logit is at their largest target), and
    inter with the teacher.
    Embeddings for the monitor: the random crops' projections (B * R, out_dim) (teacher: its projections of them).
    """

    def __init__(self, encoder: nn.Module, hidden_dim: int = 2048, out_dim: int = 2048, head_norm: str = "batch",
                 reg_weight: float = 1.0, prediction: str = "official", grid: int = 3, n_random: int = 2,
                 teacher: str = "ema", momentum: float = 0.9, negative: str | None = None,
                 feature_dropout: float | None = None, inter_weight: float | None = None):
        super().__init__()
        if int(grid) < 1 or int(n_random) < 1:
            raise ValueError(f"grid and n_random must be >= 1, got grid {grid}, n_random {n_random}")
        self.grid, self.n_random = int(grid), int(n_random)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction '{prediction}' is not one of {', '.join(PREDICTIONS)}")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher '{teacher}' is not one of {', '.join(TEACHERS)}")
        ema = teacher == "ema"
        self.negative = negative or ("log" if ema else "square")
        if self.negative not in NEGATIVES:
            raise ValueError(f"negative '{negative}' is not one of {', '.join(NEGATIVES)}")
        self.feature_dropout = float((0.2 if ema else 0.0) if feature_dropout is None else feature_dropout)
        self.inter_weight = float((1.0 if ema else 0.0) if inter_weight is None else inter_weight)
        if reg_weight < 0 or self.inter_weight < 0 or not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"reg_weight and inter_weight must be >= 0 and feature_dropout in [0, 1), got "
                             f"{reg_weight}, {self.inter_weight}, {self.feature_dropout}")
        if self.inter_weight and not ema:
            raise ValueError("inter_weight needs the teacher (teacher: ema): its targets are the teacher's logits")
        self.reg_weight = float(reg_weight)
        self.prediction = prediction
        self.projector = VoCoProjector(encoder.out_channels, hidden_dim, out_dim, head_norm)
        self.teacher = EMATeacher({"projector": self.projector}, momentum, "constant") if ema else None

    def teachers(self) -> dict[str, EMATeacher]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.teacher is not None:
            self.teacher.update(step, total_steps)

    def log_scalars(self) -> dict[str, float]:
        if self.teacher is None:
            return {}
        return {"ema_tau": self.teacher.tau, "ema_updates": float(self.teacher.updates)}

    def data_requests(self) -> dict:
        """What the data pipeline must put in each item: {"voco": {"grid", "n_random"}} (module docstring)."""
        return {"voco": {"grid": self.grid, "n_random": self.n_random}}

    @staticmethod
    def _crops(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            base, rand, targets = batch["voco_base"], batch["voco_random"], batch["voco_targets"]
        except KeyError as e:
            raise ValueError(f"voco needs batch key {e.args[0]!r} (voco_base, voco_random, voco_targets)") from None
        b, g = base.shape[:2]
        r = rand.shape[1]
        if rand.shape[0] != b or base.shape[2:] != rand.shape[2:] or tuple(targets.shape) != (b, r, g):
            raise ValueError(f"voco batch shapes disagree: base {tuple(base.shape)}, random {tuple(rand.shape)}, "
                             f"targets {tuple(targets.shape)} (want (B, G, C, *roi), (B, R, C, *roi), (B, R, G))")
        return base, rand, targets

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        base, rand, targets = self._crops(batch)
        b, g, r = base.shape[0], base.shape[1], rand.shape[1]
        crops = torch.cat([base.flatten(0, 1), rand.flatten(0, 1)])  # (B*G + B*R, C, *roi): one encoder call
        h = pooled(ctx.features("voco:crops", crops)[-1])  # (B*(G+R), C_deep)
        if self.feature_dropout:
            h_student = F.dropout1d(h, self.feature_dropout, self.training)  # (N, D) as (C, L): whole embeddings
        else:
            h_student = h
        base_proj, rand_proj = self._split(self.projector(h_student), b, g, r)  # (B, G, D), (B, R, D)
        logs: dict[str, float] = {}
        if self.teacher is None:
            logits = position_logits(rand_proj, base_proj)  # (B, R, G)
            t_rand = None
        else:
            with torch.no_grad():
                t_base, t_rand = self._split(self.teacher["projector"](h.detach().float()).float(), b, g, r)
            logits = position_logits(rand_proj, t_base)  # student crops vs teacher bases
        pred, pos, neg = prediction_loss(logits, targets, self.prediction, self.negative)
        reg = regularization_loss(base_proj)
        loss = pred + self.reg_weight * reg
        if self.inter_weight:
            inter = self._inter_volume(rand_proj, base_proj, t_rand, t_base)
            loss = loss + self.inter_weight * inter
            logs["inter"] = inter.detach()
        hit = (logits.detach().argmax(-1) == targets.argmax(-1)).float().mean()
        logs.update({"pred": pred.detach(), "pos": pos.detach(), "neg": neg.detach(), "reg": reg.detach(),
                     "acc": hit})
        return ObjectiveOutput(loss, logs, embeddings=rand_proj.detach().float().flatten(0, 1),
                               teacher_embeddings=None if t_rand is None else t_rand.flatten(0, 1))

    @staticmethod
    def _split(z: torch.Tensor, b: int, g: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of [bases; random crops] (B*(G+R), D) -> (B, G, D), (B, R, D)."""
        return z[: b * g].unflatten(0, (b, g)), z[b * g:].unflatten(0, (b, r))

    def _inter_volume(self, rand_proj, base_proj, t_rand, t_base) -> torch.Tensor:
        """Random crops of volume b against the bases of volume b + 1 (mod B): the teacher's logits are the target
        of the student's (both sides of the student's logits carry gradient, as the journal code)."""
        target = position_logits(t_rand, t_base.roll(-1, dims=0))
        logits = position_logits(rand_proj, base_proj.roll(-1, dims=0), detach_base=False)
        return prediction_loss(logits, target.detach(), "official", self.negative)[0]
