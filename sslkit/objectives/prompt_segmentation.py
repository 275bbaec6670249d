"""Prompt-dependent segmentation supervision for PUNet (SPECS.md "PUNet"): focal loss on the log-softmax of
the class scores of the known (base) classes.

    scores = encoder.segment(image, classes)          (B, I, *S)   PUNet similarity scores (or logits)
    log p  = log_softmax_I(scores)
    loss   = mean over labelled voxels of  -(1 - p_y)^gamma log p_y        gamma = 4

`label` in the batch holds class indices of the pool (B, 1, *S) or (B, *S); -100 (any negative value) is always
ignored. Voxels of a class not among `classes` count as background with unknown="background" (the reference's
pre-training: novel classes are unannotated, i.e. background, in the base-class labels) or are left out of the
loss with unknown="ignore". Pre-training with labels of base classes: this + 0.01 x CPA (two objectives in a
recipe, data.with_labels: true).
"""

from __future__ import annotations

import torch
from torch import nn

from sslkit.errors import ConfigError
from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.registry import register_objective


def focal_loss(log_probs: torch.Tensor, target: torch.Tensor, gamma: float = 4.0,
               ignore_index: int = -100) -> torch.Tensor:
    """log_probs (B, I, *S) (log-softmax over I), target (B, *S) long in [0, I) or ignore_index -> scalar:
    mean over non-ignored voxels of -(1 - p_t)^gamma log p_t.
    Example: focal_loss(torch.randn(2, 3, 8, 8).log_softmax(1), torch.randint(0, 3, (2, 8, 8)))"""
    valid = target != ignore_index
    lp = log_probs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)  # (B, *S)
    loss = -((1.0 - lp.exp()).clamp_min(0.0) ** gamma) * lp
    w = valid.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp_min(1.0)


@register_objective("prompt_segmentation")
class PromptSegmentation(Objective):
    """Options: classes (known class indices of the prompt pool, background 0 first; default all of the pool),
    unknown ("background" | "ignore": what a label voxel of a class outside `classes` becomes), gamma (4),
    image_key ("image"), label_key ("label")."""

    def __init__(self, encoder: nn.Module, classes: list[int] | None = None, unknown: str = "background",
                 gamma: float = 4.0, image_key: str = "image", label_key: str = "label"):
        super().__init__()
        if not hasattr(encoder, "segment"):
            raise ValueError(f"prompt_segmentation needs a PUNet encoder (model.name: punet), "
                             f"got {type(encoder).__name__}")
        self.classes = list(range(encoder.num_classes)) if classes is None else [int(c) for c in classes]
        if not self.classes:
            raise ValueError("classes must not be empty")
        if unknown not in ("background", "ignore"):
            raise ValueError(f"unknown: '{unknown}' is not one of background, ignore")
        if unknown == "background" and 0 not in self.classes:
            raise ValueError(f"unknown: background maps other classes to class 0, which is not among classes "
                             f"{self.classes}")
        self.unknown = unknown
        self.gamma = gamma
        self.image_key, self.label_key = image_key, label_key

    def check_config(self, cfg, index: int) -> None:
        """The labelled crops come from data.with_labels (unless label_key names another batch key)."""
        if self.label_key == "label" and not cfg.data.with_labels:
            raise ConfigError(f"objectives[{index}]: prompt_segmentation needs labelled crops; set data.with_labels: "
                              f"true (and a datalist whose entries carry 'label')")

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        if self.label_key not in batch:
            raise ConfigError(f"objectives: prompt_segmentation needs labelled crops, but the batch has no "
                              f"'{self.label_key}' key (keys: {', '.join(sorted(batch))}); use a labelled datalist "
                              f"or drop this objective")
        x, label = batch[self.image_key], batch[self.label_key]
        out = encoder.run(x, self.classes)
        scores = out["scores"].float()  # (B, I, *S)
        if label.ndim == scores.ndim:
            label = label[:, 0]  # (B, 1, *S) -> (B, *S)
        target = self.targets(label.long())
        loss = focal_loss(torch.log_softmax(scores, dim=1), target, self.gamma)
        with torch.no_grad():
            valid = target != -100
            acc = float((scores.argmax(1) == target)[valid].float().mean()) if valid.any() else 0.0
        logs = {"seg_focal": float(loss.detach()), "seg_acc": acc}
        return ObjectiveOutput(loss, logs, embeddings=pooled(out["dense"].detach().float()))

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """Pool class indices (B, *S) -> positions in self.classes (B, *S); negative labels -> -100 (ignored);
        other classes -> background's position or -100, per `unknown`."""
        other = self.classes.index(0) if self.unknown == "background" else -100
        lut = torch.full((max(max(self.classes), int(label.max())) + 1,), other, dtype=torch.long, device=label.device)
        lut[torch.tensor(self.classes, device=label.device)] = torch.arange(len(self.classes), device=label.device)
        return lut[label.clamp(min=0)].masked_fill(label < 0, -100)
