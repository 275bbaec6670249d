"""PUNet: the prompt-able UNet of "Prompt Tuning for Parameter-efficient Medical Image Segmentation".

Reference: `papers/punet_prompt_tuning_readme.txt`; SPECS.md "PUNet". One implementation for 2D and 3D
(`spatial_dims`). Tensors are (B, C, *S) with S = (H, W) or (H, W, D); the reference's 2D-as-D=1 runs here as
`spatial_dims=2`, which is the same computation (a window (8, 8, 1) over a depth of 1 is a window (8, 8)).

    image (B, C_in, *S)
      -> stem: residual conv block C_in -> 32, stride 2 in-plane (1 in depth)        (B, 32, *S/2)
      -> 5 encoder stages (32, 64, 128, 256, 384); stage 1 stride 1, later stages stride 2:
           y = PSWin(conv3(LeakyReLU(BN(x)))) + conv1_strided(BN(x))
      -> 4 decoder stages 384 -> 256 -> 128 -> 64 -> 32:
           upsample to the skip's size -> concat skip -> BN -> LeakyReLU -> conv3 -> PSWin
      -> dense embedding F (B, 32, *S/2)
      -> similarity aggregation with segmentation prompts -> class scores (B, I, *S/2) -> upsample to (B, I, *S)

PSWin block = W-MSA sub-block then SW-MSA sub-block (shift = window // 2); each sub-block is pre-norm:
    x += PMA(LN(x));  x += Linear(LN(x))
PMA (prompt-able multi-head attention): q/k/v without bias; per sample, the prompt tokens of its active classes
(pool: num_classes x 16 tokens x C, one pool per sub-block) go through the same LN and k/v projection and are
prepended to every window's keys/values; they are dropped after attention (only content queries are kept, so
prompt queries are never computed - their outputs would be dropped). Logits get the heterogeneous bias score:
    content -> content: Proj( mean_axis E_axis[offset_axis] )      per-axis relative offset embeddings (dim 32)
    content -> prompt:  Proj( T_class[token] )                      per-class table [16 x 32]
    (prompt rows would be 0; they are not computed) + the shifted-window mask (additive -inf; the reference
    multiplies logits by the mask, SPECS quirk).
Similarity aggregation: s = (cos(F, P) + 1) / 2 (reference quirk: cos + 0.5), w = softmax_tokens(sg(s) / 0.1),
score_class = sum_tokens w * s.

Every class's prompt tokens and bias table are their own `nn.Parameter`, so `prompt_parameters(model, c)` can
hand exactly one class to an optimizer (downstream prompt tuning) and leave the rest bitwise untouched.

`prompted=False` is the non-prompted ("_noninstructed") variant: no prompt pools, no content->prompt bias, and a
1x1 conv head giving class logits from F.

Classes: `classes` is None (the model's `default_classes`, else all classes of the pool), a list of class
indices shared by the batch, or a LongTensor (B, I) per sample; -1 pads a sample that has fewer classes
(its prompts are masked out of attention and its score is -inf).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from sslkit.models.base import Encoder, checkpoint_if
from sslkit.models.base import (channels_first as _channels_first, channels_last as _channels_last,
                                conv_nd as _conv)
from sslkit.models.registry import register_encoder, register_segmenter
from sslkit.models.window_attention import init_transformer_weights, shifted_window_attention, to_tuple

DEFAULT_CHANNELS = (32, 64, 128, 256, 384)


def _bn(spatial_dims: int):
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


def _interp_mode(spatial_dims: int) -> str:
    return {2: "bilinear", 3: "trilinear"}[spatial_dims]


def _default_window(spatial_dims: int) -> tuple[int, ...]:
    return (8, 8) if spatial_dims == 2 else (4, 4, 4)


def as_class_tensor(classes, batch: int, num_classes: int, device) -> torch.Tensor:
    """None | list[int] | (I,) | (B, I) LongTensor -> (B, I) long on `device`; -1 = padding."""
    if classes is None:
        classes = list(range(num_classes))
    t = torch.as_tensor(classes, dtype=torch.long, device=device)
    if t.ndim == 1:
        t = t.unsqueeze(0).expand(batch, -1)
    if t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"classes must be (I,) or (B={batch}, I), got shape {tuple(t.shape)}")
    # a host read: checked in eager mode only (under torch.compile it would break the graph)
    if t.numel() and not torch.compiler.is_compiling() and int(t.max()) >= num_classes:
        raise ValueError(f"class index {int(t.max())} is outside the prompt pool of {num_classes} classes")
    return t


# --------------------------------------------------------------------------------------------------- blocks


class PromptWindowAttention(nn.Module):
    """Window attention with prompt tokens and the heterogeneous bias score.

    forward(x (B_, N, C) windowed content tokens, window, mask (nW, N, N) | None, prompt (k_p, v_p, bias_p) | None)
      -> (B_, N, C); k_p, v_p (B, h, P, d) and bias_p (B, h, 1, P) come from `prompt_state` once per sub-block.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], num_classes: int = 10,
                 prompt_tokens: int = 16, bias_dim: int = 32, prompted: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size = tuple(window_size)
        self.prompted = prompted
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # content -> content: one learned offset embedding table per axis, (2w - 1, bias_dim)
        self.axis_tables = nn.ParameterList(
            [nn.Parameter(trunc_normal_(torch.empty(2 * w - 1, bias_dim), std=0.02)) for w in self.window_size])
        self.bias_proj = nn.Linear(bias_dim, num_heads)
        if prompted:
            self.prompts = nn.ParameterList(
                [nn.Parameter(trunc_normal_(torch.empty(prompt_tokens, dim), std=0.02)) for _ in range(num_classes)])
            self.prompt_bias = nn.ParameterList(
                [nn.Parameter(trunc_normal_(torch.empty(prompt_tokens, bias_dim), std=0.02))
                 for _ in range(num_classes)])

    def content_bias(self, window: Sequence[int]) -> torch.Tensor:
        """(h, N, N): Proj(mean_a E_a[offset_a]) = mean_a (E_a W^T)[offset_a] + b (Proj is affine)."""
        w_proj = self.bias_proj.weight  # (h, bias_dim)
        grids = torch.meshgrid(*[torch.arange(w, device=w_proj.device) for w in window], indexing="ij")
        total = 0
        for axis, (g, tw) in enumerate(zip(grids, self.window_size)):
            c = g.reshape(-1)  # (N,)
            idx = c[:, None] - c[None, :] + (tw - 1)  # (N, N) offset query - key into the (2 tw - 1) table
            per_head = F.linear(self.axis_tables[axis], w_proj)  # (2 tw - 1, h)
            total = total + per_head[idx]  # (N, N, h)
        bias = total / len(window) + self.bias_proj.bias
        return bias.permute(2, 0, 1)  # (h, N, N)

    def prompt_state(self, norm: nn.LayerNorm, classes: torch.Tensor):
        """Keys, values and bias of the active classes' prompts: classes (B, I) -> k_p, v_p (B, h, P, d),
        bias_p (B, h, 1, P) with P = I * tokens (-inf for padded classes)."""
        b, i = classes.shape
        pool = torch.stack(list(self.prompts))  # (K, T, C)
        table = torch.stack(list(self.prompt_bias))  # (K, T, bias_dim)
        safe = classes.clamp(min=0)
        tokens = pool[safe].reshape(b, -1, self.dim)  # (B, I, T, C) -> (B, P, C)
        kv = F.linear(norm(tokens), self.qkv.weight[self.dim:])  # (B, P, 2C), shared LN and k/v weights
        k_p, v_p = kv.view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.bias_proj(table[safe]).reshape(b, -1, self.num_heads)  # (B, P, h)
        t = pool.shape[1]
        pad = (classes < 0).repeat_interleave(t, dim=1)  # (B, P)
        bias = bias.masked_fill(pad[..., None], float("-inf"))
        return k_p, v_p, bias.permute(0, 2, 1).unsqueeze(2)  # (B, h, 1, P)

    def forward(self, x: torch.Tensor, window: Sequence[int], mask: torch.Tensor | None = None,
                prompt=None) -> torch.Tensor:
        bw, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(bw, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        bias = self.content_bias(window).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            bias = bias + mask.unsqueeze(1).to(bias.dtype)  # (nW, h, N, N)
        if prompt is None:
            nw = bias.shape[0]
            attn_mask = bias.unsqueeze(0).expand(bw // nw, *bias.shape).reshape(bw, h, n, n)
        else:
            k_p, v_p, bias_p = prompt
            b = k_p.shape[0]
            nw = bw // b
            p = k_p.shape[2]

            def per_window(t):  # (B, h, P, d) -> (B_, h, P, d), windows batch-major
                return t.unsqueeze(1).expand(b, nw, *t.shape[1:]).reshape(bw, *t.shape[1:])

            k = torch.cat([per_window(k_p), k], dim=2)  # prompts prepended: (B_, h, P + N, d)
            v = torch.cat([per_window(v_p), v], dim=2)
            cc = bias.unsqueeze(0).expand(b, nw, h, n, n)  # (B, nW, h, N, N)
            cp_ = bias_p.unsqueeze(1).expand(b, nw, h, n, p)  # (B, nW, h, N, P)
            attn_mask = torch.cat([cp_, cc], dim=-1).reshape(bw, h, n, p + n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))  # (B_, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class PSWinSubBlock(nn.Module):
    """x += PMA(LN(x)); x += Linear(LN(x)) on a channels-last map (B, *S, C); `shift` 0 = W-MSA, else SW-MSA."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], shift: Sequence[int], **attn_kw):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PromptWindowAttention(dim, num_heads, window, **attn_kw)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        prompt = None
        if self.attn.prompted and classes is not None and classes.shape[1] > 0:
            prompt = self.attn.prompt_state(self.norm1, classes)

        def attend(xw, context, window, mask):
            return self.attn(xw, window, mask, prompt)

        x = x + shifted_window_attention(attend, self.norm1(x), self.window, self.shift)
        return x + self.mlp(self.norm2(x))


class PSWinBlock(nn.Module):
    """W-MSA sub-block then SW-MSA sub-block (shift = window // 2); (B, C, *S) -> (B, C, *S)."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], use_checkpoint: bool = False, **attn_kw):
        super().__init__()
        self.w_msa = PSWinSubBlock(dim, num_heads, window, (0,) * len(window), **attn_kw)
        self.sw_msa = PSWinSubBlock(dim, num_heads, window, tuple(w // 2 for w in window), **attn_kw)
        self.use_checkpoint = use_checkpoint

    def _run(self, x, classes):
        x = _channels_last(x)
        x = self.sw_msa(self.w_msa(x, classes), classes)
        return _channels_first(x)

    def forward(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        return checkpoint_if(self.use_checkpoint and self.training, self._run, x, classes)


class ResidualStem(nn.Module):
    """Residual conv block C_in -> C, stride 2 in-plane (1 in depth):
    y = conv3(LeakyReLU(BN(conv3_strided(x)))) + conv1_strided(x)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        stride = (2, 2) if spatial_dims == 2 else (2, 2, 1)
        conv = _conv(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = _bn(spatial_dims)(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = conv(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.norm(self.conv1(x)))) + self.skip(x)


class EncoderStage(nn.Module):
    """y = PSWin(conv3(LeakyReLU(BN(x)))) + conv1_strided(BN(x)); (B, C_in, *S) -> (B, C_out, *S/stride)."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, stride: int, num_heads: int, window, **kw):
        super().__init__()
        conv = _conv(spatial_dims)
        self.norm = _bn(spatial_dims)(c_in)
        self.act = nn.LeakyReLU(0.01)
        self.conv = conv(c_in, c_out, 3, stride=stride, padding=1)
        self.skip = conv(c_in, c_out, 1, stride=stride)
        self.block = PSWinBlock(c_out, num_heads, window, **kw)

    def forward(self, x: torch.Tensor, classes) -> torch.Tensor:
        xn = self.norm(x)
        return self.block(self.conv(self.act(xn)), classes) + self.skip(xn)


class DecoderStage(nn.Module):
    """upsample to the skip's size -> concat skip -> BN -> LeakyReLU -> conv3 -> PSWin; -> (B, C_out, *S_skip)."""

    def __init__(self, spatial_dims: int, c_deep: int, c_skip: int, c_out: int, num_heads: int, window, **kw):
        super().__init__()
        self.mode = _interp_mode(spatial_dims)
        self.norm = _bn(spatial_dims)(c_deep + c_skip)
        self.act = nn.LeakyReLU(0.01)
        self.conv = _conv(spatial_dims)(c_deep + c_skip, c_out, 3, padding=1)
        self.block = PSWinBlock(c_out, num_heads, window, **kw)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, classes) -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        y = torch.cat([up, skip], dim=1)  # (B, C_deep + C_skip, *S_skip)
        return self.block(self.conv(self.act(self.norm(y))), classes)


def similarity_aggregation(f: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Class scores from dense features and class prompt tokens.

    f (B, M, D) features, p (B, I, T, D) prompt tokens of I classes ->
        s = (cos(f, p) + 1) / 2                        (B, I, M, T)
        w = softmax_T(stopgrad(s) / temperature)
        score = sum_T w * s                            (B, I, M)
    Example: similarity_aggregation(torch.randn(2, 100, 32), torch.randn(2, 3, 16, 32))  # (2, 3, 100)
    """
    s = (torch.einsum("bmd,bitd->bimt", F.normalize(f, dim=-1), F.normalize(p, dim=-1)) + 1.0) / 2.0
    w = torch.softmax(s.detach() / temperature, dim=-1)
    return (w * s).sum(-1)


# --------------------------------------------------------------------------------------------------- model


class PUNet(Encoder):
    """The whole prompt-able UNet (encoder + decoder + similarity head) as an Encoder.

    PUNet is pretrained and prompt-tuned as one network, so its encoder state dict is the whole network's.
      forward(x, classes=None) -> 5 encoder stage maps [(B, C_i, *S_i)] (Encoder contract; deepest = 384)
      run(x, classes=None) -> {"stages", "dense" (B, C_0, *S/2), "scores" (B, I, *S)}
      dense(x, classes=None) -> decoder embedding F (B, C_0, *S/2)       (CPA works on this)
      segment(x, classes=None) -> class scores (B, I, *S)                 (prompted: similarity in [0, 1];
                                                                          prompted=False: logits of a 1x1 conv)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: Sequence[int] = DEFAULT_CHANNELS,
                 num_heads: int = 8, window_size: int | Sequence[int] | None = None, num_classes: int = 10,
                 prompt_tokens: int = 16, bias_dim: int = 32, prompted: bool = True,
                 default_classes: Sequence[int] | None = None, similarity_temperature: float = 0.1,
                 use_checkpoint: bool = False):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5:
            raise ValueError(f"PUNet has 5 stages; channels {channels} has {len(channels)}")
        window = _default_window(spatial_dims) if window_size is None else to_tuple(window_size, spatial_dims)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.feature_channels = list(channels)
        self.patch_size, self.embed_dim = 2, channels[0]
        self.num_classes, self.prompt_tokens, self.prompted = num_classes, prompt_tokens, prompted
        self.window_size = window
        self.default_classes = None if default_classes is None else [int(c) for c in default_classes]
        self.similarity_temperature = similarity_temperature
        kw = dict(num_classes=num_classes, prompt_tokens=prompt_tokens, bias_dim=bias_dim, prompted=prompted,
                  use_checkpoint=use_checkpoint)
        self.stem = ResidualStem(spatial_dims, in_channels, channels[0])
        c_prev = channels[0]
        self.encoder_stages = nn.ModuleList()
        for i, c in enumerate(channels):
            self.encoder_stages.append(EncoderStage(spatial_dims, c_prev, c, 1 if i == 0 else 2, num_heads, window,
                                                    **kw))
            c_prev = c
        self.decoder_stages = nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            self.decoder_stages.append(DecoderStage(spatial_dims, c_prev, channels[i - 1], channels[i - 1],
                                                    num_heads, window, **kw))
            c_prev = channels[i - 1]
        if prompted:
            self.seg_prompts = nn.ParameterList(
                [nn.Parameter(trunc_normal_(torch.empty(prompt_tokens, channels[0]), std=0.02))
                 for _ in range(num_classes)])
        else:
            self.seg_head = _conv(spatial_dims)(channels[0], num_classes, 1)
        self.apply(init_transformer_weights)

    # -------------------------------------------------------------------------------- helpers
    def class_tensor(self, classes, batch: int, device) -> torch.Tensor:
        return as_class_tensor(self.default_classes if classes is None else classes, batch, self.num_classes,
                               device)

    def prompt_attention_layers(self) -> list[PromptWindowAttention]:
        return [m for m in self.modules() if isinstance(m, PromptWindowAttention)]

    # -------------------------------------------------------------------------------- forward passes
    def _encode(self, x: torch.Tensor, cls: torch.Tensor | None) -> list[torch.Tensor]:
        stages = []
        h = self.stem(x)  # (B, C_in, *S) -> (B, C_0, *S/2)
        for stage in self.encoder_stages:
            h = stage(h, cls)
            stages.append(h)
        return stages

    def _decode(self, stages: list[torch.Tensor], cls) -> torch.Tensor:
        h = stages[-1]
        for stage, skip in zip(self.decoder_stages, reversed(stages[:-1])):
            h = stage(h, skip, cls)
        return h  # (B, C_0, *S/2)

    def _head(self, f: torch.Tensor, cls: torch.Tensor, size) -> torch.Tensor:
        b = f.shape[0]
        if self.prompted:
            pool = torch.stack(list(self.seg_prompts))  # (K, T, C_0)
            tokens = pool[cls.clamp(min=0)]  # (B, I, T, C_0)
            scores = similarity_aggregation(f.flatten(2).transpose(1, 2), tokens, self.similarity_temperature)
            scores = scores.view(b, cls.shape[1], *f.shape[2:])  # (B, I, M) -> (B, I, *S/2)
        else:
            logits = self.seg_head(f)  # (B, K, *S/2)
            idx = cls.clamp(min=0).view(b, -1, *([1] * self.spatial_dims)).expand(-1, -1, *f.shape[2:])
            scores = logits.gather(1, idx)
        scores = F.interpolate(scores, size=size, mode=_interp_mode(self.spatial_dims), align_corners=False)
        pad = (cls < 0).view(b, -1, *([1] * self.spatial_dims))
        return scores.masked_fill(pad, float("-inf"))  # (B, I, *S)

    def run(self, x: torch.Tensor, classes=None, head: bool = True) -> dict:
        cls = self.class_tensor(classes, x.shape[0], x.device)
        attn_cls = cls if self.prompted else None
        stages = self._encode(x, attn_cls)
        dense = self._decode(stages, attn_cls)
        out = {"stages": stages, "dense": dense, "classes": cls}
        if head:
            out["scores"] = self._head(dense, cls, x.shape[2:])
        return out

    def forward(self, x: torch.Tensor, classes=None) -> list[torch.Tensor]:
        cls = self.class_tensor(classes, x.shape[0], x.device) if self.prompted else None
        return self._encode(x, cls)

    def dense(self, x: torch.Tensor, classes=None) -> torch.Tensor:
        return self.run(x, classes, head=False)["dense"]

    def segment(self, x: torch.Tensor, classes=None) -> torch.Tensor:
        return self.run(x, classes)["scores"]


class PUNetSegmenter(nn.Module):
    """Segmentation model: `.encoder` is the whole PUNet; forward(x, classes=None) -> scores (B, I, *S).
    Output channel i is prompt-pool class `classes[i]` (default 0 .. out_channels - 1; channel 0 = background),
    so a dataset's label 1 can be a pool class that pretraining never saw (prompt tuning a new class)."""

    def __init__(self, encoder: PUNet, out_channels: int, classes: Sequence[int] | None = None):
        super().__init__()
        classes = list(range(out_channels)) if classes is None else [int(c) for c in classes]
        if len(classes) != out_channels:
            raise ValueError(f"classes {classes} must name one prompt-pool class per output channel "
                             f"({out_channels})")
        if len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) >= encoder.num_classes:
            raise ValueError(f"classes {classes} must be distinct classes of the prompt pool "
                             f"0..{encoder.num_classes - 1}")
        self.encoder = encoder
        self.out_channels = out_channels
        self.classes = classes

    def forward(self, x: torch.Tensor, classes=None) -> torch.Tensor:
        return self.encoder.segment(x, self.classes if classes is None else classes)


def prompt_parameters(model: nn.Module, class_index: int) -> list[nn.Parameter]:
    """Exactly the parameters downstream prompt tuning trains for one class: its prompt tokens in every
    sub-block of every stage, its segmentation prompt tokens (final pool) and its content->prompt bias tables."""
    net = model.encoder if isinstance(model, PUNetSegmenter) else model
    if not isinstance(net, PUNet) or not net.prompted:
        raise ValueError("prompt_parameters needs a prompted PUNet")
    if not 0 <= class_index < net.num_classes:
        raise ValueError(f"class {class_index} is outside the prompt pool of {net.num_classes} classes")
    params = []
    for attn in net.prompt_attention_layers():
        params += [attn.prompts[class_index], attn.prompt_bias[class_index]]
    params.append(net.seg_prompts[class_index])
    return params


# ------------------------------------------------------------------------------------------------ builders


@register_encoder("punet")
def punet_encoder(spatial_dims: int = 3, in_channels: int = 1, channels: Sequence[int] = DEFAULT_CHANNELS,
                  num_heads: int = 8, window_size: int | Sequence[int] | None = None, num_classes: int = 10,
                  prompt_tokens: int = 16, bias_dim: int = 32, prompted: bool = True,
                  default_classes: Sequence[int] | None = None, use_checkpoint: bool = False) -> PUNet:
    """PUNet (whole network) as an Encoder; windows default (8, 8) in 2D, (4, 4, 4) in 3D."""
    return PUNet(spatial_dims, in_channels, channels, num_heads, window_size, num_classes, prompt_tokens, bias_dim,
                 prompted, default_classes, use_checkpoint=use_checkpoint)


@register_segmenter("punet")
def punet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
          channels: Sequence[int] = DEFAULT_CHANNELS, num_heads: int = 8,
          window_size: int | Sequence[int] | None = None, num_classes: int = 10, prompt_tokens: int = 16,
          bias_dim: int = 32, prompted: bool = True, classes: Sequence[int] | None = None,
          use_checkpoint: bool = False) -> PUNetSegmenter:
    """PUNet segmentation model: output channel i = pool class classes[i] (default i) of a pool of `num_classes`."""
    enc = punet_encoder(spatial_dims, in_channels, channels, num_heads, window_size, num_classes, prompt_tokens,
                        bias_dim, prompted, use_checkpoint=use_checkpoint)
    return PUNetSegmenter(enc, out_channels, classes)
