"""QT-UNet (3D) and QT-UNet-2D: an all-Swin UNet whose decoder queries the encoder by window cross-attention.

Thesis `papers/qt_unet_thesis.txt` §3.3; SPECS.md "QT-UNet". One implementation for 2D and 3D (`spatial_dims`).

    image (B, C_in, *S)
      -> patch embedding: conv k = s = 4, LayerNorm                       (B, *S/4, C)
      -> 3 encoder stages: 2 QT encoder blocks (W-MSA, SW-MSA), patch merging (C -> 2C, /2)
      -> bottleneck: 1 QT encoder block at 8C, LayerNorm
      -> patch expanding 8C -> 4C, then 3 decoder stages (4C, 2C, C):
           concat skip -> Linear 2d -> d -> 2 QT decoder blocks (self-attn, cross-attn on the encoder tensor
           that entered the same stage, MLP) -> patch expanding (not after the last stage)
      -> LayerNorm -> final 4x expansion (Linear C -> 4^dims C, sub-voxels, LayerNorm) -> 1x1 conv to K classes

Variants: Tiny / Small / Base (C = 48 / 72 / 96). The "-A" ablation: in 3D patch merging / expanding act on H and W
only (depth kept, as VT-UNet does); in 2D the decoder's cross-attention is off (QT-UNet-2D-A).

`QTUNetEncoder` is the Encoder (feature_channels [C, 2C, 4C, 8C]); `QTUNet.encoder` is the same class, so an
exported encoder state dict loads into the segmentation model unchanged.

Blocks are post-norm, as in the reference code: x = LN(x + DropPath(Attn(x))); x = LN(x + DropPath(MLP(x))).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp

from sslkit.models.base import Encoder, checkpoint_if
from sslkit.models.base import (channels_first as _channels_first, channels_last as _channels_last,
                                conv_nd as _conv)
from sslkit.models.registry import register_encoder, register_segmenter
from sslkit.models.window_attention import (WindowAttention, init_transformer_weights, set_attention_backend,
                                            shifted_window_attention, to_tuple)

VARIANTS = {"tiny": 48, "small": 72, "base": 96}


def _linspace(end: float, n: int) -> list[float]:
    """Drop-path rates rising linearly from 0 to `end` over n blocks (plain floats: works under meta device)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


