"""Adaptation modes: how a pretrained encoder takes part in downstream training, and loading its weights.

A mode is a function `(model, adapt_cfg, lr) -> Adaptation` registered under a name. It decides which
parameters train (optimizer param groups) and which modules stay in eval mode (frozen ones keep their
normalisation statistics too). New modes (adapters, prompt tuning) register here without touching train.py:

    @register_mode("my_adapter")
    def my_adapter(model, cfg, lr):
        ...  # add modules to the model, freeze the rest
        return Adaptation(param_groups=[{"params": new_params, "lr": lr}], frozen_modules=[model.encoder])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sslkit.errors import ConfigError


@dataclass
class Adaptation:
    param_groups: list[dict]
    frozen_modules: list[nn.Module] = field(default_factory=list)

    def train_mode(self, model: nn.Module) -> None:
        """model.train(), then frozen modules back to eval (no dropout / norm statistics updates)."""
        model.train()
        for m in self.frozen_modules:
            m.eval()


_MODES: dict[str, Callable] = {}
_PREPARE: dict[str, Callable] = {}  # mode -> fn(model, adapt_cfg) changing the architecture (e.g. adding adapters)


def register_mode(name: str, prepare: Callable | None = None):
    """Register an adaptation mode. `prepare(model, adapt_cfg)`, if given, runs inside build_model, so training,
    evaluation and prediction build the same architecture (new modules' keys go in `model.encoder.added_keys`,
    which encoder-weight loading lets be missing)."""
    def wrap(fn):
        _MODES[name] = fn
        if prepare is not None:
            _PREPARE[name] = prepare
        return fn

    return wrap


def mode_names() -> list[str]:
    return sorted(_MODES)


def adapt(model: nn.Module, adapt_cfg, lr: float) -> Adaptation:
    if adapt_cfg.mode not in _MODES:
        raise ConfigError(f"adapt.mode: '{adapt_cfg.mode}' is not one of {', '.join(mode_names())}")
    return _MODES[adapt_cfg.mode](model, adapt_cfg, lr)


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder params, the rest), by identity: segmenters may share encoder tensors with their inner net."""
    enc = list(model.encoder.parameters())
    enc_ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if id(p) not in enc_ids]
    return enc, rest


@register_mode("full")
def _full(model: nn.Module, cfg, lr: float) -> Adaptation:
    enc, rest = _split_params(model)
    for p in model.parameters():
        p.requires_grad_(True)
    scale = getattr(cfg, "encoder_lr_scale", 1.0)
    groups = [{"params": rest, "lr": lr, "name": "decoder"}, {"params": enc, "lr": lr * scale, "name": "encoder"}]
    return Adaptation([g for g in groups if g["params"]])


@register_mode("frozen_encoder")
def _frozen_encoder(model: nn.Module, cfg, lr: float) -> Adaptation:
    enc, rest = _split_params(model)
    for p in enc:
        p.requires_grad_(False)
    for p in rest:
        p.requires_grad_(True)
    return Adaptation([{"params": rest, "lr": lr, "name": "decoder"}], frozen_modules=[model.encoder])


def _options(cfg, mode: str, known: dict) -> dict:
    """adapt.options merged over a mode's defaults; an unknown key is a one-line ConfigError."""
    opts = dict(getattr(cfg, "options", {}) or {})
    for k in opts:
        if k not in known:
            from sslkit.errors import closest

            close = closest(k, list(known))
            hint = f" (did you mean '{close}'?)" if close else f" (known: {', '.join(known) or 'none'})"
            raise ConfigError(f"adapt.options.{k}: not an option of mode '{mode}'{hint}")
    return {**known, **opts}


@register_mode("prompt")
def _prompt(model: nn.Module, cfg, lr: float) -> Adaptation:
    """PUNet prompt tuning (SPECS "Downstream prompt tuning"): only the prompt tokens of `adapt.options.classes`
    (pool classes; default every output class) in every stage and the final pool, and their content->prompt
    bias tables, train; AdamW without weight decay. The whole network stays in eval mode, so BatchNorm keeps
    its pretrained statistics and the frozen backbone is bitwise unchanged."""
    from sslkit.models.punet import PUNetSegmenter, prompt_parameters

    if not isinstance(model, PUNetSegmenter) or not model.encoder.prompted:
        raise ConfigError(f"adapt.mode: 'prompt' needs a prompted PUNet (model.name: punet), "
                          f"got {type(model).__name__}")
    opts = _options(cfg, "prompt", {"classes": None})
    classes = model.classes if opts["classes"] is None else [int(c) for c in opts["classes"]]
    bad = [c for c in classes if not 0 <= c < model.encoder.num_classes]
    if bad or not classes:
        raise ConfigError(f"adapt.options.classes: {classes} must be non-empty classes of the prompt pool "
                          f"0..{model.encoder.num_classes - 1}")
    model.requires_grad_(False)
    params = [p for c in classes for p in prompt_parameters(model, c)]
    for p in params:
        p.requires_grad_(True)
    return Adaptation([{"params": params, "lr": lr, "weight_decay": 0.0, "name": "prompts"}],
                      frozen_modules=[model])


