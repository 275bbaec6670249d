"""Windowed (shifted) multi-head attention for 2D and 3D Swin-family models.

One implementation for any number of spatial dims. Tensors inside the blocks are channels-last,
`(B, *S, C)` with `S` = (H, W) or (D, H, W). The pieces:

  window_partition / window_reverse   (B, *S, C) <-> (B * nW, N, C), N = prod(window)
  effective_window                    clip the window to the feature size (shift 0 on that axis)
  shift_mask                          (nW, N, N) additive mask, 0 within a region, -inf across regions
  relative_position_index             (N, N) index into a (2w-1)^dims relative position bias table
  attend_windows                      softmax(q kᵀ·scale + bias + shift mask) v, through SDPA (bias and mask
                                      merged into one attn_mask) or FlexAttention (bias as a score_mod, the
                                      shift mask as a block mask)
  WindowAttention                     self or cross attention over windows (attend_windows), relative bias
  shifted_window_attention            pad -> cyclic shift -> partition (one gather) -> attention -> gather back

QT-UNet uses them; PUNet can reuse them (subclass WindowAttention to add prompt tokens or another bias); the
Swin-UNETR encoder runs MONAI's window attention weights through attend_windows.

The constant tensors (shift masks, gather indices, relative position indices) are cached per device in eager
mode; under torch.compile they are built inside the graph instead (no cache lookups, no data-dependent shapes),
so every model that uses this module compiles with fullgraph=True.
"""

from __future__ import annotations

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


