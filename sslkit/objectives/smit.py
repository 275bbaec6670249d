"""SMIT, self-distilled masked image transformer (Jiang et al., MICCAI 2022, arXiv 2205.10342): a Swin student on
masked views and an EMA teacher on the unmasked views, three losses.

For the two views x_1, x_2 (batch keys view1 / view2) and their token masks M_1, M_2 (the "masks" data request,
cells of mask_patch_size voxels; `sslkit.data.multicrop.token_masks`):
    student   masked-token forward of x_v: patch tokens under M_v replaced by a learnt mask token (token hooks)
    tokens    u_vn = stage maps at the mask-cell stride (one token per mask cell), image token u_v = mean_n u_vn
    teacher   EMA copy of encoder and heads on the unmasked x_v
    image     = lightly's DINOLoss([g'_i(u'_1), g'_i(u'_2)], [g_i(u_1), g_i(u_2)]): cross-view CE, centred teacher
    patch     = lightly's IBOTPatchLoss on the masked tokens, same view (`distill.PatchDistillLoss`: per image mean
                over its masked tokens, centre over all teacher tokens as SMIT's code)
    recon     = sum_v |D(f_v) - x_v| M_v / sum M_v, D = 1x1 conv + voxel shuffle on the deepest stage (SimMIM's
                decoder; recon_stage), mask upsampled to voxels
    loss      = image_weight * image + patch_weight * patch + recon_weight * recon
g_i and g_p are separate DINO heads (SMIT's default `ibot_head_share 0`); both views' reconstructions count.

SMIT's published settings (The-Veeraraghavan-Lab/SMIT train_self_supervised.py, models/Trans.py, configs_Trans.py):
- Encoder: 3-D Swin, embed 48, depths (2, 2, 4, 2), heads (4, 4, 4, 4), window 4, patch 2, mlp ratio 4, qkv bias off,
  drop path 0.3, 96^3 input (token grids 48^3 -> 24^3 -> 12^3 -> 6^3 -> 3^3).
- Data: 2 mm, CT -175..250 HU -> [0, 1], foreground crop, pad to 128^3, one 128^3 crop, then two random 96^3 crops
  (the two views, no augmentation, no local crops). 3,643 CT scans.
- Masks: cells of 16 voxels (6^3 = 216 per view), ratio 0.7 (ceil: 152 cells), one mask per view.
- Distilled tokens: after stage 3 (6^3 x 384), LayerNorm; the image token is their average.
- Heads: 384 -> 2048 -> 2048 -> 256 (GELU), L2 norm, weight-normalised layer to 8192 (norm_last_layer true).
- Temperatures: student 0.1; centre momentum 0.9; image teacher 0.04 -> 0.07 over 30 epochs; patch teacher 0.04 for
  30 epochs, then 0.04 -> 0.07 over 30 (sslkit: warmup_teacher_temp_steps and patch_temp_delay_steps in optimizer
  steps). Weights: patch 0.1, image 0.1, reconstruction 1.0. Reconstruction: L1 on masked voxels, eps 1e-5.
- Teacher: EMA 0.996; the code indexes its cosine schedule by the step within the epoch, so it stays ~0.996 (sslkit's
  default here: constant 0.996). Last-layer gradients cancelled in the first epoch (freeze_last_layer_steps).
- AdamW lr 1e-4 x batch (6e-4 at batch 6), 500 epochs, 20 warm-up epochs then cosine.
- Reported: mean Dice 0.878 (13 abdominal organs, CT), 0.875 (abdominal organs, MRI).
sslkit differences: the centres are all-reduced over ranks (SMIT's code keeps one per GPU); the L1 divides by
sum(M) * C (the eps is sslkit's l1_loss clamp); random mask cells use the data pipeline's generator.

Batch keys: "view1", "view2" (B, C, *roi), "masks" (B, 2, *roi / mask_patch_size) bool.
    obj = SMIT(encoder, out_dim=512, hidden_dim=128, bottleneck_dim=64, mask_patch_size=16)
    out = obj({"view1": a, "view2": b, "masks": m}, encoder)  # out.logs: image, patch, recon
Embeddings for the monitor: the image head's bottleneck of the masked first view (teacher: the unmasked one).
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput
from sslkit.objectives.distill import (DINOHead, MaskToken, PatchDistillLoss, check_mask_cells, masked_features,
                                       require_token_hooks, stage_with_stride, token_rows, views_to_batch,
                                       warmup_value)
from sslkit.objectives.inpainting import l1_loss
from sslkit.objectives.recon import ShuffleDecoder, stage_stride
from sslkit.objectives.registry import register_objective
from sslkit.objectives.simmim import upsample_mask
from sslkit.objectives.teacher import EMATeacher


@register_objective("smit")
class SMIT(Objective):
    """Options: mask_patch_size (16), mask_ratio (0.7), out_dim (8192), hidden_dim (2048), bottleneck_dim (256),
    batch_norm (False: SMIT's heads have none; lightly's DINO-head option), norm_last_layer (True),
    student_temp (0.1), teacher_temp (0.07), warmup_teacher_temp (0.04), warmup_teacher_temp_steps (0),
    patch_temp_delay_steps (0), center_momentum (0.9), image_weight (0.1), patch_weight (0.1), recon_weight (1.0),
    tau_base (0.996), tau_schedule (constant | cosine), freeze_last_layer_steps (0), recon_stage (-1: the deepest
    stage, as SMIT; its decoder has C_deep x C_in * stride^d weights, 192 x 32^3 for a feature-size-12 Swin, a
    shallower stage a smaller one), views (the two batch keys).
    Logs: image, patch, recon (unweighted terms), teacher_temp, teacher_patch_temp, mask_fraction."""

    def __init__(self, encoder: nn.Module, mask_patch_size: int = 16, mask_ratio: float = 0.7, out_dim: int = 8192,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, batch_norm: bool = False,
                 norm_last_layer: bool = True,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_steps: int = 0, patch_temp_delay_steps: int = 0, center_momentum: float = 0.9,
                 image_weight: float = 0.1, patch_weight: float = 0.1, recon_weight: float = 1.0,
                 tau_base: float = 0.996, tau_schedule: str = "constant", freeze_last_layer_steps: int = 0,
                 recon_stage: int = -1, views: list[str] = ("view1", "view2")):
        super().__init__()
        require_token_hooks(encoder, "smit")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if mask_patch_size % encoder.patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of the encoder patch size "
                             f"{encoder.patch_size}")
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
        if len(tuple(views)) != 2:
            raise ValueError(f"views must name two batch keys, got {list(views)}")
        self.views = tuple(views)
        self.masks = {"patch": int(mask_patch_size), "ratio": [float(mask_ratio)] * 2, "prob": 1.0, "count": 2}
        self.token_stage = stage_with_stride(encoder, int(mask_patch_size))
        self.weights = (float(image_weight), float(patch_weight), float(recon_weight))
        self.temps = (float(warmup_teacher_temp), float(teacher_temp), int(warmup_teacher_temp_steps),
                      int(patch_temp_delay_steps))
        self.freeze_last_layer_steps = int(freeze_last_layer_steps)
        channels = encoder.feature_channels[self.token_stage]
        self.mask_token = MaskToken(encoder)
        self.image_head = DINOHead(channels, hidden_dim, bottleneck_dim, out_dim, batch_norm, norm_last_layer)
        self.patch_head = DINOHead(channels, hidden_dim, bottleneck_dim, out_dim, batch_norm, norm_last_layer)
        self.recon_stage = int(recon_stage)
        self.decoder = ShuffleDecoder(encoder.spatial_dims, encoder.feature_channels[self.recon_stage],
                                      encoder.in_channels, stage_stride(encoder, self.recon_stage))
        self.image_loss = DINOLoss(out_dim, warmup_teacher_temp, teacher_temp, 1, student_temp, center_momentum)
        self.patch_loss = PatchDistillLoss(out_dim, student_temp, center_momentum)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))  # optimizer steps, checkpointed
        self.teacher = EMATeacher({"encoder": encoder, "image_head": self.image_head, "patch_head": self.patch_head},
                                  tau_base, tau_schedule)

    def data_requests(self) -> dict:
        return {"views": {}, "masks": dict(self.masks)}

    def check_config(self, cfg, index: int) -> None:
        from sslkit.errors import ConfigError

        check_mask_cells(cfg, index, "smit", self.masks["patch"])
        stride = self.decoder.stride
        if any(r % stride for r in cfg.data.roi):
            raise ConfigError(f"objectives[{index}] (smit): data.roi {cfg.data.roi} must be a multiple of {stride}, "
                              f"the stride of the stage the reconstruction decoder upsamples (recon_stage)")

    def teachers(self) -> dict[str, EMATeacher]:
        return {"teacher": self.teacher}

    def teacher_temps(self) -> tuple[float, float]:
        """(image, patch) teacher temperatures after `steps_done` optimizer steps."""
        start, end, warmup, delay = self.temps
        k = int(self.steps_done)
        return warmup_value(k, start, end, warmup), warmup_value(k, start, end, warmup, delay)

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views as one batch (2B, C, *roi), view-major, and their masks (2B, *cells)."""
        missing = [k for k in (*self.views, "masks") if k not in batch]
        if missing:
            raise ValueError(f"smit needs batch keys {missing} (the views and masks data requests)")
        x = torch.cat([batch[self.views[0]], batch[self.views[1]]])
        return x, views_to_batch(batch["masks"])

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor):
        enc = self.teacher["encoder"]
        tok = token_rows(enc(x.to(next(enc.parameters()).dtype))[self.token_stage])  # (2B, N, C)
        z, image = self.teacher["image_head"].project(tok.mean(1))
        patch = self.teacher["patch_head"](tok.flatten(0, 1)).unflatten(0, tok.shape[:2])  # (2B, N, K)
        return z.float(), image.float(), patch.float()

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        x, mask = self._inputs(batch)
        b = x.shape[0] // 2
        frozen = int(self.steps_done) < self.freeze_last_layer_steps
        self.image_head.last_layer.frozen = self.patch_head.last_layer.frozen = frozen
        feats = masked_features(encoder, x, mask, self.mask_token)
        tok = token_rows(feats[self.token_stage])  # (2B, C, *cells) -> (2B, N, C)
        sel = mask.flatten(1)  # (2B, N)
        if tok.shape[1] != sel.shape[1]:
            raise ValueError(f"smit: {sel.shape[1]} mask cells but {tok.shape[1]} tokens at stage {self.token_stage}")
        z, image_out = self.image_head.project(tok.mean(1))
        patch_out = self.patch_head(tok[sel]).float()  # (M, K): the masked tokens only
        t_z, t_image, t_patch = self._teacher(x)
        temp, patch_temp = self.teacher_temps()
        image = self.image_loss(list(t_image.chunk(2)), list(image_out.float().chunk(2)), teacher_temp=temp)
        patch = self.patch_loss(t_patch, patch_out, sel, patch_temp)
        rec = self.decoder(feats[self.recon_stage])  # (2B, C_in, *roi)
        if rec.shape != x.shape:
            raise ValueError(f"smit: crop {tuple(x.shape[2:])} is not a multiple of the reconstructed stage's "
                             f"stride {self.decoder.stride}")
        recon = l1_loss(rec, x, upsample_mask(mask, self.masks["patch"]).unsqueeze(1))
        w_image, w_patch, w_recon = self.weights
        loss = w_image * image + w_patch * patch + w_recon * recon
        logs = {"image": float(image.detach()), "patch": float(patch.detach()), "recon": float(recon.detach()),
                "teacher_temp": temp, "teacher_patch_temp": patch_temp, "mask_fraction": float(sel.float().mean())}
        return ObjectiveOutput(loss, logs, embeddings=z[:b].detach().float(), teacher_embeddings=t_z[:b])

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(step, total_steps)
        self.steps_done.fill_(step)

    def log_scalars(self) -> dict[str, float]:
        return {"ema_tau": self.teacher.tau, "ema_updates": float(self.teacher.updates)}