def _sam_segmenter(model: nn.Module, mode: str):
    from sslkit.models.sam_heads import SAMSegmenter

    if not isinstance(model, SAMSegmenter):
        raise ConfigError(f"adapt.mode: '{mode}' needs a SAM model (model.name: sam), got {type(model).__name__}")
    return model


ADAPTER_OPTIONS = {"ratio": 0.25, "mlp_scale": 0.5, "depth_branch": None}


def _add_msa_adapters(model: nn.Module, cfg) -> None:
    """Medical SAM Adapter modules in every block (unless the model was built with them); depth branch by
    default for 3D (volume) models."""
    from sslkit.models.sam import add_adapters

    model = _sam_segmenter(model, "adapter")
    opts = _options(cfg, "adapter", ADAPTER_OPTIONS)
    if model.encoder.blocks[0].space_adapter is None:
        depth = model.spatial_dims == 3 if opts["depth_branch"] is None else bool(opts["depth_branch"])
        add_adapters(model.encoder, float(opts["mlp_scale"]), float(opts["ratio"]), depth)
    model.encoder.added_keys = {n for n, _ in model.encoder.named_parameters() if "adapter" in n}


@register_mode("adapter", prepare=_add_msa_adapters)
def _adapter(model: nn.Module, cfg, lr: float) -> Adaptation:
    """Medical SAM Adapter: in the encoder only the adapters train; the head trains fully."""
    from sslkit.models.sam import freeze_all_but_adapters

    model = _sam_segmenter(model, "adapter")
    freeze_all_but_adapters(model.encoder)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    head = [p for p in model.parameters() if id(p) not in enc_ids]
    for p in head:
        p.requires_grad_(True)
    adapters = [p for p in model.encoder.parameters() if p.requires_grad]
    return Adaptation([{"params": head, "lr": lr, "name": "head"}, {"params": adapters, "lr": lr, "name": "adapters"}])


# ------------------------------------------------------------------------------------ encoder weights


def resolve_encoder_path(path: str | Path) -> Path:
    """A `.safetensors` file, a torch state-dict file, or a pretraining run dir holding `encoder.safetensors`."""
    p = Path(path)
    if p.is_dir():
        p = p / "encoder.safetensors"
    if not p.is_file():
        raise ConfigError(f"{p}: encoder weights not found (give a .safetensors file or a pretraining run dir)")
    return p


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Safe loading only: safetensors, or torch.load(weights_only=True) of a plain state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not weights-only
        raise ConfigError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    if isinstance(sd, dict) and isinstance(sd.get("encoder"), dict):
        sd = sd["encoder"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    return sd


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_encoder_weights(model: nn.Module, path: str | Path) -> Path:
    """Load encoder weights STRICTLY by name into `model.encoder`; any mismatch -> ConfigError (one line)."""
    p = resolve_encoder_path(path)
    sd = read_state_dict(p)
    own = model.encoder.state_dict()
    added = getattr(model.encoder, "added_keys", set())  # modules an adaptation mode added (e.g. adapters)
    missing = sorted(set(own) - set(sd) - set(added))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(sd) & set(own))
              if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {_few(shapes, 3)}")
        raise ConfigError(f"{p}: encoder weights do not match model.encoder ({type(model.encoder).__name__}); "
                          + "; ".join(parts))
    model.encoder.load_state_dict(sd, strict=not added)
    return p


# ------------------------------------------------------------------------------ models and checkpoints


def build_model(cfg) -> nn.Module:
    """The segmenter of a DownstreamConfig: in/out channels from data, options from model.args."""
    from sslkit.models.registry import build_segmenter

    in_channels = cfg.data.in_channels * (cfg.data.slice_channels if cfg.data.slices else 1)
    model = build_segmenter(cfg.model.name, spatial_dims=cfg.model.spatial_dims, in_channels=in_channels,
                            out_channels=cfg.data.num_classes, **cfg.model.args)
    if cfg.adapt.mode in _PREPARE:
        _PREPARE[cfg.adapt.mode](model, cfg.adapt)
    return model


def read_checkpoint(path: str | Path) -> dict:
    """A finetune checkpoint (`best.pt` / `last.pt`), loaded with torch.load(weights_only=True)."""
    p = Path(path)
    if p.is_dir():  # a run dir
        p = p / "checkpoints" / "best.pt"
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{p}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ConfigError(f"{p}: not an sslkit finetune checkpoint (needs 'model' and 'config')")
    ck["path"] = str(p)
    return ck


def model_from_checkpoint(path: str | Path):
    """(model with the checkpoint's weights, DownstreamConfig, checkpoint dict)."""
    from sslkit.downstream.config import downstream_config_from_dict

    ck = read_checkpoint(path)
    cfg = downstream_config_from_dict(ck["config"])
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.args.pop("checkpoint", None)  # the SAM weights file is not needed: the checkpoint has them
    model = build_model(build_cfg)
    model.load_state_dict(ck["model"], strict=True)
    return model, cfg, ck
