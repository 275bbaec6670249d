"""Rotation prediction (Gidaris et al. 2018; Swin-UNETR pre-training): 4-way rot90 classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.registry import register_objective
from sslkit.objectives.views import CorruptionSpec, feature_key, shared_view


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over the 4 rotations: logits (B, 4), labels (B,) in {0, 1, 2, 3} -> scalar mean."""
    return F.cross_entropy(logits.float(), labels)


@register_objective("rotation")
class Rotation(Objective):
    """Each sample of each view is rotated by k*90 degrees, k ~ U{0..3}, in one plane; a linear head on the
    pooled deepest features predicts k:  loss = mean_v CE(Linear(pool(encoder(rot_k(x_v))[-1])), k).

    Options: plane (two spatial axes, default the last two; their sizes must be equal), view ("rot" alone;
    "rot_cutout" to share the Swin-UNETR view with simclr and inpainting), keys (batch views, default
    view1 and view2).
    """

    def __init__(self, encoder: nn.Module, plane: list[int] = (-2, -1), view: str = "rot",
                 keys: list[str] = ("view1", "view2")):
        super().__init__()
        if "rot" not in view:
            raise ValueError(f"rotation needs a rotated view ('rot' or 'rot_cutout'), got '{view}'")
        if len(plane) != 2:
            raise ValueError(f"plane must name two spatial axes, got {list(plane)}")
        self.view = view
        self.keys = tuple(keys)
        self.spec = CorruptionSpec.from_view_name(view, plane=tuple(plane), keys=self.keys)
        self.head = nn.Linear(encoder.out_channels, 4)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        ctx = ctx or ForwardContext(batch, encoder)
        v = shared_view(ctx, self.view, self.spec, check=("plane", "keys"))
        losses, accs, first = [], [], None
        for k in self.keys:
            h = pooled(ctx.features(feature_key(self.view, k), v[k])[-1])  # (B, C_deep)
            logits = self.head(h)  # (B, 4)
            losses.append(rotation_loss(logits, v[f"{k}_rot"]))
            accs.append((logits.argmax(1) == v[f"{k}_rot"]).float().mean())
            first = h if first is None else first
        loss = torch.stack(losses).mean()
        return ObjectiveOutput(loss, {"acc": torch.stack(accs).mean()}, first.detach())
