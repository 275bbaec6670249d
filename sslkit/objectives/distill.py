"""Self-distillation pieces shared by DINO, iBOT and SMIT: the DINO projection head, the teacher-temperature
schedule, masked-token forwards through an encoder's token hooks, and the views-to-batch layout.

    head = DINOHead(768, hidden_dim=2048, bottleneck_dim=256, output_dim=8192)
    z, logits = head.project(torch.randn(4, 768))          # (4, 256) L2-normalised, (4, 8192)
    t = warmup_value(steps_done, 0.04, 0.07, warmup_steps=1000)
    feats = masked_features(encoder, x, mask, mask_token)  # stage maps of x with the masked patch tokens replaced
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from torch import nn

from sslkit.objectives.recon import stage_stride
from sslkit.objectives.simmim import upsample_mask


class WeightNormLinear(nn.Module):
    """Weight-normalised linear layer without bias: y = x W^T, W = g * v / ||v|| (norm of each row of v).
    (N, in_dim) -> (N, out_dim). Parameters keep the names of torch.nn.utils.weight_norm (weight_g (out, 1),
    weight_v (out, in)); g starts at 1 and is frozen when `norm_last_layer` (DINO's default).

    lightly's DINOProjectionHead builds its last layer with torch.nn.utils.weight_norm, whose computed `weight`
    attribute makes the module impossible to deep-copy (the EMA teacher is a deep copy) and is computed by a
    forward pre-hook that would run before ZeRO-3 gathers the partitioned parameters; here W is computed inside
    forward. `frozen` detaches g and v, so the layer gets no gradient (DINO's frozen last layer in the first
    epoch; with g fixed, weight decay on v alone leaves W unchanged)."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, g = (self.weight_v.detach(), self.weight_g.detach()) if self.frozen else (self.weight_v, self.weight_g)
        return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


class DINOHead(DINOProjectionHead):
    """lightly's DINOProjectionHead (Linear -> GELU -> Linear -> GELU -> Linear to the bottleneck, truncated-normal
    init, optional BatchNorm; L2 normalisation; weight-normalised last layer to K prototypes) with the last layer
    as `WeightNormLinear`. project(x) -> (bottleneck (N, bottleneck_dim) L2-normalised, logits (N, output_dim))."""

    def __init__(self, input_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, output_dim: int = 65536,
                 batch_norm: bool = False, norm_last_layer: bool = True):
        with warnings.catch_warnings():  # the weight_norm layer it builds (and we replace) is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(input_dim, hidden_dim, bottleneck_dim, output_dim, batch_norm, -1, norm_last_layer)
        self.last_layer = WeightNormLinear(bottleneck_dim, output_dim, norm_last_layer)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.layers(x), dim=-1)
        return z, self.last_layer(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)[1]


def warmup_value(steps_done: int, start: float, end: float, warmup_steps: int, delay_steps: int = 0) -> float:
    """`start` for the first `delay_steps` optimizer steps, then linear from start to end over `warmup_steps`,
    then `end`: v(k) = start + (end - start) * clip((k - delay) / warmup, 0, 1), k = optimizer steps done
    (DINO / iBOT / SMIT teacher temperatures, whose authors count epochs; recipes convert)."""
    if warmup_steps <= 0:
        return end if steps_done >= delay_steps else start
    frac = min(max((steps_done - delay_steps) / warmup_steps, 0.0), 1.0)
    return start + (end - start) * frac


def views_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, V, ...) -> (V * B, ...), view-major: rows [v * B, (v + 1) * B) are view v of every sample, so
    `.chunk(V)` gives the per-view tensors lightly's DINOLoss takes."""
    return x.transpose(0, 1).flatten(0, 1)


def require_token_hooks(encoder: nn.Module, objective: str) -> None:
    """ValueError unless the encoder has the token hooks (embed / forward_tokens) masked-token objectives need."""
    from sslkit.models.base import Encoder

    embed = getattr(type(encoder), "embed", None)
    if embed is None or embed is Encoder.embed:
        raise ValueError(f"{objective} replaces masked patch tokens, which needs an encoder with token hooks "
                         f"(embed / forward_tokens: swin_unetr, qt_unet, vit, sam); {type(encoder).__name__} has none")


