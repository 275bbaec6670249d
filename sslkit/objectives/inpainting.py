"""Inpainting / reconstruction (Swin-UNETR pre-training): reconstruct the un-cut view from a cut-out one."""

from __future__ import annotations

import torch
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.recon import UpsampleDecoder, stage_stride
from sslkit.objectives.registry import register_objective
from sslkit.objectives.views import FILLS, CorruptionSpec, feature_key, shared_view


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |pred - target| over all elements, or over the voxels where mask (B, 1, *S) is True:
    sum(|pred - target| * m) / (sum(m) * C). pred, target: (B, C, *S)."""
    diff = (pred.float() - target.float()).abs()
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype)
    return (diff * m).sum() / (m.sum() * diff.shape[1]).clamp_min(1.0)


@register_objective("inpainting")
class Inpainting(Objective):
    """Cutout of up to `max_fraction` of the voxels in boxes of box_min..box_max per axis (filled with noise or
    with another sample's patches); a transposed-conv decoder on the deepest features reconstructs the input
    grid; loss = mean_v L1(decoder(encoder(cut(x_v))[-1]), x_v) over all voxels (`masked_only` False, as
    Swin-UNETR) or only over cut voxels.

    Options: max_fraction (0.3), box_min (0.05), box_max (0.25), fill (noise | swap | both), masked_only
    (False), view ("cutout" alone; "rot_cutout" to share the Swin-UNETR view, whose target is the rotated
    un-cut view), keys (view1, view2), min_channels (16, decoder channel floor).
    """

    def __init__(self, encoder: nn.Module, max_fraction: float = 0.3, box_min: float = 0.05, box_max: float = 0.25,
                 fill: str = "both", masked_only: bool = False, view: str = "cutout",
                 keys: list[str] = ("view1", "view2"), min_channels: int = 16):
        super().__init__()
        if "cutout" not in view:
            raise ValueError(f"inpainting needs a cut-out view ('cutout' or 'rot_cutout'), got '{view}'")
        self.view = view
        self.keys = tuple(keys)
        self.masked_only = masked_only
        self.spec = CorruptionSpec.from_view_name(view, max_fraction=max_fraction, box_min=box_min,
                                                  box_max=box_max, fill=fill, keys=self.keys)
        if fill not in FILLS:
            raise ValueError(f"fill '{fill}' is not one of {', '.join(FILLS)}")
        self.decoder = UpsampleDecoder(encoder.spatial_dims, encoder.out_channels, encoder.in_channels,
                                       stage_stride(encoder, -1), min_channels)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        v = shared_view(ctx, self.view, self.spec,
                        check=("max_fraction", "box_min", "box_max", "fill", "keys"))
        losses, first = [], None
        for k in self.keys:
            deep = ctx.features(feature_key(self.view, k), v[k])[-1]  # (B, C_deep, *S/32)
            rec = self.decoder(deep, tuple(v[k].shape[2:]))  # (B, C_in, *S)
            losses.append(l1_loss(rec, v[f"{k}_target"], v[f"{k}_mask"] if self.masked_only else None))
            first = pooled(deep) if first is None else first
        loss = torch.stack(losses).mean()
        cut = v[f"{self.keys[0]}_mask"].float().mean()
        return ObjectiveOutput(loss, {"cut_fraction": cut}, first.detach())
