"""The Encoder contract every architecture follows (see DESIGN.md, "Contracts")."""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """image -> list of stage feature maps, shallow to deep.

    Subclasses set:
      spatial_dims      2 or 3
      in_channels       input channels
      feature_channels  channels of each returned stage, shallow -> deep
      patch_size        stride of the patch embedding (voxels per token along each axis)
      embed_dim         channels of the patch embedding (tokens)
    forward(x: (B, C_in, *spatial)) -> [(B, C_i, *spatial_i), ...]

    Token hooks, for objectives that work on patch embeddings (SimMIM, MAE, e-Mix, ShED):
      embed(x) -> tokens (B, embed_dim, *grid)       patch embedding only
      forward_tokens(tokens) -> list[Tensor]         the rest of the encoder
    so that forward(x) == forward_tokens(embed(x)).
    """

    spatial_dims: int
    in_channels: int
    feature_channels: list[int]
    patch_size: int
    embed_dim: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no token hooks")

    def forward_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no token hooks")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_tokens(self.embed(x))

    @property
    def out_channels(self) -> int:
        """Channels of the deepest stage, the one pooled for global embeddings."""
        return self.feature_channels[-1]
