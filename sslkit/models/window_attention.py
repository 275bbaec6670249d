"""Windowed (shifted) multi-head attention for 2D and 3D Swin-family models.

One implementation for any number of spatial dims. Tensors inside the blocks are channels-last,
`(B, *S, C)` with `S` = (H, W) or (D, H, W). The pieces:

  window_partition / window_reverse   (B, *S, C) <-> (B * nW, N, C), N = prod(window)
  effective_window                    clip the window to the feature size (shift 0 on that axis)
  shift_mask                          (nW, N, N) additive mask, 0 within a region, -inf across regions
  relative_position_index             (N, N) index into a (2w-1)^dims relative position bias table
  WindowAttention                     self or cross attention over windows through
                                      `F.scaled_dot_product_attention`, relative bias + shift mask in attn_mask
  shifted_window_attention            pad -> cyclic shift -> partition (one gather) -> attention -> gather back

QT-UNet uses them; PUNet can reuse them (subclass WindowAttention to add prompt tokens or another bias).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_


def to_tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    """7 -> (7, 7, 7) for n = 3; a sequence is checked for length n."""
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"expected {n} values, got {tuple(v)}")
        return tuple(int(x) for x in v)
    return (int(v),) * n


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Cut a channels-last map into non-overlapping windows.

    (B, *S, C) -> (B * nW, N, C) with nW = prod(S_i / w_i), N = prod(w_i); windows are ordered
    batch-major (index = b * nW + window), row-major over the window grid. Each S_i must divide by w_i.
    """
    b, *spatial, c = x.shape
    n = len(spatial)
    shape = [b]
    for s, w in zip(spatial, window):
        shape += [s // w, w]
    x = x.view(*shape, c)  # (B, S0/w0, w0, S1/w1, w1, ..., C)
    perm = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1]
    return x.permute(perm).reshape(-1, math.prod(window), c)  # (B * nW, N, C)


def window_reverse(windows: torch.Tensor, window: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, N, C) -> (B, *S, C)."""
    n = len(spatial)
    grid = [s // w for s, w in zip(spatial, window)]
    c = windows.shape[-1]
    x = windows.view(-1, *grid, *window, c)  # (B, S0/w0, S1/w1, ..., w0, w1, ..., C)
    perm = [0]
    for i in range(n):
        perm += [1 + i, 1 + n + i]
    perm += [2 * n + 1]
    return x.permute(perm).reshape(-1, *spatial, c)


def effective_window(spatial: Sequence[int], window: Sequence[int],
                     shift: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Clip the window to the feature size per axis; an axis not larger than the window gets shift 0."""
    win, sh = [], []
    for s, w, k in zip(spatial, window, shift):
        if s <= w:
            win.append(s)
            sh.append(0)
        else:
            win.append(w)
            sh.append(k)
    return tuple(win), tuple(sh)