def _region_labels(spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(nW, N) region id of every token of every window of a cyclically shifted map."""
    img = torch.zeros(1, *spatial, 1, device=device)  # explicit device: callers may run under a meta device
    per_axis = []
    for w, k in zip(window, shift):
        per_axis.append((slice(0, -w), slice(-w, -k), slice(-k, None)) if k > 0 else (slice(None),))
    for label, sl in enumerate(itertools.product(*per_axis)):
        img[(slice(None), *sl, slice(None))] = label
    return window_partition(img, window).squeeze(-1)  # (nW, N)


def _make_shift_mask(spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    labels = _region_labels(spatial, window, shift, device)
    other = labels[:, :, None] != labels[:, None, :]  # (nW, N, N) True where query and key differ in region
    return torch.zeros(other.shape, device=device).masked_fill(other, float("-inf"))


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def _on_device(key: tuple, make, device: torch.device) -> torch.Tensor:
    """Keep one copy per device of a small constant tensor; make(device) builds it (on the CPU, then copied).

    Under torch.compile the tensor is built in the graph on the target device: dynamo would graph-break on a
    cache miss, and a guard on the cache's contents would recompile once it fills."""
    if torch.compiler.is_compiling():
        return make(device)
    k = key + (str(device),)
    t = _DEVICE_CACHE.get(k)
    if t is None:
        t = make("cpu").to(device)
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
    return _on_device(("mask", spatial, window, shift),
                      lambda dev: _make_shift_mask(spatial, window, shift, dev), torch.device(device))


def relative_position_index(window: tuple[int, ...], table_window: tuple[int, ...],
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, N) long index into a relative position bias table of prod(2 * table_window - 1) rows.

    `window` may be smaller than `table_window` (a window clipped to a small feature map): the offsets
    (-(w-1) .. w-1) are placed at their true position in the larger table.
    """
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window],
                                       indexing="ij")).flatten(1)  # (n, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (n, N, N), offsets query - key
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device=device)
    for axis, tw in enumerate(table_window):
        index = index * (2 * tw - 1) + rel[axis] + (tw - 1)
    return index


ATTENTION_BACKENDS = ("sdpa", "flex")


def check_attention_backend(backend: str) -> str:
    """The backend name, or a ConfigError naming the builder option."""
    if backend not in ATTENTION_BACKENDS:
        from sslkit.errors import ConfigError

        raise ConfigError(f"model.args.attention: '{backend}' is not one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "flex" and not _has_flex_attention():
        from sslkit.errors import ConfigError

        raise ConfigError(f"model.args.attention: flex needs torch.nn.attention.flex_attention (torch >= 2.5; "
                          f"this is torch {torch.__version__})")
    return backend


def _has_flex_attention() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Route every window attention of `model` (modules with an `attention_backend` attribute: WindowAttention,
    the Swin-UNETR encoder's MONAI attention) through `backend`; returns how many."""
    check_attention_backend(backend)
    units = [m for m in model.modules() if isinstance(getattr(m, "attention_backend", None), str)]
    for m in units:
        m.attention_backend = backend
    return len(units)


def bias_from_table(table: torch.Tensor, index: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """(heads, n, n) relative position bias: the rows `index` (n·n,) of `table` (positions, heads).

    F.embedding rather than `table[index]`: on the CPU the backward of advanced indexing accumulates the table's
    gradient with parallel atomic adds, whose order changes from run to run (last bits of the table after each
    step, so a resumed run would not equal the uninterrupted one); the embedding backward sums in a fixed order."""
    return F.embedding(index, table).view(n, n, heads).permute(2, 0, 1)


def attend_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                   mask: torch.Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
                   backend: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ · scale + bias + mask) v over windows.

    q (B_, h, N, d), k and v (B_, h, M, d) with B_ = B · nW windows, batch-major; bias (h, N, M) (relative
    position bias); mask (nW, N, M) additive, 0 within a region and -inf across (shifted windows), or None.
    Returns (B_, h, N, d).
      sdpa: bias and mask merged into one attn_mask for F.scaled_dot_product_attention (fused kernels on the
            CPU and the GPU; a 4-D stride-0 mask keeps the CPU's fused kernel available, a 3-D one does not).
            On the CPU with the bias under autograd (training) SDPA has no fused kernel and would take its
            math path, which is slower than the plain formula: that case computes the formula itself.
      flex: FlexAttention, the bias as a score_mod and the shift mask as a block mask. torch has no flex backward
            on the CPU: there it serves inference only; training needs CUDA (and torch.compile to be fast).
    """
    if backend == "flex":
        if dropout_p:
            raise ValueError("attention dropout is not supported by the flex backend")
        return _attend_flex(q, k, v, bias, mask, scale)
    if q.device.type == "cpu" and bias.requires_grad and torch.is_grad_enabled():
        return _attend_formula(q, k, v, bias, mask, scale, dropout_p)
    bw = q.shape[0]
    if mask is None:
        attn_mask = bias.unsqueeze(0).expand(bw, *bias.shape)
    else:
        nw = mask.shape[0]
        merged = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (nW, h, N, M)
        attn_mask = merged.unsqueeze(0).expand(bw // nw, *merged.shape).reshape(bw, *merged.shape[1:])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p,
                                          scale=scale)


def _attend_formula(q, k, v, bias, mask, scale, dropout_p):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1) + bias  # (B_, h, N, M)
    if mask is not None:  # windows batch-major: (B, nW, h, N, M) + (nW, 1, N, M), no copy of the mask per sample
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, *logits.shape[1:]) + mask.unsqueeze(1).to(logits.dtype)).flatten(0, 1)
    weights = F.dropout(logits.softmax(-1), dropout_p) if dropout_p else logits.softmax(-1)
    return weights.to(v.dtype) @ v


def _attend_flex(q, k, v, bias, mask, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bias = bias.to(q.dtype)

    def add_bias(score, b, head, q_idx, kv_idx):
        return score + bias[head, q_idx, kv_idx]

    block_mask = None
    if mask is not None:
        nw = mask.shape[0]
        same_region = mask == 0  # (nW, N, M)

        def in_region(b, head, q_idx, kv_idx):
            return same_region[b % nw, q_idx, kv_idx]

        block_mask = create_block_mask(in_region, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return flex_attention(q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scale)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative position bias.

    Self attention: q, k, v = Linear(x). Cross attention (`cross=True`): q = Linear(x), k, v = Linear(context)
    with its own layers, so a decoder can query an encoder tensor windowed the same way.

        out = softmax(q kᵀ / sqrt(d) + B_rel + M_shift) v        (attend_windows: SDPA, or FlexAttention)

    Shapes: x (B_, N, C) windowed tokens, B_ = B * nW (batch-major); context (B_, N, C); mask (nW, N, N) or None.
    The bias table has prod(2 * w - 1) rows (w = `window_size`, the largest window) and one column per head.

    Example:
        attn = WindowAttention(96, 3, (7, 7, 7))
        y = attn(torch.randn(8, 343, 96), window=(7, 7, 7))   # (8, 343, 96)
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 cross: bool = False, zero_init_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = tuple(window_size)
        self.cross = cross
        self.attention_backend = check_attention_backend(backend)
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
                         lambda dev: relative_position_index(window, self.window_size, dev), table.device)
        n = idx.shape[0]
        return bias_from_table(table, idx.view(-1), n, self.num_heads)

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
        out = attend_windows(q, k, v, self.relative_bias(window), mask, self.scale,
                             self.attn_drop if self.training else 0.0, self.attention_backend)  # (B_, h, N, d)
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


def _window_gather(spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...],
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices that do pad + cyclic shift + partition in one gather, and undo them in another.

    idx (L_pad,): windowed position j takes token idx[j] of the flat map (L = padding row, zeros);
    inv (L,): token i of the flat map sits at windowed position inv[i].
    """
    n_tok = math.prod(spatial)
    ids = torch.arange(n_tok, device=device).view(1, *spatial, 1)
    ids = pad_to_multiple(ids, window, value=n_tok)  # padding points to the zero row
    ids = torch.roll(ids, [-k for k in shift], list(range(1, len(spatial) + 1)))
    idx = window_partition(ids, window).reshape(-1)  # (L_pad,)
    # scatter, not a boolean selection (no data-dependent shape under torch.compile): every padding position
    # writes to the extra slot n_tok, which is dropped
    positions = torch.arange(idx.numel(), device=device)
    inv = torch.zeros(n_tok + 1, dtype=torch.long, device=device).scatter(0, idx, positions)[:n_tok]
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
    idx = _on_device(key + ("idx",), lambda dev: _window_gather(spatial, window, shift, dev)[0], x.device)
    inv = _on_device(key + ("inv",), lambda dev: _window_gather(spatial, window, shift, dev)[1], x.device)
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
