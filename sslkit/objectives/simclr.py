"""SimCLR (Chen et al. 2020): NT-Xent over two views with negatives gathered from all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.heads import MLPHead
from sslkit.objectives.registry import register_objective
from sslkit.objectives.views import CorruptionSpec, feature_key, shared_view


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate x (N, D) from all ranks -> (N * W, D) and this rank's index. Backward all-reduces the
    gradient of the gathered tensor and keeps this rank's slice (lightly's GatherLayer), so with the usual
    DDP gradient averaging the step equals the single-process step over the concatenated batch."""
    if not _distributed():
        return x, 0
    from lightly.utils.dist import gather

    return torch.cat(gather(x), 0), dist.get_rank()


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (NT-Xent, SimCLR).

    z0, z1: (N, D) projections of two views of the same N samples on this rank. With u = normalise(z),
    queries q = [u0; u1] (2N local) and keys k = [u0_all; u1_all] (2NW, gathered over W ranks when
    `gather_distributed`), every query i has one positive (its other view) and 2NW - 2 negatives (all other
    keys but itself):
        loss = mean_i  -log( exp(q_i . k_pos(i) / t) / sum_{j != self(i)} exp(q_i . k_j / t) )
    Equals lightly's NTXentLoss(temperature, gather_distributed).
        loss_fn = NTXentLoss(temperature=0.5)
        loss = loss_fn(torch.randn(4, 128), torch.randn(4, 128))
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        n = z0.shape[0]
        u0, u1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
        if self.gather_distributed:
            u0_all, rank = gather_with_grad(u0)
            u1_all, _ = gather_with_grad(u1)
        else:
            u0_all, u1_all, rank = u0, u1, 0
        m = u0_all.shape[0]  # N * W
        q = torch.cat([u0, u1], 0)  # (2N, D)
        k = torch.cat([u0_all, u1_all], 0)  # (2NW, D)
        logits = q @ k.T / self.temperature  # (2N, 2NW)
        local = torch.arange(n, device=q.device) + rank * n  # this rank's rows in the gathered keys
        self_idx = torch.cat([local, local + m])
        pos_idx = torch.cat([local + m, local])
        rows = torch.arange(2 * n, device=q.device)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, self_idx] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        return F.cross_entropy(logits, pos_idx)


@register_objective("simclr")
class SimCLR(Objective):
    """NT-Xent on projections of the pooled deepest features of two views.

    z_v = head(pool(encoder(view_v)[-1])), head = Linear(C, hidden) -> norm -> ReLU -> Linear(hidden, out);
    loss = NTXent_t(z_1, z_2) with negatives from all ranks.
    Options: temperature (0.5, Swin-UNETR), hidden_dim (512), out_dim (128), head_norm (batch | sync | layer |
    none; default batch, as SimCLR: it removes the feature component shared by the batch - with 'layer' the
    tiny-encoder tests stalled at loss log(2N-1), all projections alike; 'batch' needs >= 2 crops per
    micro-batch), gather_distributed (True), view ("plain": the batch's
    view1/view2; "rot_cutout": the Swin-UNETR view shared with rotation and inpainting; also "rot", "cutout"),
    keys (the two batch keys).
    """

    def __init__(self, encoder: nn.Module, temperature: float = 0.5, hidden_dim: int = 512, out_dim: int = 128,
                 head_norm: str = "batch", gather_distributed: bool = True, view: str = "plain",
                 keys: list[str] = ("view1", "view2")):
        super().__init__()
        self.spec = CorruptionSpec.from_view_name(view, keys=tuple(keys))
        self.view = view
        self.keys = tuple(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name two batch views, got {list(keys)}")
        self.head = MLPHead(encoder.out_channels, hidden_dim, out_dim, head_norm)
        self.loss_fn = NTXentLoss(temperature, gather_distributed)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        a, b = self.keys
        if self.view == "plain":
            ha, hb = pooled(ctx.features(a)[-1]), pooled(ctx.features(b)[-1])
        else:
            v = shared_view(ctx, self.view, self.spec, check=("keys",))
            ha = pooled(ctx.features(feature_key(self.view, a), v[a])[-1])  # (B, C_deep)
            hb = pooled(ctx.features(feature_key(self.view, b), v[b])[-1])
        loss = self.loss_fn(self.head(ha), self.head(hb))
        return ObjectiveOutput(loss, {}, ha.detach())
