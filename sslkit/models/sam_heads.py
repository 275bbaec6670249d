"""Prompt-free segmentation heads on a (frozen) SAM image embedding (AutoSAM, Hu et al. 2023), and the
`sam` segmenter: SAM encoder (frozen, MSA adapters, or fine-tuned) + one of these heads.

All heads: forward(feats, size=None) with feats the encoder's feature list (the last element, the neck
output (B, 256, h, w), is used) or that tensor -> class logits (B, K, *size) (size defaults to 4h x 4w).
Loss (paper): CE + soft Dice (MONAI's DiceCELoss in `sslkit finetune`); Adam lr 5e-4, betas (0.5, 0.999).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from sslkit.models.registry import register_segmenter, register_segmenter_for


def _last(feats) -> torch.Tensor:
    return feats[-1] if isinstance(feats, (list, tuple)) else feats


def _resize(y: torch.Tensor, size) -> torch.Tensor:
    if size is None or tuple(y.shape[-2:]) == tuple(size):
        return y
    return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------- AutoSAM mask decoder


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them: (..., in_dim) -> (..., out_dim) (SAM's MLP)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DownAttention(nn.Module):
    """SAM decoder attention: q, k, v projected to dim / downsample_rate, multi-head SDPA, projected back.
    q (B, Nq, dim), k, v (B, Nk, dim) -> (B, Nq, dim)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, h, N, c/h)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, Nq, c/h)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Tokens: self-attention, cross-attention to the image, MLP (ReLU); then image -> token cross-attention.
    Post-norm (LayerNorm after each residual), positional encodings added to queries / keys (as SAM)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool = False):
        super().__init__()
        self.self_attn = DownAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DownAttention(dim, num_heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DownAttention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """depth TwoWayBlocks then a final token -> image attention + LayerNorm.
    image (B, C, h, w), image_pe (B, C, h, w), tokens (B, T, C) -> (tokens (B, T, C), image (B, h w, C))."""

    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0)
                                    for i in range(depth))
        self.final_attn_token_to_image = DownAttention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image, image_pe, tokens):
        keys = image.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h w, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class RandomFourierPE(nn.Module):
    """SAM's dense positional encoding: coords in [0, 1] -> 2c - 1 -> (x, y) G (G ~ N(0, 1), 2 x dim/2)
    -> [sin 2 pi ., cos 2 pi .]  -> (1, dim, h, w)."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, dim // 2))

    def forward(self, h: int, w: int) -> torch.Tensor:
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (h, w, 2) as (x, y)
        c = 2 * math.pi * ((2 * coords - 1) @ g)  # (h, w, dim/2)
        return torch.cat([c.sin(), c.cos()], -1).permute(2, 0, 1).unsqueeze(0)


class AutoSAMDecoder(nn.Module):
    """AutoSAM prompt-free mask decoder (SAM's mask decoder without prompt tokens).

    Per class k a learned IoU token and mask token; the image embedding (plus a learned no-mask dense
    embedding) is replicated per class, so the K classes are decoded in parallel in ONE forward:
        tokens (B K, 2, C), image (B K, C, h, w) -> two-way transformer (depth 2, dim 256, MLP 2048, 8 heads)
        -> upscaling ConvT x2 -> LN2d -> GELU -> ConvT x2 -> GELU: (B K, C/8, 4h, 4w)
        mask_k = hyper-MLP_k(mask token) . upscaled features -> (B, K, 4h, 4w) -> resized to `size`.
    forward(feats, size) -> logits (B, K, *size); `last_iou` holds the IoU predictions (B, K).
    Example: `AutoSAMDecoder(3)(torch.randn(2, 256, 8, 8), size=(128, 128)).shape == (2, 3, 128, 128)`.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, depth: int = 2, mlp_dim: int = 2048,
                 num_heads: int = 8):
        super().__init__()
        c = in_channels
        self.num_classes = num_classes
        self.pe = RandomFourierPE(c)
        self.no_mask_embed = nn.Parameter(torch.randn(1, c, 1, 1) * 0.02)
        self.iou_token = nn.Parameter(torch.randn(num_classes, 1, c) * 0.02)
        self.mask_tokens = nn.Parameter(torch.randn(num_classes, 1, c) * 0.02)
        self.transformer = TwoWayTransformer(depth, c, num_heads, mlp_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, 2, stride=2), LayerNorm2d(c // 4), nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, c // 8, 3) for _ in range(num_classes))
        self.iou_prediction_head = MLP(c, 256, 1, 3)
        self.last_iou: torch.Tensor | None = None

    def forward(self, feats, size=None) -> torch.Tensor:
        x = _last(feats)  # (B, C, h, w)
        b, c, h, w = x.shape
        k = self.num_classes
        src = (x + self.no_mask_embed).repeat_interleave(k, 0)  # (B K, C, h, w), sample-major
        pos = self.pe(h, w).to(x.dtype).expand(b * k, -1, -1, -1)
        tokens = torch.cat([self.iou_token, self.mask_tokens], 1).to(x.dtype).repeat(b, 1, 1)  # (B K, 2, C)
        hs, src = self.transformer(src, pos, tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b * k, c, h, w))  # (B K, C/8, 4h, 4w)
        mask_tok = hs[:, 1].view(b, k, c)
        hyper = torch.stack([mlp(mask_tok[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        up = up.view(b, k, -1, 4 * h, 4 * w)
        masks = torch.einsum("bkc,bkchw->bkhw", hyper, up)  # (B, K, 4h, 4w)
        self.last_iou = self.iou_prediction_head(hs[:, 0]).view(b, k)
        return _resize(masks, size)


# --------------------------------------------------------------------------------------- CNN, linear heads


def _norm(c: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, c), c)


class CNNHead(nn.Module):
    """AutoSAM CNN head with `depth` (k >= 2) stages, UNet-like: stage = Conv3x3 (stride 1) -> GN -> ReLU ->
    ConvT 2x2 stride 2 (the last two stages) or Conv3x3 (the first k - 2) -> GN -> ReLU, channels halving
    from in_channels (floor 32); so the map is always upscaled 4x; then a 1x1 conv to K classes.
    (B, C, h, w) -> (B, K, *size)."""

    def __init__(self, num_classes: int, in_channels: int = 256, depth: int = 4):
        super().__init__()
        if depth < 2:
            raise ValueError(f"CNN head needs depth >= 2, got {depth}")
        layers, c = [], in_channels
        for i in range(depth):
            o = max(32, in_channels >> (i + 1))
            up = i >= depth - 2
            layers += [nn.Conv2d(c, o, 3, padding=1), _norm(o), nn.ReLU(inplace=True),
                       nn.ConvTranspose2d(o, o, 2, stride=2) if up else nn.Conv2d(o, o, 3, padding=1),
                       _norm(o), nn.ReLU(inplace=True)]
            c = o
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, feats, size=None) -> torch.Tensor:
        return _resize(self.classifier(self.body(_last(feats))), size)


class LinearHead(nn.Module):
    """AutoSAM linear head: ConvT 2x2/2 (C -> C/2) -> ConvT 2x2/2 (C/2 -> C/4) -> 1x1 conv (C/4 -> C/4) -> ReLU
    -> 1x1 conv (C/4 -> K)  (the two 1x1 convs stand for a per-pixel MLP). (B, C, h, w) -> (B, K, *size)."""

    def __init__(self, num_classes: int, in_channels: int = 256):
        super().__init__()
        c = in_channels
        self.up = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, stride=2), nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2))
        self.mlp = nn.Sequential(nn.Conv2d(c // 4, c // 4, 1), nn.ReLU(inplace=True), nn.Conv2d(c // 4, num_classes, 1))

    def forward(self, feats, size=None) -> torch.Tensor:
        return _resize(self.mlp(self.up(_last(feats))), size)


HEADS = {"autosam": AutoSAMDecoder, "cnn": CNNHead, "linear": LinearHead}


def build_sam_head(name: str, num_classes: int, in_channels: int = 256, **kwargs) -> nn.Module:
    from sslkit.errors import ConfigError, closest

    if name not in HEADS:
        close = closest(name, list(HEADS))
        raise ConfigError(f"model.args.head: unknown SAM head '{name}'"
                          + (f" (did you mean '{close}'?)" if close else f" (known: {', '.join(HEADS)})"))
    return HEADS[name](num_classes, in_channels, **kwargs)


# -------------------------------------------------------------------------------------------- segmenter


class SAMSegmenter(nn.Module):
    """SAM encoder + prompt-free head -> class logits at the input size.

    2D: x (B, C_in, H, W) is resized to the encoder's img_size, encoded, and the logits resized back: (B, K, H, W).
    3D (spatial_dims=3, MSA): x (B, C_in, H, W, D) is D slices; the encoder runs them together with the MSA
    depth branch attending across the slices (`forward_volume`), the head runs per slice: (B, K, H, W, D).
    mode (initial state; the downstream adaptation mode may change it): "frozen" (AutoSAM), "adapter" (MSA
    adapters train), "finetune" (all train). Whenever no encoder parameter requires grad, the encoder is kept in
    eval mode and run without autograd."""

    def __init__(self, encoder: nn.Module, head: nn.Module, mode: str = "frozen", spatial_dims: int = 2):
        super().__init__()
        from sslkit.errors import ConfigError
        from sslkit.models.sam import freeze_all_but_adapters

        if spatial_dims not in (2, 3):
            raise ConfigError(f"model.spatial_dims: {spatial_dims} is not 2 or 3")
        self.encoder, self.head, self.spatial_dims = encoder, head, spatial_dims
        if mode == "frozen":
            self.encoder.requires_grad_(False)
        elif mode == "adapter":
            freeze_all_but_adapters(self.encoder)
        elif mode != "finetune":
            raise ConfigError(f"model.args.mode: '{mode}' is not one of frozen, adapter, finetune")

    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.encoder_trains():
            self.encoder.eval()
        return self

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.spatial_dims == 2:
            return self.encoder(x)
        feats = self.encoder.forward_volume(x)  # (B, C_in, D, S, S) -> [(B, C, D, h, w)]
        return [f.transpose(1, 2).flatten(0, 1) for f in feats]  # -> [(B D, C, h, w)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.encoder.img_size
        if self.spatial_dims == 3:
            b, depth = x.shape[0], x.shape[-1]
            size = x.shape[2:4]
            slices = x.permute(0, 4, 1, 2, 3).flatten(0, 1)  # (B, C, H, W, D) -> (B D, C, H, W)
            xi = _resize(slices, (s, s)).unflatten(0, (b, depth)).transpose(1, 2)  # (B, C, D, S, S)
        else:
            size = x.shape[-2:]
            xi = _resize(x, (s, s))
        if self.encoder_trains():
            feats = self._encode(xi)
        else:
            with torch.no_grad():
                feats = self._encode(xi)
        y = self.head(feats, size=size)  # (B [D], K, H, W)
        if self.spatial_dims == 3:
            y = y.unflatten(0, (b, depth)).permute(0, 2, 3, 4, 1)  # -> (B, K, H, W, D)
        return y


@register_segmenter_for("sam_vit", "sam_vit_b", "sam_vit_l", "sam_vit_h")
def _sam_from_encoder(encoder: str, encoder_args: dict) -> tuple[str, dict]:
    """A pretrained SAM-family encoder's plan -> the "sam" segmenter's args (size and input scaling on the
    segmenter, the rest as encoder_args; the encoder's name decides the size preset)."""
    args = {k: v for k, v in encoder_args.items() if k not in ("checkpoint", "adapters", "adapter_depth_branch")}
    seg = {k: args.pop(k) for k in ("img_size", "input_range") if k in args}
    return "sam", {"encoder": encoder, **seg, "encoder_args": args}


@register_segmenter("sam")
def sam_segmenter(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, encoder: str = "sam_vit_b",
                  head: str = "autosam", mode: str = "frozen", img_size: int = 1024, input_range: str = "unit",
                  checkpoint: str | None = None, cnn_depth: int = 4, adapter_depth_branch: bool | None = None,
                  encoder_args: dict | None = None) -> SAMSegmenter:
    """SAM encoder (`encoder`: sam_vit_b / _l / _h / sam_vit, options in encoder_args) + head (autosam | cnn |
    linear) for out_channels classes (background included). spatial_dims 3 runs volumes as stacks of slices with
    the MSA depth branch (on by default in 3D when adapters are present)."""
    from sslkit.models.registry import build_encoder

    depth_branch = spatial_dims == 3 if adapter_depth_branch is None else adapter_depth_branch
    enc = build_encoder(encoder, spatial_dims=2, in_channels=in_channels, img_size=img_size,
                        input_range=input_range, checkpoint=checkpoint, adapters=mode == "adapter",
                        adapter_depth_branch=depth_branch, **(encoder_args or {}))
    kw = {"depth": cnn_depth} if head == "cnn" else {}
    return SAMSegmenter(enc, build_sam_head(head, out_channels, enc.feature_channels[-1], **kw), mode,
                        spatial_dims)
