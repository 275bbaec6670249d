"""ShED (DABS, Tamkin et al. 2021): shuffled embedding detection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.registry import register_objective


def shuffle_tokens(tokens: torch.Tensor, fraction: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, pick k = max(2, round(fraction * N)) random positions and roll their embeddings among
    themselves by one: t'[p_j] = t[p_{j-1 mod k}].
    tokens (B, N, C) -> (shuffled (B, N, C), labels (B, N) long: 1 at the k picked positions, else 0)."""
    b, n, c = tokens.shape
    k = min(n, max(2, int(round(fraction * n))))
    idx = torch.rand(b, n, device=tokens.device).argsort(1)[:, :k]  # (B, k)
    src = idx.roll(1, dims=1)
    moved = tokens.gather(1, src.unsqueeze(-1).expand(-1, -1, c))  # (B, k, C)
    out = tokens.scatter(1, idx.unsqueeze(-1).expand(-1, -1, c), moved)
    labels = torch.zeros(b, n, dtype=torch.long, device=tokens.device)
    labels.scatter_(1, idx, 1)
    return out, labels


def shed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over all tokens of CE(logits, labels): logits (B, 2, N), labels (B, N) long (1 = shuffled)."""
    return F.cross_entropy(logits.float(), labels)


@register_objective("shed")
class ShED(Objective):
    """e = flatten(encoder.embed(x)) (B, N, C); roll `fraction` of the tokens among themselves per example;
    f = encoder.forward_tokens(e'); a linear per-token head predicts shuffled vs not:
        logits = sum_s upsample(W_s f_s) (B, 2, *grid)   (1x1 conv per used stage, nearest upsampling of the
        coarser stages of a hierarchical encoder back to the token grid; one stage for a ViT suffices)
        loss = mean over tokens CE(logits, labels)
    Options: fraction (0.15), stages (indices of encoder stages the head reads; default all), input_key.
    """

    def __init__(self, encoder: nn.Module, fraction: float = 0.15, stages: list[int] | None = None,
                 input_key: str = "view1"):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = len(encoder.feature_channels)
        self.stages = [s % n for s in (range(n) if stages is None else stages)]
        conv = nn.Conv3d if encoder.spatial_dims == 3 else nn.Conv2d
        self.heads = nn.ModuleList(conv(encoder.feature_channels[s], 2, kernel_size=1) for s in self.stages)
        self.fraction = fraction
        self.input_key = input_key

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        x = batch[self.input_key]
        emb = encoder.embed(x)  # (B, C, *grid)
        b, c, *grid = emb.shape
        shuffled, labels = shuffle_tokens(emb.flatten(2).transpose(1, 2), self.fraction)  # (B, N, C), (B, N)
        feats = encoder.forward_tokens(shuffled.transpose(1, 2).reshape(b, c, *grid))
        logits = None
        for s, head in zip(self.stages, self.heads):
            y = head(feats[s])
            if tuple(y.shape[2:]) != tuple(grid):
                y = F.interpolate(y, size=tuple(grid), mode="nearest")
            logits = y if logits is None else logits + y  # (B, 2, *grid)
        loss = shed_loss(logits.flatten(2), labels)
        acc = float((logits.argmax(1).flatten(1) == labels).float().mean())
        return ObjectiveOutput(loss, {"acc": acc}, pooled(feats[-1]).detach())
