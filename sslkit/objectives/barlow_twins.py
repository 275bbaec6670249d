"""Barlow Twins (Zbontar et al., ICML 2021, arXiv 2103.03230) on lightly's BarlowTwinsLoss.

z_v = projector(pool(encoder(view_v)[-1])), projector = (Linear -> norm -> ReLU) x 2 -> Linear (8192 wide);
each z_v is standardised per dimension over the micro-batch, C = z_1^T z_2 / N (summed over ranks with
gather_distributed), and
    loss = sum_d (1 - C_dd)^2 + lambda * sum_{d != e} C_de^2
Paper: lambda 5e-3 (0.0051 in the code), projector 8192-8192-8192 with BatchNorm, LARS, batch 2048. A micro-batch
needs >= 2 crops (the standardisation).
    obj = BarlowTwins(encoder, hidden_dim=256, out_dim=256)
    out = obj({"view1": a, "view2": b}, encoder)
"""

from __future__ import annotations

from lightly.loss import BarlowTwinsLoss
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput
from sslkit.objectives.heads import expander
from sslkit.objectives.registry import register_objective
from sslkit.objectives.vicreg import check_two_crops, two_view_embeddings


@register_objective("barlow_twins")
class BarlowTwins(Objective):
    """Options: hidden_dim (8192), out_dim (8192), head_norm (batch | sync | layer | none), lambda_param (5e-3),
    gather_distributed (True), keys (the two batch views)."""

    def __init__(self, encoder: nn.Module, hidden_dim: int = 8192, out_dim: int = 8192, head_norm: str = "batch",
                 lambda_param: float = 5e-3, gather_distributed: bool = True, keys: list[str] = ("view1", "view2")):
        super().__init__()
        self.keys = tuple(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name two batch views, got {list(keys)}")
        self.projector = expander(encoder.out_channels, hidden_dim, out_dim, head_norm)
        self.loss_fn = BarlowTwinsLoss(lambda_param, gather_distributed)

    def check_config(self, cfg, index: int) -> None:
        check_two_crops(cfg, index, "barlow_twins")

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        h1, h2 = two_view_embeddings(self, batch, encoder, ctx)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        return ObjectiveOutput(self.loss_fn(z1, z2), {}, embeddings=z1.detach())
