"""The Encoder contract every architecture follows (see DESIGN.md, "Contracts")."""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Encoder(nn.Module):
    """image -> list of stage feature maps, shallow to deep.

    Subclasses set:
      spatial_dims      2 or 3
      in_channels       input channels
      feature_channels  channels of each returned stage, shallow -> deep
      patch_size        stride of the patch embedding (voxels per token along each axis)
      embed_dim         channels of the patch embedding (tokens)
    forward(x: (B, C_in, *spatial)) -> [(B, C_i, *spatial_i), ...]

    Token hooks, for objectives that work on patch embeddings (SimMIM, MAE, e-Mix, ShED):
      embed(x) -> tokens (B, embed_dim, *grid)       patch embedding only
      forward_tokens(tokens) -> list[Tensor]         the rest of the encoder
    so that forward(x) == forward_tokens(embed(x)).
    """

    spatial_dims: int
    in_channels: int
    feature_channels: list[int]
    patch_size: int
    embed_dim: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no token hooks")

    def forward_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no token hooks")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_tokens(self.embed(x))

    @property
    def out_channels(self) -> int:
        """Channels of the deepest stage, the one pooled for global embeddings."""
        return self.feature_channels[-1]


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Recompute activations in the backward pass instead of keeping them, per block (torch.utils.checkpoint,
    use_reentrant=False): sets `use_checkpoint` on every module of `model` that declares one (MONAI's Swin blocks,
    QT-UNet stages, PUNet PSWin blocks, SAM blocks, the ViT encoder). Returns how many; ValueError when none."""
    units = [m for m in model.modules() if isinstance(getattr(m, "use_checkpoint", None), bool)]
    if not units:
        raise ValueError(f"{type(model).__name__} has no blocks that support activation checkpointing")
    for m in units:
        m.use_checkpoint = enabled
    return len(units)


def checkpoint_if(enabled: bool, fn, *args):
    """fn(*args), through activation checkpointing when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def conv_nd(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    """nn.Conv2d / nn.Conv3d (or their transposed twins) for 2-D / 3-D models."""
    if transposed:
        return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, *S, C): the layout of the transformer blocks."""
    return x.movedim(1, -1)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, *S, C) -> (B, C, *S), contiguous: the layout of convolutions and of the Encoder contract."""
    return x.movedim(-1, 1).contiguous()


@contextlib.contextmanager
def empty_weights():
    """Build modules whose parameters live on the meta device (no memory, no initialisation cost) while every
    other tensor a constructor makes stays real: checks a recipe's model options in seconds, even for ViT-H.

        with empty_weights():
            model = build_encoder(...)   # raises ConfigError / TypeError for bad options, allocates nothing
    """
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


MIN_STRIDE_PROBE = 64     # the smallest input edge a stride is measured on
MAX_STRIDE_PROBE = 512    # ... and the largest


@torch.no_grad()
def measure_feature_strides(encoder: nn.Module, crop: list[int]) -> list[list[int]]:
    """Input voxels per feature-map cell of each stage, per axis: the architecture's strides, whatever the crop.
    Encoders that state `feature_strides` are taken at their word; others are measured by a forward of zeros in
    eval mode (modes restored) on an input of a power of two per axis, at least `crop` and 64, doubled while the
    deepest map is one cell wide there. A crop itself can mislead: Swin pads a 3-cell map to 4 before merging, so
    a 48^3 crop gives a 2-cell deepest map and 48 / 2 = 24 where the stride is 32."""
    stated = getattr(encoder, "feature_strides", None)
    if stated is not None:
        return [[int(s)] * len(crop) if isinstance(s, int) else [int(v) for v in s] for s in stated]
    size = [max(MIN_STRIDE_PROBE, 1 << (int(c) - 1).bit_length()) for c in crop]
    while True:
        shapes = _feature_shapes(encoder, size)
        thin = [a for a, n in enumerate(shapes[-1]) if n == 1 and size[a] < MAX_STRIDE_PROBE]
        if not thin:
            return [[max(1, s // n) for s, n in zip(size, shape)] for shape in shapes]
        size = [s * 2 if a in thin else s for a, s in enumerate(size)]


def _feature_shapes(encoder: nn.Module, size: list[int]) -> list[tuple[int, ...]]:
    """Spatial shapes of the encoder's stage maps for a (1, C, *size) input of zeros."""
    modes = {m: m.training for m in encoder.modules()}
    param = next(encoder.parameters())
    x = torch.zeros(1, encoder.in_channels, *size, device=param.device, dtype=param.dtype)
    encoder.eval()
    try:
        return [tuple(f.shape[2:]) for f in encoder(x)]
    finally:
        for m, mode in modes.items():
            m.training = mode


_STAGE = re.compile(r"(?:^|\.)(blocks|stages|encoder_stages|layers)\.?(\d+)")
_EMBEDDING = re.compile(r"(?:^|\.)(\w*pos_embed|patch_embed|cls_token|stem|embed)(?:\.|$)")


def layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every encoder parameter for layer-wise lr decay, by name: 0 for the input embedding (patch
    embedding, position embedding, stem), 1..L for the stages / blocks in order (`layers1..4` of MONAI's Swin,
    `stages.i`, `blocks.i`, `encoder_stages.i`), and L for what follows the last one (final norms, necks).
    Returns ({name: depth}, L)."""
    found: dict[str, tuple[str, int] | None] = {}
    for name, _ in encoder.named_parameters():
        m = _STAGE.search(name)
        found[name] = (m.group(1), int(m.group(2))) if m else None
    order = sorted({v for v in found.values() if v is not None}, key=lambda v: v[1])
    rank = {v: i + 1 for i, v in enumerate(order)}
    last = len(order)
    ids = {}
    for name, v in found.items():
        ids[name] = rank[v] if v is not None else (0 if _EMBEDDING.search(name) else last)
    return ids, last
