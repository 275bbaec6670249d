"""Segment Anything (SAM) image encoders ViT-B/L/H as sslkit Encoders, official checkpoint loading, and the
Medical SAM Adapter (MSA) adapters.

Architecture (Kirillov et al. 2023; timm `vision_transformer_sam.py` ships the same network, whose Attention
and Mlp modules are reused here so the parameter names match timm):
    x (B, 3, S, S) -> patch embed Conv 16x16/16 -> (B, S/16, S/16, D) + learned absolute pos_embed
    -> blocks: pre-norm (LN eps 1e-6), window attention (14x14, zero padded) except the global blocks,
       decomposed relative positions (separate H and W tables), MLP ratio 4, GELU
    -> neck: Conv1x1 D->256 (no bias) -> LayerNorm2d -> Conv3x3 256->256 (no bias) -> LayerNorm2d
Input normalisation: mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375) on 0-255 values;
`input_range="unit"` scales [0, 1] inputs by 255 first, "255" takes 0-255 values, "none" skips normalisation
(input already normalised). One-channel input is replicated to the three RGB channels.

Encoder outputs (B, C_i, S/16, S/16): the block outputs at `out_indices` (default: the global-attention
blocks, D channels each) and, last, the neck output (256 channels).

Official checkpoints (`sam_vit_b_01ec64.pth`, keys `image_encoder.*`; prompt encoder / mask decoder keys are
ignored) load from a local file with `load_sam_checkpoint`; `pos_embed` and the relative-position tables are
interpolated when the image size differs from the checkpoint's.

MSA (Wu et al. 2023): `add_adapters` puts in each block a space adapter (x + Adapter(x)) after attention before
the residual add, an MLP adapter in parallel to the MLP scaled by `mlp_scale`, and optionally a depth branch
that re-applies the block's attention along the slice axis ((b h w), d, c) followed by a depth adapter, added
to the space branch (active in `forward_volume`, where the batch holds the slices of volumes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, LayerNorm2d, Mlp
from timm.models.vision_transformer_sam import Attention, window_partition, window_unpartition
from torch import nn

from sslkit.errors import ConfigError
from sslkit.models.base import Encoder, checkpoint_if
from sslkit.models.registry import register_encoder

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
INPUT_RANGES = ("unit", "255", "none")

# name -> (embed_dim, depth, num_heads, global_attn_indexes)
SAM_SIZES = {
    "b": (768, 12, 12, (2, 5, 8, 11)),
    "l": (1024, 24, 16, (5, 11, 17, 23)),
    "h": (1280, 32, 16, (7, 15, 23, 31)),
}


# ------------------------------------------------------------------------------------------------ adapters


class Adapter(nn.Module):
    """Bottleneck adapter: a(x) = Linear(h->D)(GELU(Linear(D->h)(x))), h = int(D * ratio); returns x + a(x) when
    `skip` else a(x). x (..., D) -> (..., D). The up-projection starts at zero, so an adapted encoder starts
    as the pretrained one.  Example: `Adapter(768)(torch.randn(2, 64, 768)).shape == (2, 64, 768)`."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True):
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(x)))
        return x + y if self.skip else y


def _plain_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The weights of a timm SAM Attention applied to a token sequence without its relative positions.
    x (B, N, C) -> (B, N, C); bias (B, heads, N, N) or None is added to the logits (SDPA attn_mask)."""
    b, n, c = x.shape
    qkv = attn.qkv(x).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, hd)
    return attn.proj(y.transpose(1, 2).reshape(b, n, c))


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, hd) relative-position table -> (length, hd), linear interpolation as SAM / timm `get_rel_pos`."""
    if table.shape[0] == length:
        return table
    t = F.interpolate(table.float().T.unsqueeze(0), size=length, mode="linear")  # (1, hd, length)
    return t[0].T.to(table.dtype)


