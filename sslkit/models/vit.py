"""Plain ViT encoder (timm Blocks) for 2D and 3D, with token hooks and a visible-tokens path for MAE.

Positions use fixed N-d sine-cosine embeddings computed for the grid at hand (as MAE), so one model takes any
crop that is a multiple of the patch size. All stages are at the patch grid (stride = patch_size); the
returned stages are the outputs of the blocks in `out_indices` (the last one layer-normed), UNETR-style.
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from sslkit.models.base import Encoder, checkpoint_if
from sslkit.models.registry import register_encoder


def sincos_pos_embed(grid: Sequence[int], dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sine-cosine position embedding of an N-d grid -> (prod(grid), dim).

    The channels are split evenly over the axes (dim // (2 d) frequencies each, omega_k = 10000^(-k/F));
    axis a contributes [sin(p_a omega), cos(p_a omega)]; leftover channels are zero.
    Order of positions is row-major over the grid (as `flatten(2)` of a (B, C, *grid) map).
    """
    d = len(grid)
    nf = dim // (2 * d)
    if nf == 0:
        raise ValueError(f"embed_dim {dim} is too small for a {d}-d sine-cosine position embedding")
    omega = 1.0 / 10000 ** (torch.arange(nf, device=device, dtype=torch.float64) / nf)  # (F,)
    coords = torch.meshgrid(*[torch.arange(g, device=device, dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        ang = c.reshape(-1, 1) * omega  # (N, F)
        parts += [ang.sin(), ang.cos()]
    emb = torch.cat(parts, 1)  # (N, 2 d F)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], 1)
    return emb.to(dtype)


class ViTEncoder(Encoder):
    """Patch embedding (Conv with kernel = stride = patch_size) + fixed sin-cos positions + timm Blocks.

    forward(x (B, C_in, *S)) -> [ (B, embed_dim, *S / patch) for each index in out_indices ]
    Token hooks: embed(x) -> (B, embed_dim, *grid) (projection only, no positions);
    forward_tokens(tokens) adds positions and runs the blocks; forward_visible(tokens (B, N_vis, C),
    positions (B, N_vis) long, grid) runs only the given tokens (MAE) and returns (B, N_vis, C) normalised.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, patch_size: int = 16, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, out_indices: Sequence[int] | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        if out_indices is None:  # four evenly spaced blocks ending with the last
            n = min(4, depth)
            out_indices = [depth * (i + 1) // n - 1 for i in range(n)]
        self.out_indices = [i % depth for i in out_indices]
        self.feature_channels = [embed_dim] * len(self.out_indices)
        self.feature_strides = [patch_size] * len(self.out_indices)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.patch_embed = conv(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self._pos_cache: dict = {}
        self.use_checkpoint = False  # activation checkpointing per block (set_activation_checkpointing)

    def pos_embed(self, grid: Sequence[int], device, dtype) -> torch.Tensor:
        key = (tuple(grid), str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed(grid, self.embed_dim, device, dtype)
        return self._pos_cache[key]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, *S) -> (B, C, *S / patch)
        return self.patch_embed(x)

    def _run(self, t: torch.Tensor, keep: Sequence[int]) -> list[torch.Tensor]:
        outs = []
        last = max(keep)
        for i, blk in enumerate(self.blocks):
            t = checkpoint_if(self.use_checkpoint, blk, t)
            if i in keep:
                outs.append(self.norm(t) if i == last else t)
            if i == last:
                break
        return outs

    def forward_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        b, c, *grid = tokens.shape
        t = tokens.flatten(2).transpose(1, 2)  # (B, C, *grid) -> (B, N, C)
        t = t + self.pos_embed(grid, t.device, t.dtype)
        outs = self._run(t, self.out_indices)
        return [o.transpose(1, 2).reshape(b, c, *grid) for o in outs]  # (B, N, C) -> (B, C, *grid)

    def forward_visible(self, tokens: torch.Tensor, positions: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """tokens (B, N_vis, C) patch embeddings at flat grid indices positions (B, N_vis) -> (B, N_vis, C)
        after all blocks and the final norm."""
        pos = self.pos_embed(grid, tokens.device, tokens.dtype)[positions]  # (B, N_vis, C)
        return self._run(tokens + pos, [len(self.blocks) - 1])[-1]


@register_encoder("vit")
def vit_encoder(spatial_dims: int = 3, in_channels: int = 1, patch_size: int = 16, embed_dim: int = 384,
                depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                drop_path_rate: float = 0.0, out_indices: Sequence[int] | None = None) -> ViTEncoder:
    """ViT-S/16 by default (384-d, 12 blocks, 6 heads)."""
    return ViTEncoder(spatial_dims, in_channels, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                      drop_path_rate, out_indices)