@functools.lru_cache(maxsize=64)
def _region_labels(spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """(nW, N) region id of every token of every window of a cyclically shifted map (CPU)."""
    img = torch.zeros(1, *spatial, 1, device="cpu")  # explicit: callers may run under a meta device
    per_axis = []
    for w, k in zip(window, shift):
        per_axis.append((slice(0, -w), slice(-w, -k), slice(-k, None)) if k > 0 else (slice(None),))
    for label, sl in enumerate(itertools.product(*per_axis)):
        img[(slice(None), *sl, slice(None))] = label
    return window_partition(img, window).squeeze(-1)  # (nW, N)


@functools.lru_cache(maxsize=64)
def _shift_mask_cpu(spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    labels = _region_labels(spatial, window, shift)
    other = labels[:, :, None] != labels[:, None, :]  # (nW, N, N) True where query and key differ in region
    return torch.zeros(other.shape, device="cpu").masked_fill(other, float("-inf"))


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def _on_device(key: tuple, make, device: torch.device) -> torch.Tensor:
    """Keep one copy per device of a small constant tensor built on the CPU."""
    k = key + (str(device),)
    t = _DEVICE_CACHE.get(k)
    if t is None:
        t = make().to(device)
        if len(_DEVICE_CACHE) > 256:
            _DEVICE_CACHE.clear()
        _DEVICE_CACHE[k] = t
    return t


def shift_mask(spatial: Sequence[int], window: Sequence[int], shift: Sequence[int],
               device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Additive shifted-window mask (nW, N, N): 0 where query and key come from the same region of the
    cyclically shifted (padded) map, -inf otherwise. None when no axis is shifted. `spatial` must divide
    by `window`."""
    spatial, window, shift = tuple(spatial), tuple(window), tuple(shift)
    if not any(shift):
        return None
    return _on_device(("mask", spatial, window, shift), lambda: _shift_mask_cpu(spatial, window, shift),
                      torch.device(device))


@functools.lru_cache(maxsize=64)
def relative_position_index(window: tuple[int, ...], table_window: tuple[int, ...]) -> torch.Tensor:
    """(N, N) long index into a relative position bias table of prod(2 * table_window - 1) rows.

    `window` may be smaller than `table_window` (a window clipped to a small feature map): the offsets
    (-(w-1) .. w-1) are placed at their true position in the larger table.
    """
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device="cpu") for w in window],
                                       indexing="ij")).flatten(1)  # (n, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (n, N, N), offsets query - key
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device="cpu")
    for axis, tw in enumerate(table_window):
        index = index * (2 * tw - 1) + rel[axis] + (tw - 1)
    return index


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative position bias.

    Self attention: q, k, v = Linear(x). Cross attention (`cross=True`): q = Linear(x), k, v = Linear(context)
    with its own layers, so a decoder can query an encoder tensor windowed the same way.

        out = softmax(q kᵀ / sqrt(d) + B_rel + M_shift) v        (computed by SDPA, B_rel + M_shift = attn_mask)

    Shapes: x (B_, N, C) windowed tokens, B_ = B * nW (batch-major); context (B_, N, C); mask (nW, N, N) or None.
    The bias table has prod(2 * w - 1) rows (w = `window_size`, the largest window) and one column per head.

    Example:
        attn = WindowAttention(96, 3, (7, 7, 7))
        y = attn(torch.randn(8, 343, 96), window=(7, 7, 7))   # (8, 343, 96)
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 cross: bool = False, zero_init_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = tuple(window_size)
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        rows = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        if not zero_init_bias:
            trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self, window: Sequence[int]) -> torch.Tensor:
        """(heads, N, N) bias for a window of the given (possibly clipped) size."""
        window = tuple(window)
        table = self.relative_position_bias_table
        idx = _on_device(("rpi", window, self.window_size),
                         lambda: relative_position_index(window, self.window_size), table.device)
        n = idx.shape[0]
        return table[idx.view(-1)].view(n, n, self.num_heads).permute(2, 0, 1)  # (h, N, N)

    def attn_mask(self, window: Sequence[int], mask: torch.Tensor | None, batch_windows: int) -> torch.Tensor:
        """Relative bias and shift mask merged into one SDPA attn_mask: (h, N, N) or (B_, h, N, N)."""
        bias = self.relative_bias(window)  # (h, N, N)
        if mask is None:
            # a 4-D (stride-0) mask keeps SDPA's fused CPU kernel available; a 3-D one falls back to the math path
            return bias.unsqueeze(0).expand(batch_windows, *bias.shape)
        nw = mask.shape[0]
        merged = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (nW, h, N, N)
        b = batch_windows // nw
        return merged.unsqueeze(0).expand(b, *merged.shape).reshape(batch_windows, *merged.shape[1:])

    def project_qkv(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """(B_, N, C) -> q, k, v each (B_, h, N, d)."""
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        if self.cross:
            if context is None:
                raise ValueError("cross attention needs a context tensor")
            q = self.q(x).view(b, n, h, d).transpose(1, 2)
            k, v = self.kv(context).view(b, context.shape[1], 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                window: Sequence[int] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        window = tuple(window) if window is not None else self.window_size
        b, n, c = x.shape
        q, k, v = self.project_qkv(x, context)  # (B_, h, N, d)
        attn_mask = self.attn_mask(window, mask, b).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)  # (B_, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int], value: float = 0) -> torch.Tensor:
    """Pad the spatial axes of a channels-last map (B, *S, C) at the end to multiples of `multiple`."""
    spatial = x.shape[1:-1]
    pads = [(-s) % m for s, m in zip(spatial, multiple)]
    if not any(pads):
        return x
    spec = [0, 0]  # channels
    for p in reversed(pads):
        spec += [0, p]
    return F.pad(x, spec, value=value)


@functools.lru_cache(maxsize=64)
def _window_gather_cpu(spatial: tuple[int, ...], window: tuple[int, ...],
                       shift: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices that do pad + cyclic shift + partition in one gather, and undo them in another.

    idx (L_pad,): windowed position j takes token idx[j] of the flat map (L = padding row, zeros);
    inv (L,): token i of the flat map sits at windowed position inv[i].
    """
    n_tok = math.prod(spatial)
    ids = torch.arange(n_tok, device="cpu").view(1, *spatial, 1)
    ids = pad_to_multiple(ids, window, value=n_tok)  # padding points to the zero row
    ids = torch.roll(ids, [-k for k in shift], list(range(1, len(spatial) + 1)))
    idx = window_partition(ids, window).reshape(-1)  # (L_pad,)
    inv = torch.empty(n_tok, dtype=torch.long, device="cpu")
    keep = idx < n_tok
    inv[idx[keep]] = torch.arange(idx.numel(), device="cpu")[keep]
    return idx, inv


def shifted_window_attention(attn: WindowAttention, x: torch.Tensor, window: Sequence[int],
                             shift: Sequence[int], context: torch.Tensor | None = None) -> torch.Tensor:
    """Run `attn` over (shifted) windows of a channels-last map; (B, *S, C) -> (B, *S, C).

    The window is clipped per axis to the feature size (shift 0 there); the map (and the context, for cross
    attention, which must have the same spatial size) is zero-padded at the end to a multiple of the window,
    rolled by -shift, cut into windows, attended with the relative bias and the shifted-window mask, and put
    back. Pad, roll and partition are one precomputed gather (and one gather back), not five copies.
    """
    b, *spatial, c = x.shape
    spatial = tuple(spatial)
    window, shift = effective_window(spatial, window, shift)
    padded = tuple(math.ceil(s / w) * w for s, w in zip(spatial, window))
    if context is not None and tuple(context.shape[1:-1]) != spatial:
        raise ValueError(f"context spatial size {tuple(context.shape[1:-1])} != query size {spatial}")
    key = ("gather", spatial, window, shift)
    idx = _on_device(key + ("idx",), lambda: _window_gather_cpu(spatial, window, shift)[0], x.device)
    inv = _on_device(key + ("inv",), lambda: _window_gather_cpu(spatial, window, shift)[1], x.device)
    n = math.prod(window)
    need_pad = padded != spatial

    def to_windows(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(b, -1, c)  # (B, *S, C) -> (B, L, C)
        if need_pad:
            t = F.pad(t, (0, 0, 0, 1))  # (B, L + 1, C), the last row is zero padding
        return t.index_select(1, idx).view(-1, n, c)  # (B * nW, N, C)

    mask = shift_mask(padded, window, shift, x.device)
    out = attn(to_windows(x), to_windows(context) if context is not None else None, window, mask)
    out = out.view(b, -1, c).index_select(1, inv)  # (B * nW, N, C) -> (B, L, C)
    return out.view(b, *spatial, c)


def init_transformer_weights(m: nn.Module) -> None:
    """Swin / ViT initialisation: truncated-normal Linear weights (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
