"""VICReg (Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906) on lightly's VICRegLoss.

z_v = expander(pool(encoder(view_v)[-1])), expander = (Linear -> norm -> ReLU) x 2 -> Linear (8192 wide);
    loss = lambda * mean((z_1 - z_2)^2)                                        invariance
         + mu * (1/2) sum_v mean_d relu(1 - sqrt(Var_b(z_v[:, d]) + eps))      variance (per dimension, eps 1e-4)
         + nu * sum_v sum_{d != e} Cov_b(z_v)[d, e]^2 / D                     covariance
Variance and covariance are taken over the batch gathered from all ranks (gather_distributed); the invariance term
over this rank's pairs. Paper: lambda = mu = 25, nu = 1, expander 8192-8192-8192 with BatchNorm, LARS, batch 2048.
A micro-batch needs >= 2 crops (the batch variance).
    obj = VICReg(encoder, hidden_dim=256, out_dim=256)
    out = obj({"view1": a, "view2": b}, encoder)
"""

from __future__ import annotations

from lightly.loss import VICRegLoss
from torch import nn

from sslkit.errors import ConfigError
from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.heads import expander
from sslkit.objectives.registry import register_objective


def two_view_embeddings(obj, batch: dict, encoder: nn.Module, ctx: ForwardContext | None):
    """Pooled deepest features of the two batch views named by obj.keys (one encoder forward each, shared with
    other objectives on the same views) -> (h_1, h_2) (B, C_deep)."""
    ctx = ctx or ForwardContext(batch, encoder)
    a, b = obj.keys
    return pooled(ctx.features(a)[-1]), pooled(ctx.features(b)[-1])


def check_two_crops(cfg, index: int, name: str) -> None:
    """Batch statistics need two crops per micro-batch."""
    if cfg.train.micro_batch_size < 2:
        raise ConfigError(f"train.micro_batch_size: {name} (objectives[{index}]) takes statistics over the crops "
                          f"of a micro-batch; use 2 or more")


@register_objective("vicreg")
class VICReg(Objective):
    """Options: hidden_dim (8192), out_dim (8192), head_norm (batch | sync | layer | none), lambda_param (25),
    mu_param (25), nu_param (1), gather_distributed (True), keys (the two batch views).
    Logs: std (mean per-dimension std of z over the micro-batch: collapse drives it to 0)."""

    def __init__(self, encoder: nn.Module, hidden_dim: int = 8192, out_dim: int = 8192, head_norm: str = "batch",
                 lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = True, keys: list[str] = ("view1", "view2")):
        super().__init__()
        self.keys = tuple(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name two batch views, got {list(keys)}")
        self.projector = expander(encoder.out_channels, hidden_dim, out_dim, head_norm)
        self.loss_fn = VICRegLoss(lambda_param, mu_param, nu_param, gather_distributed)

    def check_config(self, cfg, index: int) -> None:
        check_two_crops(cfg, index, "vicreg")

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        h1, h2 = two_view_embeddings(self, batch, encoder, ctx)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        loss = self.loss_fn(z1, z2)
        return ObjectiveOutput(loss, {"std": float(z1.detach().std(0).mean())}, embeddings=z1.detach())
