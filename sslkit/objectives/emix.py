"""e-Mix (DABS, Tamkin et al. 2021): contrastive mixing of input patch embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.heads import MLPHead
from sslkit.objectives.registry import register_objective


def mix_embeddings(emb: torch.Tensor, lam: float | torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """e_mix_i = lam_i * e_i + (1 - lam_i) * stopgrad(e_perm(i)): emb (B, ...) -> (B, ...); lam a float or (B,);
    no gradient reaches the partner through its mixing term."""
    if torch.is_tensor(lam) and lam.dim() == 1:
        lam = lam.view(-1, *[1] * (emb.dim() - 1)).to(emb.dtype)
    return lam * emb + (1 - lam) * emb[perm].detach()


def emix_loss(z_mix: torch.Tensor, z: torch.Tensor, lam: float | torch.Tensor, perm: torch.Tensor,
              temperature: float = 0.2) -> torch.Tensor:
    """logits = normalise(z_mix) . normalise(z)^T / t  (B, B);
    loss = mean_i [ lam_i * CE(logits_i, i) + (1 - lam_i) * CE(logits_i, perm_i) ].  z_mix, z: (B, D);
    lam a float or (B,)."""
    logits = F.normalize(z_mix.float(), dim=1) @ F.normalize(z.float(), dim=1).T / temperature
    target = torch.arange(z.shape[0], device=z.device)
    ce_self = F.cross_entropy(logits, target, reduction="none")  # (B,)
    ce_partner = F.cross_entropy(logits, perm, reduction="none")
    return (lam * ce_self + (1 - lam) * ce_partner).mean()


@register_objective("emix")
class EMix(Objective):
    """Per sample lam_i ~ Beta(alpha, alpha), lam_i = max(lam_i, 1 - lam_i) (as DABS); pi a random permutation;
    e = encoder.embed(x) (B, C, *grid); z_mix = head(pool(encoder.forward_tokens(mix(e, lam, pi))[-1]));
    z = head(pool(encoder(x)[-1])) (shared with other objectives reading the same batch key);
    loss = emix_loss(z_mix, z, lam, pi, temperature).
    Options: temperature (0.2), alpha (1.0), hidden_dim (512), out_dim (128), head_norm (layer),
    input_key ("view1").
    """

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, alpha: float = 1.0, hidden_dim: int = 512,
                 out_dim: int = 128, head_norm: str = "layer", input_key: str = "view1"):
        super().__init__()
        if temperature <= 0 or alpha <= 0:
            raise ValueError(f"temperature and alpha must be positive, got {temperature}, {alpha}")
        self.temperature = temperature
        self.alpha = alpha
        self.input_key = input_key
        self.head = MLPHead(encoder.out_channels, hidden_dim, out_dim, head_norm)

    def sample(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(lam (B,) in [0.5, 1], perm (B,)) from the global RNG."""
        a = torch.tensor(self.alpha, device=device)
        lam = torch.distributions.Beta(a, a).sample((batch_size,))
        lam = torch.maximum(lam, 1 - lam)
        return lam, torch.randperm(batch_size, device=device)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        x = batch[self.input_key]
        if x.shape[0] < 2:
            raise ValueError("emix needs at least 2 samples per micro-batch")
        lam, perm = self.sample(x.shape[0], x.device)
        emb = encoder.embed(x)  # (B, C, *grid)
        h_mix = pooled(encoder.forward_tokens(mix_embeddings(emb, lam, perm))[-1])  # (B, C_deep)
        h = pooled(ctx.features(self.input_key)[-1])  # (B, C_deep)
        loss = emix_loss(self.head(h_mix), self.head(h), lam, perm, self.temperature)
        return ObjectiveOutput(loss, {"lambda": float(lam.mean())}, h.detach())
