"""Swin-UNETR (MONAI): its SwinTransformer wrapped to the Encoder contract, and the full segmentation model.

The encoder keeps MONAI's attribute name `swinViT`, so an exported encoder state dict loads into
`monai.networks.nets.SwinUNETR` (`model.load_state_dict(sd, strict=False)`) without renaming keys.

Window attention runs through sslkit's `attend_windows` (SDPA, or FlexAttention with `attention: flex`) in
training as well: MONAI's own `use_flash_attention` takes SDPA only when autograd is off. Same parameters, same
buffers, same relative bias and shift mask (MONAI's -100 fill) as MONAI's explicit softmax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from sslkit.models.base import Encoder
from sslkit.models.registry import register_encoder, register_segmenter
from sslkit.models.window_attention import attend_windows, bias_from_table, set_attention_backend, to_tuple


@functools.cache
def _fused_window_attention_class() -> type:
    """A subclass of MONAI's WindowAttention whose forward goes through attend_windows (built on first use, so
    that importing this module does not import MONAI)."""
    from monai.networks.nets.swin_unetr import WindowAttention as MonaiWindowAttention

    class FusedWindowAttention(MonaiWindowAttention):
        attention_backend = "sdpa"

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            b, n, c = x.shape  # (B_, N, C) windowed tokens; mask (nW, N, N) or None
            h = self.num_heads
            q, k, v = self.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
            idx = self.relative_position_index[:n, :n].reshape(-1)  # MONAI's indexing, clipped windows included
            bias = bias_from_table(self.relative_position_bias_table, idx, n, h)  # (h, N, N)
            out = attend_windows(q, k, v, bias, mask, self.scale, self.attn_drop.p if self.training else 0.0,
                                 self.attention_backend)
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    return FusedWindowAttention


def fuse_window_attention(swin: nn.Module, backend: str = "sdpa") -> nn.Module:
    """Run every MONAI WindowAttention inside `swin` through attend_windows (in place: the class changes, the
    parameters and buffers stay). Returns `swin`."""
    from monai.networks.nets.swin_unetr import WindowAttention as MonaiWindowAttention

    fused = _fused_window_attention_class()
    for m in swin.modules():
        if isinstance(m, MonaiWindowAttention):
            m.__class__ = fused
    set_attention_backend(swin, backend)
    return swin


class SwinUNETREncoder(Encoder):
    """MONAI SwinTransformer -> 5 stage maps with channels (C, C, 2C, 4C, 8C, 16C)[1:]... see feature_channels.

    Stage outputs (MONAI `normalize=True`): patch embedding (C, /2), then 4 Swin stages (2C /4, 4C /8, 8C /16,
    16C /32). feature_channels = [C, 2C, 4C, 8C, 16C].
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        patch_size: int = 2,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        use_v2: bool = False,
        attention: str = "sdpa",
    ):
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.embed_dim = feature_size
        self.feature_channels = [feature_size * 2**i for i in range(len(depths) + 1)]
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=to_tuple(window_size, spatial_dims),
            patch_size=to_tuple(patch_size, spatial_dims),
            depths=list(depths),
            num_heads=list(num_heads),
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        )
        fuse_window_attention(self.swinViT, attention)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, *S) -> (B, C, *S/patch)
        return self.swinViT.patch_embed(x)

    def forward_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        vit = self.swinViT
        x = vit.pos_drop(tokens)
        outs = [vit.proj_out(x, True)]
        for i in range(1, len(self.feature_channels)):
            if vit.use_v2:
                x = getattr(vit, f"layers{i}c")[0](x.contiguous())
            x = getattr(vit, f"layers{i}")[0](x.contiguous())
            outs.append(vit.proj_out(x, True))
        return outs


@register_encoder("swin_unetr")
def swin_unetr_encoder(spatial_dims: int = 3, in_channels: int = 1, feature_size: int = 48,
                       depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                       window_size: int | Sequence[int] = 7, drop_path_rate: float = 0.0,
                       use_checkpoint: bool = False, use_v2: bool = False,
                       attention: str = "sdpa") -> SwinUNETREncoder:
    """`attention`: sdpa | flex (FlexAttention; training needs CUDA)."""
    return SwinUNETREncoder(spatial_dims, in_channels, feature_size, depths, num_heads, window_size,
                            drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint, use_v2=use_v2,
                            attention=attention)


class SwinUNETRSegmenter(nn.Module):
    """MONAI SwinUNETR whose `encoder` attribute is our Encoder view of the same `swinViT` weights."""

    def __init__(self, net: nn.Module, encoder: SwinUNETREncoder):
        super().__init__()
        self.net = net
        self.encoder = encoder
        encoder.swinViT = net.swinViT  # share, do not copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_segmenter("swin_unetr")
def swin_unetr_segmenter(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                         feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                         num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int | Sequence[int] = 7,
                         drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                         use_v2: bool = False, norm_name: str = "instance",
                         attention: str = "sdpa") -> SwinUNETRSegmenter:
    """MONAI's SwinUNETR. `norm_name` is its decoder's normalisation: "instance" (MONAI's default) needs crops of
    >= 64 voxels per axis at train time (the 32x-downsampled bottleneck must hold more than one voxel); "batch"
    also trains on 32^3 crops when a step holds >= 2 of them."""
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                    depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                    dropout_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                    spatial_dims=spatial_dims, use_v2=use_v2, norm_name=norm_name)
    fuse_window_attention(net.swinViT, attention)
    enc = SwinUNETREncoder(spatial_dims, in_channels, feature_size, depths, num_heads, window_size,
                           use_v2=use_v2, attention=attention)
    return SwinUNETRSegmenter(net, enc)
