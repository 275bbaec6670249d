"""Swin-UNETR (MONAI): its SwinTransformer wrapped to the Encoder contract, and the full segmentation model.

The encoder keeps MONAI's attribute name `swinViT`, so an exported encoder state dict loads into
`monai.networks.nets.SwinUNETR` (`model.load_state_dict(sd, strict=False)`) without renaming keys.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sslkit.models.base import Encoder
from sslkit.models.registry import register_encoder, register_segmenter


def _ensure_seq(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


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
            window_size=_ensure_seq(window_size, spatial_dims),
            patch_size=_ensure_seq(patch_size, spatial_dims),
            depths=list(depths),
            num_heads=list(num_heads),
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        )

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
                       use_checkpoint: bool = False, use_v2: bool = False) -> SwinUNETREncoder:
    return SwinUNETREncoder(spatial_dims, in_channels, feature_size, depths, num_heads, window_size,
                            drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint, use_v2=use_v2)


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
                         use_v2: bool = False, norm_name: str = "instance") -> SwinUNETRSegmenter:
    """MONAI's SwinUNETR. `norm_name` is its decoder's normalisation: "instance" (MONAI's default) needs crops of
    >= 64 voxels per axis at train time (the 32x-downsampled bottleneck must hold more than one voxel); "batch"
    also trains on 32^3 crops when a step holds >= 2 of them."""
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                    depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                    dropout_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                    spatial_dims=spatial_dims, use_v2=use_v2, norm_name=norm_name)
    enc = SwinUNETREncoder(spatial_dims, in_channels, feature_size, depths, num_heads, window_size,
                           use_v2=use_v2)
    return SwinUNETRSegmenter(net, enc)