class SAMBlock(nn.Module):
    """Pre-norm SAM ViT block on (B, H, W, C) tokens; window attention when window_size > 0.
    Optional MSA adapters (set by `add_adapters`): space_adapter, mlp_adapter (x mlp_scale), depth_adapter."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 window_size: int = 0, input_size: tuple[int, int] = (64, 64), drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=True,
                              input_size=(window_size, window_size) if window_size > 0 else input_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.space_adapter: nn.Module | None = None
        self.mlp_adapter: nn.Module | None = None
        self.depth_adapter: nn.Module | None = None
        self.mlp_scale = 0.5
        self.use_checkpoint = False  # activation checkpointing of the whole block (set_activation_checkpointing)

    def _space_attention(self, xn: torch.Tensor) -> torch.Tensor:
        h, w = xn.shape[1:3]
        if self.window_size > 0:
            win, pad_hw = window_partition(xn, self.window_size)  # (B * nW, ws, ws, C)
            return window_unpartition(self.attn(win), self.window_size, (h, w), pad_hw)
        return self.attn(xn)

    def forward(self, x: torch.Tensor, num_slices: int | None = None) -> torch.Tensor:
        b, h, w, c = x.shape
        xn = self.norm1(x)
        a = self._space_attention(xn)  # (B, H, W, C)
        if self.space_adapter is not None:
            a = self.space_adapter(a)
        if self.depth_adapter is not None and num_slices is not None and num_slices > 1:
            # depth branch: same attention along the slice axis; (B = b d, H, W, C) -> ((b H W), d, C)
            xd = rearrange(xn, "(b d) h w c -> (b h w) d c", d=num_slices)
            xd = self.depth_adapter(_plain_attention(self.attn, xd))
            a = a + rearrange(xd, "(b h w) d c -> (b d) h w c", h=h, w=w)
        x = x + self.drop_path(a)
        x = x.reshape(b, h * w, c)  # (B, H, W, C) -> (B, N, C)
        xn = self.norm2(x)
        y = self.mlp(xn)
        if self.mlp_adapter is not None:
            y = y + self.mlp_scale * self.mlp_adapter(xn)
        x = x + self.drop_path(y)
        return x.reshape(b, h, w, c)

    # ------------------------------------------------------------------- sparse tokens (MAE visible set)

    def forward_sparse(self, x: torch.Tensor, hw: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """x (B, N_vis, C) tokens at grid coordinates hw (B, N_vis, 2) long -> (B, N_vis, C).

        Attention among the given tokens only, with the block's decomposed relative positions; a window block
        lets a token see only visible tokens of its own window. With every token visible this equals
        `forward` whenever the grid is a multiple of the window (SAM's zero padding is not reproduced)."""
        b, n, c = x.shape
        attn = self.attn
        xn = self.norm1(x)
        qkv = attn.qkv(xn).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        ws = self.window_size
        if ws > 0:
            local, size = hw % ws, (ws, ws)
        else:
            local, size = hw, tuple(grid)
        bias = 0
        for axis, table in ((0, attn.rel_pos_h), (1, attn.rel_pos_w)):
            r = _resize_rel_pos(table, 2 * size[axis] - 1)  # (L, hd)
            t = torch.einsum("bhnc,lc->bhnl", q, r.to(q.dtype))  # (B, h, N, L)
            rel = local[:, :, None, axis] - local[:, None, :, axis] + size[axis] - 1  # (B, N, N)
            idx = rel.unsqueeze(1).expand(-1, attn.num_heads, -1, -1)
            bias = bias + t.gather(3, idx)  # (B, h, N, N)
        if ws > 0:
            win = (hw[..., 0] // ws) * 100003 + hw[..., 1] // ws  # window id per token (B, N)
            same = (win[:, :, None] == win[:, None, :]).unsqueeze(1)
            bias = bias.masked_fill(~same, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, hd)
        a = attn.proj(y.transpose(1, 2).reshape(b, n, c))
        if self.space_adapter is not None:
            a = self.space_adapter(a)
        x = x + self.drop_path(a)
        xn = self.norm2(x)
        y = self.mlp(xn)
        if self.mlp_adapter is not None:
            y = y + self.mlp_scale * self.mlp_adapter(xn)
        return x + self.drop_path(y)


# ------------------------------------------------------------------------------------------------- encoder


class SAMImageEncoder(Encoder):
    """SAM ViT image encoder.

    forward(x (B, C_in, S, S)) -> [(B, D, S/16, S/16) per out_index] + [neck (B, 256, S/16, S/16)]
    Token hooks: embed(x) -> (B, D, S/16, S/16) (normalisation + patch projection, no positions);
    forward_tokens(tokens) adds the (interpolated) absolute positions and runs blocks + neck;
    forward_visible(tokens (B, N_vis, D), positions (B, N_vis), grid) runs only the given tokens (MAE);
    forward_volume(x (B, C_in, Dz, S, S)) runs the slices with the MSA depth branch active.
    """

    def __init__(self, img_size: int = 1024, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), window_size: int = 14, patch_size: int = 16,
                 mlp_ratio: float = 4.0, neck_chans: int = 256, in_channels: int = 1, input_range: str = "unit",
                 out_indices: Sequence[int] | None = None, drop_path_rate: float = 0.0):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"model.in_channels: SAM encoders take 1 or 3 channels, got {in_channels}")
        if input_range not in INPUT_RANGES:
            raise ConfigError(f"model.args.input_range: '{input_range}' is not one of {', '.join(INPUT_RANGES)}")
        if img_size % patch_size:
            raise ConfigError(f"model.args.img_size: {img_size} is not a multiple of the patch size {patch_size}")
        self.spatial_dims = 2
        self.in_channels = in_channels
        self.input_range = input_range
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.window_size = window_size
        self.global_attn_indexes = tuple(int(i) for i in global_attn_indexes)
        g = img_size // patch_size
        self.grid_size = (g, g)
        self.out_indices = sorted({i % depth for i in (global_attn_indexes if out_indices is None else out_indices)})
        self.feature_channels = [embed_dim] * len(self.out_indices) + [neck_chans]
        self.feature_strides = [patch_size] * len(self.feature_channels)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, embed_dim))  # (1, H, W, D) as the checkpoints
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            SAMBlock(embed_dim, num_heads, mlp_ratio, window_size=0 if i in self.global_attn_indexes else window_size,
                     input_size=self.grid_size, drop_path=dpr[i]) for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, neck_chans, kernel_size=1, bias=False), LayerNorm2d(neck_chans),
            nn.Conv2d(neck_chans, neck_chans, kernel_size=3, padding=1, bias=False), LayerNorm2d(neck_chans))

    # ------------------------------------------------------------------------------------ token hooks

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 3, H, W) normalised as SAM expects."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"SAM encoder takes 1 or 3 channels, got {x.shape[1]}")
        if self.input_range == "none":
            return x
        if self.input_range == "unit":
            x = x * 255.0
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, D, H/16, W/16)
        return self.patch_embed.proj(self.normalize(x))

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """Absolute positions for a token grid -> (1, h, w, D), bicubic-resampled when it differs."""
        from timm.layers import resample_abs_pos_embed_nhwc

        return resample_abs_pos_embed_nhwc(self.pos_embed, list(grid))

    def _blocks(self, t: torch.Tensor, num_slices: int | None = None) -> list[torch.Tensor]:
        outs = []
        for i, blk in enumerate(self.blocks):
            t = checkpoint_if(blk.use_checkpoint, blk, t, num_slices)
            if i in self.out_indices:
                outs.append(t.permute(0, 3, 1, 2))  # (B, H, W, D) -> (B, D, H, W)
        outs.append(self.neck(t.permute(0, 3, 1, 2)))  # (B, 256, H, W)
        return outs

    def forward_tokens(self, tokens: torch.Tensor, num_slices: int | None = None) -> list[torch.Tensor]:
        t = tokens.permute(0, 2, 3, 1)  # (B, D, h, w) -> (B, h, w, D)
        t = t + self.pos_embed_for(t.shape[1:3]).to(t.dtype)
        return self._blocks(t, num_slices)

    def forward_visible(self, tokens: torch.Tensor, positions: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """tokens (B, N_vis, D) patch embeddings at flat grid indices positions (B, N_vis) -> (B, N_vis, D)
        after all blocks (SAM has no final norm; the neck needs the full grid)."""
        pos = self.pos_embed_for(grid).reshape(-1, self.embed_dim)[positions]  # (B, N_vis, D)
        hw = torch.stack([positions // grid[1], positions % grid[1]], -1)  # (B, N_vis, 2)
        t = tokens + pos.to(tokens.dtype)
        for blk in self.blocks:
            t = checkpoint_if(blk.use_checkpoint, blk.forward_sparse, t, hw, grid)
        return t

    def forward_volume(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C_in, Dz, H, W): every slice through the encoder, the MSA depth branch attending across the
        Dz slices of each volume -> [(B, C_i, Dz, H/16, W/16), ...]."""
        b, _, dz = x.shape[:3]
        feats = self.forward_tokens(self.embed(rearrange(x, "b c d h w -> (b d) c h w")), num_slices=dz)
        return [rearrange(f, "(b d) c h w -> b c d h w", b=b) for f in feats]


# ------------------------------------------------------------------------------------ official checkpoints


def _names(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def sam_state_dict(state: dict, encoder: SAMImageEncoder) -> dict:
    """Official SAM (or timm samvit / sslkit) encoder keys -> this encoder's keys, with pos_embed and
    relative-position tables interpolated to the encoder's image size."""
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    out = {}
    for k, v in state.items():
        if k.startswith("head."):  # a timm classifier head
            continue
        out[k.replace("mlp.lin1", "mlp.fc1").replace("mlp.lin2", "mlp.fc2")] = v
    own = encoder.state_dict()
    pe = out.get("pos_embed")
    if pe is not None and pe.dim() == 4 and tuple(pe.shape[1:3]) != encoder.grid_size:
        from timm.layers import resample_abs_pos_embed_nhwc

        out["pos_embed"] = resample_abs_pos_embed_nhwc(pe, list(encoder.grid_size))
    for k, v in list(out.items()):
        if (k.endswith("attn.rel_pos_h") or k.endswith("attn.rel_pos_w")) and k in own \
                and v.dim() == 2 and v.shape[0] != own[k].shape[0] and v.shape[1] == own[k].shape[1]:
            out[k] = _resize_rel_pos(v, own[k].shape[0])
    return out


def load_sam_checkpoint(encoder: SAMImageEncoder, path: str | Path) -> SAMImageEncoder:
    """Load an official SAM checkpoint (`sam_vit_b_01ec64.pth` ...) from a local file into `encoder`.
    Raises ConfigError naming the file and the missing / unexpected / mis-shaped keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.args.checkpoint: {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with objects, not a torch file
        raise ConfigError(f"model.args.checkpoint: {path}: cannot be read as a weights-only torch file ({e})")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.args.checkpoint: {path}: holds a {type(state).__name__}, not a state dict")
    mapped = sam_state_dict(state, encoder)
    own = encoder.state_dict()
    adapter_keys = {k for k in own if "adapter" in k}
    missing = set(own) - set(mapped) - adapter_keys
    unexpected = set(mapped) - set(own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise ConfigError(f"model.args.checkpoint: {path} does not fit this SAM encoder; " + "; ".join(parts))
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"model.args.checkpoint: {path}: shapes differ from the encoder (another SAM size?): "
                          + "; ".join(bad[:4]))
    encoder.load_state_dict(mapped, strict=False)
    return encoder


# ------------------------------------------------------------------------------------------- MSA adapters


def add_adapters(encoder: SAMImageEncoder, mlp_scale: float = 0.5, ratio: float = 0.25,
                 depth_branch: bool = False) -> SAMImageEncoder:
    """Insert Medical SAM Adapter modules in every block (in place; returns the encoder):
    space adapter x + A(x) after attention before the residual add, MLP adapter A(x) in parallel to the MLP
    scaled by mlp_scale, and with depth_branch a depth adapter after the slice-axis attention."""
    for blk in encoder.blocks:
        dim = blk.norm1.normalized_shape[0]
        ref = blk.norm1.weight
        blk.space_adapter = Adapter(dim, ratio, skip=True).to(ref.device, ref.dtype)
        blk.mlp_adapter = Adapter(dim, ratio, skip=False).to(ref.device, ref.dtype)
        blk.mlp_scale = mlp_scale
        if depth_branch:
            blk.depth_adapter = Adapter(dim, ratio, skip=False).to(ref.device, ref.dtype)
    return encoder


def adapter_parameters(encoder: nn.Module) -> list[nn.Parameter]:
    """Parameters of the MSA adapters (names containing 'adapter')."""
    return [p for n, p in encoder.named_parameters() if "adapter" in n]


def freeze_all_but_adapters(encoder: nn.Module) -> float:
    """requires_grad only on adapter parameters; returns the trainable share of the encoder's parameters."""
    total = trainable = 0
    for n, p in encoder.named_parameters():
        p.requires_grad_("adapter" in n)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ValueError("the encoder has no adapters; call add_adapters first")
    return trainable / total


# ----------------------------------------------------------------------------------------------- builders


def build_sam_encoder(size: str = "b", *, spatial_dims: int = 2, in_channels: int = 1, img_size: int = 1024,
                      input_range: str = "unit", checkpoint: str | None = None, adapters: bool = False,
                      adapter_depth_branch: bool = False, adapter_mlp_scale: float = 0.5,
                      adapter_ratio: float = 0.25, out_indices: Sequence[int] | None = None,
                      drop_path_rate: float = 0.0, **arch) -> SAMImageEncoder:
    if spatial_dims != 2:
        raise ConfigError(f"model.spatial_dims: SAM encoders are 2D (got {spatial_dims}); volumes go slice by "
                          f"slice, with the MSA depth branch via forward_volume")
    if size in SAM_SIZES:
        d, depth, heads, glob = SAM_SIZES[size]
        arch = dict(embed_dim=d, depth=depth, num_heads=heads, global_attn_indexes=glob)
    enc = SAMImageEncoder(img_size=img_size, in_channels=in_channels, input_range=input_range,
                          out_indices=out_indices, drop_path_rate=drop_path_rate, **arch)
    if adapters:
        add_adapters(enc, adapter_mlp_scale, adapter_ratio, adapter_depth_branch)
    if checkpoint:
        load_sam_checkpoint(enc, checkpoint)
    return enc


def _sized(size: str):
    def builder(spatial_dims: int = 2, in_channels: int = 1, img_size: int = 1024, input_range: str = "unit",
                checkpoint: str | None = None, adapters: bool = False, adapter_depth_branch: bool = False,
                adapter_mlp_scale: float = 0.5, adapter_ratio: float = 0.25,
                out_indices: Sequence[int] | None = None, drop_path_rate: float = 0.0) -> SAMImageEncoder:
        return build_sam_encoder(size, spatial_dims=spatial_dims, in_channels=in_channels, img_size=img_size,
                                 input_range=input_range, checkpoint=checkpoint, adapters=adapters,
                                 adapter_depth_branch=adapter_depth_branch, adapter_mlp_scale=adapter_mlp_scale,
                                 adapter_ratio=adapter_ratio, out_indices=out_indices,
                                 drop_path_rate=drop_path_rate)

    builder.__name__ = f"sam_vit_{size}"
    builder.__doc__ = (f"SAM ViT-{size.upper()} image encoder (embed {SAM_SIZES[size][0]}, depth "
                       f"{SAM_SIZES[size][1]}); checkpoint: a local official SAM .pth file.")
    return builder


sam_vit_b = register_encoder("sam_vit_b")(_sized("b"))
sam_vit_l = register_encoder("sam_vit_l")(_sized("l"))
sam_vit_h = register_encoder("sam_vit_h")(_sized("h"))


@register_encoder("sam_vit")
def sam_vit(spatial_dims: int = 2, in_channels: int = 1, img_size: int = 1024, embed_dim: int = 768,
            depth: int = 12, num_heads: int = 12, global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
            window_size: int = 14, neck_chans: int = 256, input_range: str = "unit", checkpoint: str | None = None,
            adapters: bool = False, adapter_depth_branch: bool = False, adapter_mlp_scale: float = 0.5,
            adapter_ratio: float = 0.25, out_indices: Sequence[int] | None = None,
            drop_path_rate: float = 0.0) -> SAMImageEncoder:
    """A SAM-shaped encoder of any width/depth (tests, demos, or custom SAM-like checkpoints)."""
    return build_sam_encoder("custom", spatial_dims=spatial_dims, in_channels=in_channels, img_size=img_size,
                             input_range=input_range, checkpoint=checkpoint, adapters=adapters,
                             adapter_depth_branch=adapter_depth_branch, adapter_mlp_scale=adapter_mlp_scale,
                             adapter_ratio=adapter_ratio, out_indices=out_indices, drop_path_rate=drop_path_rate,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             global_attn_indexes=tuple(global_attn_indexes), window_size=window_size,
                             neck_chans=neck_chans)
