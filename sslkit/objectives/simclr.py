"""SimCLR (Chen et al. 2020): NT-Xent over two views with negatives gathered from all ranks, on lightly's NTXentLoss.

With u = normalise(z), queries q = [u_1; u_2] (2N on this rank) and keys k = [u_1_all; u_2_all] (2NW, gathered over
W ranks with gather_distributed, whose backward keeps this rank's slice), every query has one positive (its other
view) and 2NW - 2 negatives (all other keys but itself):
    loss = mean_i -log( exp(q_i . k_pos(i) / t) / sum_{j != self(i)} exp(q_i . k_j / t) )
With DDP's gradient averaging, a step on W ranks equals one process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss as LightlyNTXentLoss
from lightly.utils import dist as lightly_dist
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, full_precision, pooled
from sslkit.objectives.heads import MLPHead
from sslkit.objectives.registry import register_objective
from sslkit.objectives.views import CorruptionSpec, feature_key, shared_view


class NTXentLoss(LightlyNTXentLoss):
    """lightly's NTXentLoss (in-batch negatives, gathered from all ranks with gather_distributed) without its boolean
    indexing `logits[~diag_mask]`, which waits on the device at every call on a GPU: a query's similarity to itself
    is set to -inf instead of removed, which leaves every row's softmax, and so the loss, unchanged.
    out0, out1 (N, D) -> scalar."""

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__(temperature, memory_bank_size=0, gather_distributed=gather_distributed)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        n = out0.shape[0]
        u0, u1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        if self.gather_distributed and lightly_dist.world_size() > 1:
            k0, k1 = torch.cat(lightly_dist.gather(u0), 0), torch.cat(lightly_dist.gather(u1), 0)  # (N W, D)
            itself, first = lightly_dist.eye_rank(n, device=u0.device), lightly_dist.rank() * n  # (N, N W)
        else:
            k0, k1, itself, first = u0, u1, torch.eye(n, dtype=torch.bool, device=u0.device), 0
        logits = torch.cat([torch.cat([u0 @ k1.T, (u0 @ k0.T).masked_fill(itself, -torch.inf)], 1),
                            torch.cat([u1 @ k0.T, (u1 @ k1.T).masked_fill(itself, -torch.inf)], 1)]) / self.temperature
        labels = (torch.arange(n, device=u0.device) + first).repeat(2)  # the positive: the other view's key
        return self.cross_entropy(logits, labels)


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
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.head = MLPHead(encoder.out_channels, hidden_dim, out_dim, head_norm)
        self.loss_fn = NTXentLoss(temperature, gather_distributed=gather_distributed)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        a, b = self.keys
        if self.view == "plain":
            ha, hb = pooled(ctx.features(a)[-1]), pooled(ctx.features(b)[-1])
        else:
            v = shared_view(ctx, self.view, self.spec, check=("keys",))
            ha = pooled(ctx.features(feature_key(self.view, a), v[a])[-1])  # (B, C_deep)
            hb = pooled(ctx.features(feature_key(self.view, b), v[b])[-1])
        za, zb = self.head(ha), self.head(hb)
        with full_precision(za.device):  # the similarity logits (1 / temperature) in fp32 under bf16
            loss = self.loss_fn(za.float(), zb.float())
        return ObjectiveOutput(loss, {}, ha.detach())
