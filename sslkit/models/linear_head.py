"""A linear segmentation head on any Encoder: the frozen-feature evaluation of the field (DINOv2's "linear"
segmentation head, the trained counterpart of sslkit's task probe).

Each stage map goes through BatchNorm and a 1x1 convolution to class scores; the scores are upsampled (linear) to
the input's size and summed. At eval time this is one linear classifier on every stage's features resized to the
input grid, so what it reaches is what the encoder's features hold: no decoder can learn the task around them
(Swin-UNETR's decoder, with conv blocks on every stage down to a crop-wide bottleneck, can).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.models.base import conv_nd


class LinearHeadSegmenter(nn.Module):
    def __init__(self, encoder: nn.Module, out_channels: int):
        super().__init__()
        dims = encoder.spatial_dims
        norm = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        self.encoder = encoder
        self.norms = nn.ModuleList(norm(c) for c in encoder.feature_channels)
        self.heads = nn.ModuleList(conv_nd(dims)(c, out_channels, 1) for c in encoder.feature_channels)
        self._mode = "trilinear" if dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        out = 0
        for m, norm, head in zip(self.encoder(x), self.norms, self.heads):
            out = out + F.interpolate(head(norm(m)), size=size, mode=self._mode, align_corners=False)
        return out
