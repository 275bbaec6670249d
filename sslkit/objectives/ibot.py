"""iBOT (Zhou et al., ICLR 2022, arXiv 2111.07832) for hierarchical 2-D / 3-D encoders: DINO on the pooled
embedding plus self-distillation of masked patch tokens.

Everything of DINO (`sslkit.objectives.dino`: multi-crop, head, centring, temperatures, EMA teacher on the global
crops) plus, on the G global crops only:
    student sees x_v with the patch tokens under its mask M_v replaced by a learnt mask token (token hooks
            embed / forward_tokens), the teacher sees x_v unmasked;
    tokens  u_vn = the encoder stage whose cells are the mask cells (stride = mask_patch_size), one row per cell;
    patch   = mean_b  sum_{n in M_v} CE(softmax((g'(u'_vn) - c2) / T_p), log softmax(g(u_vn) / T_s)) / |M_v|,
              averaged over the G views (lightly's IBOTPatchLoss, `distill.PatchDistillLoss`; c2 from all teacher
              tokens as iBOT's code)
    loss    = DINO term (pooled deepest stage, the [CLS] role) + patch_weight * patch
The masks come from the data pipeline (the "masks" data request, `sslkit.data.multicrop.token_masks`): with
probability mask_prob an image hides ceil(r * cells) random cells, r ~ U(mask_ratio) (iBOT's pred_ratio 0.3 +- 0.2
with pred_prob 0.5; iBOT draws blocks, sslkit random cells). The patch head is a second DINOHead to patch_out_dim
prototypes, or the DINO head itself (shared_head, as iBOT's ViT-S recipe and VoxelFM) where the token stage is as wide
as the deepest one.

Published settings (SPECS.md): iBOT ViT-S/16: out_dim = patch_out_dim = 8192, teacher temperature 0.04 -> 0.07 over
30 epochs for both terms, student 0.1, momentum 0.996 -> 1; 3DINO: iBOT mask ratio 0.2-0.75 with probability 0.5;
VoxelFM: mask 0.1-0.5 sharing the DINO head.

Batch keys: DINO's plus "masks" (B, G, *roi / mask_patch_size) bool.
"""

from __future__ import annotations

import torch
from torch import nn

from sslkit.objectives.base import ForwardContext
from sslkit.objectives.dino import DINO
from sslkit.objectives.distill import (DINOHead, MaskToken, PatchDistillLoss, check_mask_cells, masked_features,
                                       require_token_hooks, stage_with_stride, token_rows, views_to_batch,
                                       warmup_value)
from sslkit.objectives.registry import register_objective


