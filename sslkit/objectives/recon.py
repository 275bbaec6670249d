"""Reconstruction decoders for inpainting (Swin-UNETR) and SimMIM, and the 2D/3D pixel (voxel) shuffle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_AXES = "dhw"


def voxel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pixel shuffle for any spatial rank: (B, C * r^d, *S) -> (B, C, *(S * r)).

    Channel order is (c, r_1, ..., r_d), as torch.nn.functional.pixel_shuffle in 2D (equal to it there).
        y = voxel_shuffle(torch.randn(2, 8 * 1, 4, 4, 4), 2)  # (2, 1, 8, 8, 8)
    """
    d = x.dim() - 2
    ax = _AXES[3 - d:]
    rs = " ".join(f"r{i}" for i in range(d))
    src = f"b (c {rs}) " + " ".join(ax)
    dst = "b c " + " ".join(f"({a} r{i})" for i, a in enumerate(ax))
    return rearrange(x, f"{src} -> {dst}", **{f"r{i}": r for i in range(d)})


def stage_stride(encoder: nn.Module, stage: int = -1) -> int:
    """Input voxels per feature-map cell of one encoder stage. Encoders may state `feature_strides`;
    otherwise a hierarchical encoder is assumed: patch_size * 2^stage (Swin: 2, 4, ..., 32)."""
    strides = getattr(encoder, "feature_strides", None)
    if strides is None:
        strides = [encoder.patch_size * 2**i for i in range(len(encoder.feature_channels))]
    return int(strides[stage])


def _conv(spatial_dims: int, transposed: bool = False):
    if transposed:
        return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


class UpsampleDecoder(nn.Module):
    """Transposed-conv decoder from a deep feature map back to the input grid (Swin-UNETR inpainting head).

    log2(stride) stages of ConvTranspose(k=2, s=2) -> InstanceNorm -> LeakyReLU, halving channels (floor
    `min_channels`), then a 1x1 conv to `out_channels`. If the input size is not a multiple of the stride the
    output is resized (trilinear / bilinear) to `size`.
    (B, in_channels, *S / stride) -> (B, out_channels, *S)
        dec = UpsampleDecoder(3, 192, 1, stride=32); dec(torch.randn(2, 192, 1, 1, 1), (32, 32, 32))
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int,
                 min_channels: int = 16):
        super().__init__()
        n = int(round(math.log2(stride)))
        if 2**n != stride:
            raise ValueError(f"decoder stride must be a power of two, got {stride}")
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(n):
            nxt = max(min_channels, ch // 2)
            layers += [_conv(spatial_dims, True)(ch, nxt, kernel_size=2, stride=2), norm(nxt, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]
            ch = nxt
        layers.append(_conv(spatial_dims)(ch, out_channels, kernel_size=1))
        self.net = nn.Sequential(*layers)
        self.spatial_dims = spatial_dims

    def forward(self, feature: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        y = self.net(feature)
        if size is not None and tuple(y.shape[2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="trilinear" if self.spatial_dims == 3 else "bilinear",
                              align_corners=False)
        return y


class ShuffleDecoder(nn.Module):
    """SimMIM decoder: 1x1 conv to out_channels * stride^d channels, then pixel / voxel shuffle by `stride`.
    (B, in_channels, *S / stride) -> (B, out_channels, *S)"""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = _conv(spatial_dims)(in_channels, out_channels * stride**spatial_dims, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return voxel_shuffle(self.proj(feature), self.stride)