def check_mask_cells(cfg, index: int, name: str, cell: int) -> None:
    """ConfigError naming data.roi unless the crop is a whole number of mask cells."""
    from sslkit.errors import ConfigError

    if any(r % cell for r in cfg.data.roi):
        raise ConfigError(f"objectives[{index}] ({name}): data.roi {cfg.data.roi} must be a multiple of "
                          f"mask_patch_size {cell}")


def stage_with_stride(encoder: nn.Module, stride: int) -> int:
    """Index of the encoder stage whose feature map has `stride` voxels per cell (ValueError listing them)."""
    strides = [stage_stride(encoder, i) for i in range(len(encoder.feature_channels))]
    if stride not in strides:
        raise ValueError(f"mask_patch_size {stride}: no encoder stage has that stride (stage strides {strides}); "
                         f"masked tokens are distilled at the stage whose cells are the mask cells")
    return strides.index(stride)


class MaskToken(nn.Module):
    """A learnt mask token (1, embed_dim, 1, ...) (truncated normal, std 0.02, as SimMIM's) and the replacement
    t' = (1 - M) t + M m of the patch tokens t (B, C, *grid) under a mask M (B, 1, *grid). A module whose forward
    returns a tensor, so ZeRO-3 gathers the token again for the backward pass (a bare parameter of an objective,
    whose forward returns an ObjectiveOutput, got no gradient hook there)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.token = nn.Parameter(torch.zeros((1, encoder.embed_dim) + (1,) * encoder.spatial_dims))
        nn.init.trunc_normal_(self.token, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(tokens.dtype)
        return tokens * (1 - m) + self.token.to(tokens.dtype) * m


def masked_features(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor, mask_token: MaskToken
                    ) -> list[torch.Tensor]:
    """Stage maps of x (B, C_in, *S) with the patch tokens under `mask` (B, *cells) bool replaced by the mask
    token (each mask cell covers an integer block of patch tokens)."""
    tokens = encoder.embed(x)  # (B, C, *S / patch)
    factor = tokens.shape[2] // mask.shape[1]
    if factor < 1 or tuple(tokens.shape[2:]) != tuple(g * factor for g in mask.shape[1:]):
        raise ValueError(f"mask cells {tuple(mask.shape[1:])} do not tile the patch-token grid "
                         f"{tuple(tokens.shape[2:])} of a {tuple(x.shape[2:])} crop")
    return encoder.forward_tokens(mask_token(tokens, upsample_mask(mask, factor).unsqueeze(1)))


class PatchDistillLoss(nn.Module):
    """Masked patch-token self-distillation: lightly's IBOTPatchLoss on the masked tokens,
        loss = mean_b  sum_{n masked in b} -sum_k softmax((t_bn - c) / T_t)_k log softmax(s_bn / T_s)_k / #masked(b)
    (an image without masked tokens adds 0), with the centre c <- m c + (1 - m) mean(t) taken over *all* teacher
    patch tokens (all-reduced over ranks), as iBOT's and SMIT's code centre it; lightly (DINOv2) centres on the masked
    ones only, which leaves no centre at all for a micro-batch without masked tokens (iBOT masks half the images).

    lightly weights image b by 1 / mask[b].sum(dim=(1, 2)), so a 3-D token mask (B, D, H, W) would be summed over
    D and H only (one weight per W column): the mask is handed over as (B, 1, N).
        teacher_tokens (B, N, K), student_masked (M, K) (rows of the masked tokens in mask order), mask (B, N) bool
    """

    def __init__(self, output_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        from lightly.loss import IBOTPatchLoss

        self.loss = IBOTPatchLoss(output_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.center_momentum = center_momentum

    @property
    def center(self) -> torch.Tensor:
        return self.loss.center.value  # (1, K)

    def forward(self, teacher_tokens: torch.Tensor, student_masked: torch.Tensor, mask: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        from lightly.models.modules.center import center_mean, center_momentum

        center = self.loss.center.value.clone()
        loss = self.loss(teacher_tokens[mask], student_masked, mask.unsqueeze(1), teacher_temp=teacher_temp)
        batch_center = center_mean(teacher_tokens.detach().flatten(0, 1), dim=(0,))  # (1, K), all-reduced
        self.loss.center.center = center_momentum(center, batch_center, self.center_momentum)
        return loss


def token_rows(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, *cells) -> (B, N, C), N = prod(cells), cells in row-major order (as mask.flatten(1))."""
    return feature.flatten(2).transpose(1, 2)