@register_objective("ibot")
class IBOT(DINO):
    """DINO's options (sslkit.objectives.dino.DINO; out_dim default 8192 here) plus mask_patch_size (16 voxels: the
    mask cell, also the stride of the distilled token stage), mask_ratio ([0.1, 0.5]), mask_prob (0.5),
    shared_head (False: a Swin token stage is narrower than the deepest stage the DINO head takes; True needs
    equal widths), patch_out_dim (8192, the separate head's prototypes), patch_weight (1.0), teacher_patch_temp (0.07),
    warmup_teacher_patch_temp (0.04) over the same warmup_teacher_temp_steps.
    Logs: DINO's plus patch (the masked-token term) and mask_fraction."""

    def __init__(self, encoder: nn.Module, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 batch_norm: bool = False, norm_last_layer: bool = True, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 center_momentum: float = 0.9, tau_base: float = 0.996, tau_schedule: str = "cosine",
                 freeze_last_layer_steps: int = 0, koleo_weight: float = 0.0, n_global: int = 2, n_local: int = 8,
                 local_size: float = 0.5, region: float = 1.5, global_scale: list[float] = (0.32, 1.0),
                 local_scale: list[float] = (0.05, 0.32), mask_patch_size: int = 16,
                 mask_ratio: list[float] = (0.1, 0.5), mask_prob: float = 0.5, shared_head: bool = False,
                 patch_out_dim: int = 8192, patch_weight: float = 1.0, teacher_patch_temp: float = 0.07,
                 warmup_teacher_patch_temp: float = 0.04):
        require_token_hooks(encoder, "ibot")
        super().__init__(encoder, out_dim, hidden_dim, bottleneck_dim, batch_norm, norm_last_layer, student_temp,
                         teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps, center_momentum, tau_base,
                         tau_schedule, freeze_last_layer_steps, koleo_weight, n_global, n_local, local_size, region,
                         global_scale, local_scale)
        if mask_patch_size % encoder.patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of the encoder patch size "
                             f"{encoder.patch_size}")
        lo, hi = (float(r) for r in mask_ratio)
        if not 0.0 <= lo <= hi <= 1.0 or not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_ratio {list(mask_ratio)} needs 0 <= low <= high <= 1 and mask_prob [0, 1], "
                             f"got {mask_prob}")
        self.masks = {"patch": int(mask_patch_size), "ratio": [lo, hi], "prob": float(mask_prob),
                      "count": self.crops["n_global"]}
        self.token_stage = stage_with_stride(encoder, int(mask_patch_size))
        self.mask_token = MaskToken(encoder)
        self.patch_weight = float(patch_weight)
        self.patch_temps = (float(warmup_teacher_patch_temp), float(teacher_patch_temp))
        channels = encoder.feature_channels[self.token_stage]
        if shared_head and channels != encoder.out_channels:  # the head takes the deepest stage's width
            raise ValueError(f"shared_head: the stage of {mask_patch_size}-voxel tokens has {channels} channels, "
                             f"the DINO head takes the deepest stage's {encoder.out_channels}; use shared_head: "
                             f"false (or mask cells of the deepest stage's stride)")
        self.patch_head = None
        k = out_dim
        if not shared_head:
            self.patch_head = DINOHead(channels, hidden_dim, bottleneck_dim, patch_out_dim, batch_norm,
                                       norm_last_layer)
            self.teacher.add("patch_head", self.patch_head)
            k = patch_out_dim
        self.patch_loss = PatchDistillLoss(k, student_temp, center_momentum)

    def data_requests(self) -> dict:
        return {"multicrop": dict(self.crops), "masks": dict(self.masks)}

    def check_config(self, cfg, index: int) -> None:
        check_mask_cells(cfg, index, "ibot", self.masks["patch"])

    def _last_layers(self) -> list[nn.Module]:
        return [self.head.last_layer] + ([self.patch_head.last_layer] if self.patch_head is not None else [])

    def teacher_patch_temp(self) -> float:
        return warmup_value(int(self.steps_done), *self.patch_temps, self.temps[2])

    def _masks(self, batch: dict) -> torch.Tensor:
        if "masks" not in batch:
            raise ValueError("ibot needs batch key 'masks' (the masks data request)")
        return views_to_batch(batch["masks"])  # (G*B, *cells)

    def student_globals(self, x: torch.Tensor, batch: dict, encoder: nn.Module, ctx: ForwardContext
                        ) -> list[torch.Tensor]:
        return masked_features(encoder, x, self._masks(batch), self.mask_token)

    def extra_terms(self, student: list[torch.Tensor], teacher: list[torch.Tensor], batch: dict
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        mask = self._masks(batch).flatten(1)  # (G*B, N)
        s_tok, t_tok = token_rows(student[self.token_stage]), token_rows(teacher[self.token_stage])  # (G*B, N, C)
        if s_tok.shape[1] != mask.shape[1]:
            raise ValueError(f"ibot: {mask.shape[1]} mask cells but {s_tok.shape[1]} tokens at stage "
                             f"{self.token_stage}")
        shared = self.patch_head is None
        s_out = (self.head if shared else self.patch_head)(s_tok[mask]).float()  # (M, K): masked tokens only
        with torch.no_grad():
            t_head = self.teacher["head" if shared else "patch_head"]
            t_out = t_head(t_tok.flatten(0, 1)).unflatten(0, t_tok.shape[:2]).float()  # (G*B, N, K)
        patch = self.patch_loss(t_out, s_out, mask, self.teacher_patch_temp())
        logs = {"patch": float(patch.detach()), "mask_fraction": float(mask.float().mean())}
        return self.patch_weight * patch, logs

