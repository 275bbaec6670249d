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
The 2024 releases add an EMA teacher (momentum 0.9, moved every forward): `Luffy03/VoCo` averages the logits of
student crops vs teacher bases and teacher crops vs student bases; `Large-Scale-Medical` contrasts student crops
with teacher bases. This single-encoder form detaches the student's own base embeddings instead.
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

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.registry import register_objective

PROJECTOR_NORMS = ("batch", "sync", "layer", "none")
PREDICTIONS = ("official", "uniform")
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


def position_logits(rand_proj: torch.Tensor, base_proj: torch.Tensor) -> torch.Tensor:
    """l = max(0, cos(p_r, sg(q_g))): rand_proj (B, R, D), base_proj (B, G, D) -> (B, R, G). The base side is
    detached, so the prediction term trains the encoder only through the random crops."""
    p = F.normalize(rand_proj.float(), dim=-1)
    q = F.normalize(base_proj.detach().float(), dim=-1)
    return torch.relu(p @ q.transpose(1, 2))


def prediction_loss(logits: torch.Tensor, targets: torch.Tensor, form: str = "official"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, pos, neg) averaged over volumes; logits, targets (B, R, G).

    official: pos_b = sum y * -log(1 - |y - l| + 1e-6) / (sum y + 1e-6); neg_b = mean of l^2 over the zero
    targets; pred = pos + neg. uniform: pred = pos = -mean log(1 - |y - l| + 1e-6) over all pairs, neg = 0."""
    y = targets.float()
    nll = -torch.log(1.0 - (y - logits).abs() + _EPS)  # (B, R, G)
    if form == "uniform":
        pos = nll.flatten(1).mean(1).mean()
        return pos, pos, torch.zeros((), device=logits.device)
    if form != "official":
        raise ValueError(f"prediction '{form}' is not one of {', '.join(PREDICTIONS)}")
    pos = ((y * nll).flatten(1).sum(1) / (y.flatten(1).sum(1) + _EPS)).mean()
    zero = (y == 0).to(logits.dtype)
    neg = ((zero * logits**2).flatten(1).sum(1) / (zero.flatten(1).sum(1) + _EPS)).mean()
    return pos + neg, pos, neg


def regularization_loss(base_proj: torch.Tensor) -> torch.Tensor:
    """mean_b mean_{i<j} max(0, cos(q_i, sg(q_j)))^2 over the G base crops of each volume: (B, G, D) -> scalar.
    As the authors', the later crop of each pair is detached (the gradient moves q_i away from q_j)."""
    g = base_proj.shape[1]
    if g < 2:
        return base_proj.sum() * 0.0
    q = F.normalize(base_proj.float(), dim=-1)
    sim = torch.relu(q @ q.detach().transpose(1, 2))  # (B, G, G): row i has the gradient
    i, j = torch.triu_indices(g, g, offset=1, device=base_proj.device)
    return (sim[:, i, j] ** 2).mean()


@register_objective("voco")
class VoCo(Objective):
    """Volume contrast on a pooled global embedding of the deepest stage (any encoder, 2-D or 3-D).

    Options: hidden_dim (2048), out_dim (2048), head_norm (batch | sync | layer | none; the authors' batch
    norm has no affine and no running statistics), reg_weight (1.0), prediction (official | uniform), grid (n of
    the n x n base crops, 3) and n_random (random crops per volume, 2), which the data pipeline cuts.
    Logs: pred, pos, neg, reg, acc (share of random crops whose largest logit is at their largest target).
    Embeddings for the monitor: the random crops' projections (B * R, out_dim).
    """

    def __init__(self, encoder: nn.Module, hidden_dim: int = 2048, out_dim: int = 2048, head_norm: str = "batch",
                 reg_weight: float = 1.0, prediction: str = "official", grid: int = 3, n_random: int = 2):
        super().__init__()
        if int(grid) < 1 or int(n_random) < 1:
            raise ValueError(f"grid and n_random must be >= 1, got grid {grid}, n_random {n_random}")
        self.grid, self.n_random = int(grid), int(n_random)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction '{prediction}' is not one of {', '.join(PREDICTIONS)}")
        if reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        self.reg_weight = float(reg_weight)
        self.prediction = prediction
        self.projector = VoCoProjector(encoder.out_channels, hidden_dim, out_dim, head_norm)

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
        z = self.projector(pooled(ctx.features("voco:crops", crops)[-1]))  # (B*(G+R), C_deep) -> (B*(G+R), D)
        base_proj = z[: b * g].unflatten(0, (b, g))  # (B, G, D)
        rand_proj = z[b * g:].unflatten(0, (b, r))  # (B, R, D)
        logits = position_logits(rand_proj, base_proj)  # (B, R, G)
        pred, pos, neg = prediction_loss(logits, targets, self.prediction)
        reg = regularization_loss(base_proj)
        loss = pred + self.reg_weight * reg
        hit = (logits.detach().argmax(-1) == targets.argmax(-1)).float().mean()
        logs = {"pred": float(pred.detach()), "pos": float(pos.detach()), "neg": float(neg.detach()),
                "reg": float(reg.detach()), "acc": float(hit)}
        return ObjectiveOutput(loss, logs, embeddings=rand_proj.detach().float().flatten(0, 1))
