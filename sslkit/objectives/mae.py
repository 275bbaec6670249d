"""MAE (He et al. 2022) for plain ViT encoders: drop most patches, encode the visible ones, decode all."""

from __future__ import annotations

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput
from sslkit.objectives.registry import register_objective

_AXES = "dhw"


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, *S) -> (B, N, p^d * C), patches in row-major grid order, pixels ordered (p_1..p_d, c)."""
    d = x.dim() - 2
    ax = _AXES[3 - d:]
    ps = " ".join(f"p{i}" for i in range(d))
    src = "b c " + " ".join(f"({a} p{i})" for i, a in enumerate(ax))
    dst = f"b ({' '.join(ax)}) ({ps} c)"
    return rearrange(x, f"{src} -> {dst}", **{f"p{i}": p for i in range(d)})


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """MSE on masked patches. pred, target: (B, N, P); mask: (B, N), 1 where the patch was dropped.
    norm_pix_loss: target <- (target - mean_P) / sqrt(var_P + eps) per patch (unbiased var, as MAE's code).
        loss = sum_{b,n} mask * mean_P (pred - target)^2 / sum mask"""
    target = target.float()
    if norm_pix_loss:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, N)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def random_keep(batch: int, n: int, mask_ratio: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, keep round-down n * (1 - mask_ratio) (at least 1) random tokens.
    Returns ids_keep (B, N_vis) long (sorted, so visible tokens stay in grid order) and mask (B, N) bool,
    True where dropped."""
    n_keep = max(1, int(n * (1 - mask_ratio)))
    ids_keep = torch.rand(batch, n, device=device).argsort(1)[:, :n_keep].sort(1).values
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


class MAEDecoder(nn.Module):
    """Linear(enc_dim -> dim); visible tokens scattered into a grid of learned mask tokens; fixed sin-cos
    positions; `depth` timm Blocks; LayerNorm; Linear(dim -> out_dim) per token.
    latent (B, N_vis, enc_dim), ids_keep (B, N_vis), grid -> (B, N, out_dim)"""

    def __init__(self, enc_dim: int, out_dim: int, dim: int = 512, depth: int = 8, num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.proj = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        self.dim = dim

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid) -> torch.Tensor:
        from sslkit.models.vit import sincos_pos_embed

        b, _, _ = latent.shape
        n = 1
        for g in grid:
            n *= g
        y = self.proj(latent)  # (B, N_vis, dim)
        full = self.mask_token.to(y.dtype).expand(b, n, self.dim).clone()  # (B, N, dim)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.dim), y)
        full = full + sincos_pos_embed(grid, self.dim, y.device, y.dtype)
        for blk in self.blocks:
            full = blk(full)
        return self.pred(self.norm(full))


@register_objective("mae")
class MAE(Objective):
    """Masked autoencoder on a plain ViT (an encoder with `forward_visible`).

    Tokens t = flatten(encoder.embed(x)) (B, N, C); a random mask_ratio of them is dropped per sample; the
    encoder runs on the N_vis visible tokens only; the decoder predicts every patch's pixels:
        loss = sum_n M_n mean_P (pred_n - norm(patch_n))^2 / sum_n M_n   (M: dropped patches)
    Options: mask_ratio (0.75), decoder_dim (512), decoder_depth (8), decoder_heads (16), norm_pix_loss
    (True), input_key ("view1").
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix_loss: bool = True, input_key: str = "view1"):
        super().__init__()
        if not hasattr(encoder, "forward_visible"):
            raise ValueError(f"mae needs a plain ViT encoder with forward_visible (model 'vit'); "
                             f"{type(encoder).__name__} has none - use simmim for hierarchical encoders")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.input_key = input_key
        self.patch_size = encoder.patch_size
        out = encoder.in_channels * encoder.patch_size**encoder.spatial_dims
        self.decoder = MAEDecoder(encoder.embed_dim, out, decoder_dim, decoder_depth, decoder_heads)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        x = batch[self.input_key]  # (B, C_in, *S)
        tokens = encoder.embed(x)  # (B, C, *grid)
        b, c, *grid = tokens.shape
        t = tokens.flatten(2).transpose(1, 2)  # (B, N, C)
        ids_keep, mask = random_keep(b, t.shape[1], self.mask_ratio, x.device)
        visible = t.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, c))  # (B, N_vis, C)
        latent = encoder.forward_visible(visible, ids_keep, grid)  # (B, N_vis, C)
        pred = self.decoder(latent, ids_keep, grid)  # (B, N, p^d C_in)
        loss = mae_loss(pred, patchify(x, self.patch_size), mask, self.norm_pix_loss)
        return ObjectiveOutput(loss, {}, latent.mean(1).detach())
