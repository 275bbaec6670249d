"""Small MLP heads shared by objectives (projectors, predictors)."""

from __future__ import annotations

from torch import nn

HEAD_NORMS = ("batch", "sync", "layer", "none")


def head_norm(kind: str, dim: int) -> nn.Module:
    """Norm between the two Linear layers of a head.

    3D micro-batches hold 1-2 crops per GPU, where BatchNorm fails (one value per channel) or is noise;
    'layer' keeps every sample independent, so gradient accumulation equals a larger batch exactly.
    """
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "sync":
        return nn.SyncBatchNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"head_norm '{kind}' is not one of {', '.join(HEAD_NORMS)}")


class MLPHead(nn.Sequential):
    """Linear(in, hidden) -> norm -> ReLU -> Linear(hidden, out): the BYOL/SimCLR projector and predictor."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, norm: str = "batch"):
        super().__init__(nn.Linear(in_dim, hidden_dim), head_norm(norm, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def expander(in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192, norm: str = "batch", layers: int = 3):
    """lightly's ProjectionHead with sslkit's norm choice: (Linear -> norm -> ReLU) x (layers - 1) -> Linear, the
    VICReg expander and Barlow Twins projector (8192 wide with BatchNorm in both papers). (N, in) -> (N, out)."""
    from lightly.models.modules.heads import ProjectionHead

    if layers < 1:
        raise ValueError(f"a projector needs at least one layer, got {layers}")
    blocks, width = [], in_dim
    for _ in range(layers - 1):
        blocks.append((width, hidden_dim, head_norm(norm, hidden_dim), nn.ReLU(), norm == "none"))
        width = hidden_dim
    blocks.append((width, out_dim, None, None, True))
    return ProjectionHead(blocks)
