"""SimMIM (Xie et al. 2022) for hierarchical (Swin) encoders: mask-token replacement, 1x1 conv + shuffle decoder."""

from __future__ import annotations

import torch
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.inpainting import l1_loss
from sslkit.objectives.recon import ShuffleDecoder, stage_stride
from sslkit.objectives.registry import register_objective


def random_grid_mask(batch: int, grid: tuple[int, ...], ratio: float, device) -> torch.Tensor:
    """Exactly round(ratio * prod(grid)) cells masked per sample, chosen uniformly (global RNG).
    Returns (B, *grid) bool."""
    n = 1
    for g in grid:
        n *= g
    n_mask = int(round(ratio * n))
    order = torch.rand(batch, n, device=device).argsort(1)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :n_mask], True)
    return mask.view(batch, *grid)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of a (B, *grid) mask by an integer factor per axis -> (B, *(grid * factor))."""
    for ax in range(1, mask.dim()):
        mask = mask.repeat_interleave(factor, dim=ax)
    return mask


@register_objective("simmim")
class SimMIM(Objective):
    """Masked image modelling on patch embeddings of a hierarchical encoder.

    A mask on a grid of `mask_patch_size` voxels (coarser than the patch grid) hides `mask_ratio` of the
    cells; masked patch embeddings t_j (B, C, *grid) are replaced by a learned mask token m:
        t'_j = (1 - M_j) t_j + M_j m,   y = ShuffleDecoder(encoder.forward_tokens(t')[stage])  (B, C_in, *S)
        loss = sum_v |y_v - x_v| M_v / (sum_v M_v * C_in)      (L1 on masked voxels only)
    The decoder is a 1x1 conv to C_in * r^d channels and a pixel / voxel shuffle by the stage stride r.
    Options: mask_ratio (0.6), mask_patch_size (16 voxels; a multiple of the encoder patch size dividing the
    crop), stage (-1: decode from the deepest stage), input_key ("view1").
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.6, mask_patch_size: int = 16, stage: int = -1,
                 input_key: str = "view1"):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if mask_patch_size % encoder.patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of the encoder patch size "
                             f"{encoder.patch_size}")
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size
        self.patch_size = encoder.patch_size
        self.stage = stage
        self.input_key = input_key
        self.mask_token = nn.Parameter(torch.zeros((1, encoder.embed_dim) + (1,) * encoder.spatial_dims))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = ShuffleDecoder(encoder.spatial_dims, encoder.feature_channels[stage], encoder.in_channels,
                                      stage_stride(encoder, stage))

    def make_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *grid_mask) bool from x (B, C, *S); S must be a multiple of mask_patch_size."""
        spatial = tuple(x.shape[2:])
        if any(s % self.mask_patch_size for s in spatial):
            raise ValueError(f"crop {spatial} is not a multiple of mask_patch_size {self.mask_patch_size}")
        grid = tuple(s // self.mask_patch_size for s in spatial)
        return random_grid_mask(x.shape[0], grid, self.mask_ratio, x.device)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        x = batch[self.input_key]  # (B, C_in, *S)
        mask = self.make_mask(x)  # (B, *S / mask_patch)
        tokens = encoder.embed(x)  # (B, C, *S / patch)
        m_tok = upsample_mask(mask, self.mask_patch_size // self.patch_size).unsqueeze(1).to(tokens.dtype)
        tokens = tokens * (1 - m_tok) + self.mask_token.to(tokens.dtype) * m_tok
        feats = encoder.forward_tokens(tokens)
        rec = self.decoder(feats[self.stage])  # (B, C_in, *S)
        if rec.shape != x.shape:
            raise ValueError(f"simmim: crop {tuple(x.shape[2:])} is not a multiple of the stride "
                             f"{self.decoder.stride} of encoder stage {self.stage}")
        m_vox = upsample_mask(mask, self.mask_patch_size).unsqueeze(1)  # (B, 1, *S)
        loss = l1_loss(rec, x, m_vox)
        return ObjectiveOutput(loss, {"mask_fraction": float(m_vox.float().mean())}, pooled(feats[-1]).detach())
