"""Reconstruction decoders for inpainting (Swin-UNETR), Models Genesis (U-Net) and SimMIM, and the 2D/3D pixel
(voxel) shuffle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def voxel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pixel shuffle for any spatial rank, MONAI's: (B, C * r^d, *S) -> (B, C, *(S * r)), channel order
    (c, r_1, ..., r_d) as torch.nn.functional.pixel_shuffle in 2D."""
    from monai.networks.utils import pixelshuffle

    return pixelshuffle(x, x.dim() - 2, r)


def stage_stride(encoder: nn.Module, stage: int = -1) -> int:
    """Input voxels per feature-map cell of one encoder stage. Encoders may state `feature_strides`;
    otherwise a hierarchical encoder is assumed: patch_size * 2^stage (Swin: 2, 4, ..., 32)."""
    strides = getattr(encoder, "feature_strides", None)
    if strides is None:
        strides = [encoder.patch_size * 2**i for i in range(len(encoder.feature_channels))]
    return int(strides[stage])


def resize_to(y: torch.Tensor, size) -> torch.Tensor:
    """y (B, C, *S) resized (bilinear in 2-D, trilinear in 3-D) to `size`; y itself when it already has it."""
    if tuple(y.shape[2:]) == tuple(size):
        return y
    return F.interpolate(y, size=tuple(size), mode="trilinear" if y.dim() == 5 else "bilinear", align_corners=False)


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

    def forward(self, feature: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        y = self.net(feature)
        return y if size is None else resize_to(y, size)


class SkipDecoder(nn.Module):
    """U-Net decoder over every encoder stage (the restoration network of Models Genesis is a 3-D U-Net).

    From the deepest stage up: a ConvTranspose(k=r, s=r) to the next shallower stage's grid (r = its stride ratio;
    r = 1 for stages on one grid, as in a ViT) and channels, concatenation with that stage, then Conv(3) ->
    InstanceNorm -> LeakyReLU; the shallowest fused map goes through `UpsampleDecoder` back to the input grid.
    Maps whose size is not an exact multiple are resized to the skip's grid (crops not a multiple of the stride).
    channels / strides: per stage, shallow -> deep (the encoder's feature_channels and stage strides).
    [(B, channels[i], *S / strides[i]) for i] -> (B, out_channels, *S)
        dec = SkipDecoder(3, [12, 24, 48, 96, 192], [2, 4, 8, 16, 32], 1)
    """

    def __init__(self, spatial_dims: int, channels: list[int], strides: list[int], out_channels: int,
                 min_channels: int = 16):
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"one stride per stage: {len(channels)} channel counts, {len(strides)} strides")
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        widths = [max(min_channels, c) for c in channels]
        self.ups, self.fuse = nn.ModuleList(), nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            ratio, rest = divmod(strides[i], strides[i - 1])
            if rest or ratio < 1:
                raise ValueError(f"stage strides must each divide the next, got {strides}")
            src = channels[i] if i == len(channels) - 1 else widths[i]
            self.ups.append(_conv(spatial_dims, True)(src, widths[i - 1], kernel_size=ratio, stride=ratio))
            self.fuse.append(nn.Sequential(
                _conv(spatial_dims)(widths[i - 1] + channels[i - 1], widths[i - 1], kernel_size=3, padding=1),
                norm(widths[i - 1], affine=True), nn.LeakyReLU(0.01, inplace=True)))
        top = channels[-1] if len(channels) == 1 else widths[0]
        self.head = UpsampleDecoder(spatial_dims, top, out_channels, strides[0], min_channels)

    def forward(self, features: list[torch.Tensor], size: tuple[int, ...] | None = None) -> torch.Tensor:
        y = features[-1]
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(features[:-1])):
            y = fuse(torch.cat([resize_to(up(y), skip.shape[2:]), skip], 1))
        return self.head(y, size)


class ShuffleDecoder(nn.Module):
    """SimMIM decoder: 1x1 conv to out_channels * stride^d channels, then pixel / voxel shuffle by `stride`.
    (B, in_channels, *S / stride) -> (B, out_channels, *S)"""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = _conv(spatial_dims)(in_channels, out_channels * stride**spatial_dims, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return voxel_shuffle(self.proj(feature), self.stride)