# --------------------------------------------------------------------------------------------------- blocks


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch, then LayerNorm: (B, C_in, *S) -> (B, C, *S/patch) (channels first)."""

    def __init__(self, spatial_dims: int, in_channels: int, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.proj = _conv(spatial_dims)(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C_in, *S) -> (B, C, *S/4)
        return _channels_first(self.norm(_channels_last(x)))


class PatchMerging(nn.Module):
    """Concatenate each neighbourhood of `factors` tokens -> LayerNorm -> Linear(n·C -> 2C, no bias).

    (B, *S, C) -> (B, *S/factors, 2C). factors (2, 2, 2) in 3D (8C -> 2C), (1, 2, 2) for the 3D "-A" variant
    (4C -> 2C), (2, 2) in 2D (4C -> 2C).
    """

    def __init__(self, dim: int, factors: Sequence[int]):
        super().__init__()
        self.factors = tuple(factors)
        n = math.prod(self.factors)
        self.norm = nn.LayerNorm(n * dim)
        self.reduction = nn.Linear(n * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *spatial, c = x.shape
        nd = len(spatial)
        shape = [b]
        for s, f in zip(spatial, self.factors):
            shape += [s // f, f]
        x = x.reshape(*shape, c)  # (B, S0/f0, f0, S1/f1, f1, ..., C)
        perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [2 * nd + 1]
        x = x.permute(perm).reshape(b, *[s // f for s, f in zip(spatial, self.factors)], -1)  # (B, *S/f, n·C)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """Linear(d -> n·d_out, no bias) -> split each token into `factors` sub-tokens of d_out -> LayerNorm(d_out).

    (B, *S, d) -> (B, *S·factors, d_out); d_out defaults to d / 2 (3D: Linear d -> 4d into 2×2×2; 2D and the
    3D "-A" variant: Linear d -> 2d into 2×2 / 1×2×2). The final 4× expansion uses factors 4 and d_out = d.
    """

    def __init__(self, dim: int, factors: Sequence[int], out_dim: int | None = None):
        super().__init__()
        self.factors = tuple(factors)
        self.out_dim = out_dim or dim // 2
        self.expand = nn.Linear(dim, math.prod(self.factors) * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *spatial, _ = x.shape
        nd = len(spatial)
        x = self.expand(x).view(b, *spatial, *self.factors, self.out_dim)  # (B, *S, f0, f1, ..., d_out)
        perm = [0]
        for i in range(nd):
            perm += [1 + i, 1 + nd + i]
        perm += [2 * nd + 1]
        x = x.permute(perm).reshape(b, *[s * f for s, f in zip(spatial, self.factors)], self.out_dim)
        return self.norm(x)  # (B, *S·f, d_out)


class QTEncoderBlock(nn.Module):
    """Post-norm Swin block: x = LN(x + DP(W-MSA(x))); x = LN(x + DP(MLP(x))). (B, *S, C) -> (B, *S, C).

    `shift` = 0 gives W-MSA, window // 2 gives SW-MSA (with the shifted-window mask).
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], shift: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(shifted_window_attention(self.attn, x, self.window, self.shift)))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class QTDecoderBlock(nn.Module):
    """Post-norm decoder block: window self-attention, window cross-attention, MLP.

        x = LN1(x + DP(W-MSA(x)))
        x = LN2(x + DP(W-MCA(q = x, k, v = context)))     (skipped when cross_attention=False)
        x = LN3(x + DP(MLP(x)))

    The cross-attention computes its own keys/values from `context` (the encoder tensor that entered the
    same stage, same size as x), windowed with the same shift and mask; its relative bias starts at zero.
    x, context: (B, *S, C) -> (B, *S, C).
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], shift: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 cross_attention: bool = True):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        if cross_attention:
            self.cross_attn = WindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias, cross=True,
                                              zero_init_bias=True)
            self.norm2 = nn.LayerNorm(dim)
        else:
            self.cross_attn = None
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm3 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(shifted_window_attention(self.attn, x, self.window, self.shift)))
        if self.cross_attn is not None:
            y = shifted_window_attention(self.cross_attn, x, self.window, self.shift, context=context)
            x = self.norm2(x + self.drop_path(y))
        return self.norm3(x + self.drop_path(self.mlp(x)))


def _shifts(window: tuple[int, ...], depth: int) -> list[tuple[int, ...]]:
    """W-MSA on even blocks, SW-MSA (shift window // 2) on odd blocks."""
    return [tuple(0 for _ in window) if i % 2 == 0 else tuple(w // 2 for w in window) for i in range(depth)]


class _Stage(nn.Module):
    """Shared checkpointing switch for encoder / decoder stages."""

    use_checkpoint: bool = False

    def _run(self, fn, *args):
        return checkpoint_if(self.use_checkpoint, fn, *args)


class EncoderStage(_Stage):
    """QT encoder blocks, then optional patch merging. (B, *S, C) -> (stage output (B, *S, C), next input)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple[int, ...], drop_path: Sequence[float],
                 merge_factors: Sequence[int] | None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_checkpoint: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            QTEncoderBlock(dim, num_heads, window, s, mlp_ratio, qkv_bias, drop_path[i])
            for i, s in enumerate(_shifts(window, depth)))
        self.downsample = PatchMerging(dim, merge_factors) if merge_factors is not None else None
        self.use_checkpoint = use_checkpoint

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(self._blocks, x)
        return out, (self.downsample(out) if self.downsample is not None else out)


class DecoderStage(_Stage):
    """concat skip -> Linear(2d -> d) -> QT decoder blocks (context = skip) -> optional patch expanding.

    x, skip: (B, *S, d) -> (B, *S·f, d / 2) with expanding, else (B, *S, d).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple[int, ...], drop_path: Sequence[float],
                 expand_factors: Sequence[int] | None, cross_attention: bool = True, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, use_checkpoint: bool = False):
        super().__init__()
        self.concat_linear = nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList(
            QTDecoderBlock(dim, num_heads, window, s, mlp_ratio, qkv_bias, drop_path[i], cross_attention)
            for i, s in enumerate(_shifts(window, depth)))
        self.upsample = PatchExpanding(dim, expand_factors) if expand_factors is not None else None
        self.use_checkpoint = use_checkpoint

    def _blocks(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.concat_linear(torch.cat([x, skip], dim=-1))  # (B, *S, 2d) -> (B, *S, d)
        for blk in self.blocks:
            x = blk(x, skip)
        return x

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self._run(self._blocks, x, skip)
        return self.upsample(x) if self.upsample is not None else x


# ------------------------------------------------------------------------------------------------- encoder


class QTUNetEncoder(Encoder):
    """QT-UNet encoder as an sslkit Encoder.

    forward(x: (B, C_in, *S)) -> [(B, C, *S/4), (B, 2C, *S/8), (B, 4C, *S/16), (B, 8C, *S/32)]: the outputs of
    the three encoder stages (before merging) and the LayerNorm-ed bottleneck ("-A" in 3D keeps the depth at
    S/4). Inputs that are not a multiple of `stride` are zero-padded at the end by `embed`, so the maps cover
    ceil(S / stride) · stride / 2^i.

    `encode(tokens)` also returns the skips the decoder uses (the tensors entering each stage).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, embed_dim: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 1), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int | Sequence[int] = 7, patch_size: int = 4, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, merge_depth: bool = True, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.window_size = to_tuple(window_size, spatial_dims)
        n = len(depths)
        self.feature_channels = [embed_dim * 2 ** i for i in range(n)]
        # per-axis factor of one merge: 3D "-A" keeps the depth
        self.merge_factors = (2,) * spatial_dims if (merge_depth or spatial_dims == 2) else (1, 2, 2)
        self.stride = tuple(patch_size * f ** (n - 1) for f in self.merge_factors)
        dpr = _linspace(drop_path_rate, sum(depths))

        self.patch_embed = PatchEmbed(spatial_dims, in_channels, embed_dim, patch_size)
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.stages.append(EncoderStage(
                self.feature_channels[i], depth, num_heads[i], self.window_size,
                dpr[sum(depths[:i]):sum(depths[:i + 1])], self.merge_factors if i < n - 1 else None,
                mlp_ratio, qkv_bias, use_checkpoint))
        self.norm = nn.LayerNorm(self.feature_channels[-1])
        self.apply(init_transformer_weights)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (B, C, *S) at the end of each axis to a multiple of the model stride."""
        pads = [(-s) % m for s, m in zip(x.shape[2:], self.stride)]
        if not any(pads):
            return x
        spec = []
        for p in reversed(pads):
            spec += [0, p]
        return F.pad(x, spec)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, *S) -> pad to stride -> (B, C, *S_pad/4)
        return self.patch_embed(self.pad(x))

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """tokens (B, C, *G) -> (bottleneck (B, *G/8, 8C), skips, stage outputs), all channels-last.

        skips[i] is the tensor that entered stage i (i < 3), the keys/values source of decoder stage i.
        """
        x = _channels_last(tokens)  # (B, C, *G) -> (B, *G, C)
        skips, feats = [], []
        for i, stage in enumerate(self.stages):
            if i < len(self.stages) - 1:
                skips.append(x)
            out, x = stage(x)
            feats.append(out)
        feats[-1] = self.norm(feats[-1])
        return feats[-1], skips, feats

    def forward_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [_channels_first(f) for f in self.encode(tokens)[2]]


# ------------------------------------------------------------------------------------------ decoder, model


class QTUNetDecoder(nn.Module):
    """Bottleneck expansion + decoder stages + final 4× expansion + 1×1 classifier.

    (bottleneck (B, *G/8, 8C), skips) -> logits (B, K, *G·4) channels first.
    """

    def __init__(self, spatial_dims: int, embed_dim: int, out_channels: int, depths: Sequence[int],
                 num_heads: Sequence[int], window: tuple[int, ...], merge_factors: tuple[int, ...],
                 patch_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True, cross_attention: bool = True,
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        n = len(depths)
        dims = [embed_dim * 2 ** i for i in range(n)]
        dpr = _linspace(drop_path_rate, sum(depths))
        self.expand_bottleneck = PatchExpanding(dims[-1], merge_factors)  # 8C -> 4C
        self.stages = nn.ModuleList()
        for i in reversed(range(n - 1)):  # 4C, 2C, C
            self.stages.append(DecoderStage(
                dims[i], depths[i], num_heads[i], window, dpr[sum(depths[:i]):sum(depths[:i + 1])][::-1],
                merge_factors if i > 0 else None, cross_attention, mlp_ratio, qkv_bias, use_checkpoint))
        self.norm = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpanding(embed_dim, (patch_size,) * spatial_dims, out_dim=embed_dim)
        self.head = _conv(spatial_dims)(embed_dim, out_channels, kernel_size=1, bias=False)
        self.apply(init_transformer_weights)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.expand_bottleneck(bottleneck)  # (B, *G/8, 8C) -> (B, *G/4, 4C)
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip)
        x = self.final_expand(self.norm(x))  # (B, *G, C) -> (B, *G·4, C)
        # 1×1 conv applied channels-last (no full-resolution transpose of C channels): (B, *S_pad, K) -> (B, K, *S_pad)
        return _channels_first(F.linear(x, self.head.weight.flatten(1), self.head.bias))


class QTUNet(nn.Module):
    """QT-UNet segmentation model: (B, C_in, *S) -> logits (B, K, *S), any S (padded to the stride and cropped).

    `encoder` is a QTUNetEncoder (load pretrained weights with `model.encoder.load_state_dict(sd)`).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, embed_dim: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 1), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int | Sequence[int] = 7, patch_size: int = 4, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, merge_depth: bool = True, cross_attention: bool = True,
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.encoder = QTUNetEncoder(spatial_dims, in_channels, embed_dim, depths, num_heads, window_size,
                                     patch_size, mlp_ratio, qkv_bias, merge_depth, drop_path_rate, use_checkpoint)
        self.decoder = QTUNetDecoder(spatial_dims, embed_dim, out_channels, depths, num_heads,
                                     self.encoder.window_size, self.encoder.merge_factors, patch_size, mlp_ratio,
                                     qkv_bias, cross_attention, drop_path_rate, use_checkpoint)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        bottleneck, skips, _ = self.encoder.encode(self.encoder.embed(x))
        logits = self.decoder(bottleneck, skips)  # (B, K, *S_pad)
        return logits[(slice(None), slice(None), *[slice(0, s) for s in spatial])]


# ------------------------------------------------------------------------------------------------ builders


def _variant_dim(variant: str) -> int:
    from sslkit.errors import ConfigError

    if variant not in VARIANTS:
        raise ConfigError(f"model.variant: unknown QT-UNet variant '{variant}' (known: {', '.join(VARIANTS)})")
    return VARIANTS[variant]


def _ablation(spatial_dims: int, ablation_a: bool, cross_attention: bool) -> tuple[bool, bool]:
    """(merge_depth, cross_attention) for the "-A" flag: 3D merges H/W only, 2D turns cross-attention off."""
    if not ablation_a:
        return True, cross_attention
    return (False, cross_attention) if spatial_dims == 3 else (True, False)


@register_encoder("qt_unet")
def qt_unet_encoder(variant: str = "tiny", spatial_dims: int = 3, in_channels: int = 1, ablation_a: bool = False,
                    window_size: int | Sequence[int] = 7, drop_path_rate: float = 0.0,
                    use_checkpoint: bool = False, attention: str = "sdpa") -> QTUNetEncoder:
    """QT-UNet encoder; `variant` tiny / small / base (C = 48 / 72 / 96); `ablation_a` in 3D: H/W-only merging
    (in 2D "-A" only changes the decoder, so the encoder is unchanged); `attention` sdpa | flex (FlexAttention;
    training needs CUDA)."""
    merge_depth, _ = _ablation(spatial_dims, ablation_a, True)
    enc = QTUNetEncoder(spatial_dims, in_channels, _variant_dim(variant), window_size=window_size,
                        merge_depth=merge_depth, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint)
    set_attention_backend(enc, attention)
    return enc


@register_segmenter("qt_unet")
def qt_unet(variant: str = "tiny", spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
            ablation_a: bool = False, cross_attention: bool = True, window_size: int | Sequence[int] = 7,
            drop_path_rate: float = 0.0, use_checkpoint: bool = False, attention: str = "sdpa") -> QTUNet:
    """QT-UNet / QT-UNet-2D segmentation model. `ablation_a`: "-A" variant (3D: H/W-only merging and expanding;
    2D: no cross-attention). `cross_attention=False` turns cross-attention off in 3D as well. `attention` as for
    the encoder."""
    merge_depth, cross = _ablation(spatial_dims, ablation_a, cross_attention)
    model = QTUNet(spatial_dims, in_channels, out_channels, _variant_dim(variant), window_size=window_size,
                   merge_depth=merge_depth, cross_attention=cross, drop_path_rate=drop_path_rate,
                   use_checkpoint=use_checkpoint)
    set_attention_backend(model, attention)
    return model
