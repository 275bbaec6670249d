"""The Encoder contract every architecture follows (see DESIGN.md, "Contracts")."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def empty_weights():
    """Build modules whose parameters live on the meta device (no memory, no initialisation cost) while every
    other tensor a constructor makes stays real: checks a recipe's model options in seconds, even for ViT-H.

        with empty_weights():
            model = build_encoder(...)   # raises ConfigError / TypeError for bad options, allocates nothing
    """
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@torch.no_grad()
def measure_feature_strides(encoder: nn.Module, crop: list[int]) -> list[list[int]]:
    """Input voxels per feature-map cell of each stage, per axis, measured by one forward of zeros (1, C, *crop)
    on the encoder's device in eval mode (modes restored). Encoders that state `feature_strides` skip the forward."""
    stated = getattr(encoder, "feature_strides", None)
    if stated is not None:
        return [[int(s)] * len(crop) if isinstance(s, int) else [int(v) for v in s] for s in stated]
    modes = {m: m.training for m in encoder.modules()}
    param = next(encoder.parameters())
    x = torch.zeros(1, encoder.in_channels, *crop, device=param.device, dtype=param.dtype)
    encoder.eval()
    try:
        feats = encoder(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [[max(1, round(c / s)) for c, s in zip(crop, f.shape[2:])] for f in feats]
