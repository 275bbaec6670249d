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
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from sslkit.errors import ConfigError


@dataclass
class Adaptation:
    param_groups: list[dict]
    frozen_modules: list[nn.Module] = field(default_factory=list)
    encoder: nn.Module | None = None   # frozen for the first `frozen_steps` optimizer steps (transfer schedule)
    frozen_steps: int = 0

    def train_mode(self, model: nn.Module, step: int | None = None) -> None:
        """model.train(), then frozen modules back to eval (no dropout / norm statistics updates)."""
        model.train()
        for m in self.frozen_modules:
            m.eval()
        if self.encoder is not None and step is not None and step < self.frozen_steps:
            self.encoder.eval()

    def set_step(self, model: nn.Module, step: int) -> None:
        """Before optimizer step `step` (0-based): the encoder trains from step `frozen_steps` on."""
        if self.encoder is None or not self.frozen_steps:
            return
        frozen = step < self.frozen_steps
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train_mode(model, step)

    def lr_factors(self, groups: list[dict]) -> list:
        """Per optimizer group, the transfer schedule's lr multiplier of step s (0-based), on top of optim.schedule:
        with N = frozen_steps, the encoder's groups are 0 for s < N, the others warm up linearly over [0, N); then
        every group warms up linearly again over [N, 2N) (adapt.warmup_frozen_steps, nnssl's two-stage warm-up)."""
        n = self.frozen_steps
        if not n:
            return [lambda s: 1.0 for _ in groups]
        return [functools.partial(_two_stage_warmup, n=n, encoder=g.get("name", "").startswith("encoder"))
                for g in groups]


def _two_stage_warmup(s: int, n: int, encoder: bool) -> float:
    if s < n:
        return 0.0 if encoder else (s + 1) / n
    return min(1.0, (s - n + 1) / n)


_MODES: dict[str, Callable] = {}
_PREPARE: dict[str, Callable] = {}  # mode -> fn(model, cfg) changing the architecture (e.g. adding adapters)


def register_mode(name: str, prepare: Callable | None = None):
    """Register an adaptation mode. `prepare(model, downstream_cfg)`, if given, runs inside build_model, so training,
    evaluation and prediction build the same architecture: it changes the model in place (new encoder modules'
    keys go in `model.encoder.added_keys`, which encoder-weight loading lets be missing) or returns another."""
    def wrap(fn):
        _MODES[name] = fn
        if prepare is not None:
            _PREPARE[name] = prepare
        return fn

    return wrap


def mode_names() -> list[str]:
    return sorted(_MODES)


def adapt(model: nn.Module, adapt_cfg, lr: float, layer_decay: float = 1.0) -> Adaptation:
    """The mode's Adaptation; in mode full with optim.layer_decay < 1 the encoder's group is one group per encoder
    depth (sslkit.models.base.layer_ids), lr x decay^(L + 1 - depth)."""
    if adapt_cfg.mode not in _MODES:
        raise ConfigError(f"adapt.mode: '{adapt_cfg.mode}' is not one of {', '.join(mode_names())}")
    out = _MODES[adapt_cfg.mode](model, adapt_cfg, lr)
    if adapt_cfg.mode == "full":
        if layer_decay != 1.0:
            out.param_groups = _layer_decayed(model.encoder, out.param_groups, layer_decay)
        out.encoder, out.frozen_steps = model.encoder, adapt_cfg.warmup_frozen_steps
    return out


def _layer_decayed(encoder: nn.Module, groups: list[dict], decay: float) -> list[dict]:
    """The "encoder" group split by depth: depth d of L gets lr x decay^(L + 1 - d) (MAE / BEiT fine-tuning: the
    decoder and head count as depth L + 1)."""
    from sslkit.models.base import layer_ids

    ids, last = layer_ids(encoder)
    by_id = {id(p): ids[n] for n, p in encoder.named_parameters()}
    out = []
    for g in groups:
        if g.get("name") != "encoder":
            out.append(g)
            continue
        for depth in range(last + 1):
            params = [p for p in g["params"] if by_id.get(id(p)) == depth]
            if params:
                out.append({**g, "params": params, "lr": g["lr"] * decay ** (last + 1 - depth),
                            "name": f"encoder.{depth}"})
    return out


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


def _linear_head_model(model: nn.Module, cfg) -> nn.Module:
    from sslkit.models.linear_head import LinearHeadSegmenter

    _options(cfg.adapt, "linear_head", {})
    return LinearHeadSegmenter(model.encoder, cfg.data.num_classes)


@register_mode("linear_head", prepare=_linear_head_model)
def _linear_head(model: nn.Module, cfg, lr: float) -> Adaptation:
    """The frozen encoder with a linear head on every stage's features in place of the decoder
    (sslkit.models.linear_head): what the encoder's features alone give the task."""
    return _frozen_encoder(model, cfg, lr)


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
    opts = _options(cfg.adapt, "adapter", ADAPTER_OPTIONS)
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


def encoder_plan(path: str | Path) -> tuple[dict | None, Path]:
    """(the plan of --encoder / model.init_from, or None for weights written by another tool, the weights file)."""
    from sslkit.errors import UserError
    from sslkit.plan import plan_from_metadata, read_metadata, weights_file

    try:
        f = weights_file(path)
    except UserError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if f.suffix != ".safetensors":
        return None, f
    return plan_from_metadata(read_metadata(f), f), f


def load_encoder(model: nn.Module, path: str | Path) -> str:
    """Load encoder weights of any supported layout STRICTLY into `model.encoder` (adapter tensors a pretrained file
    cannot hold keep their values); returns the one-line description of the layout found."""
    from sslkit.models.weights import load_pretrained

    return load_pretrained(model.encoder, path)


# ------------------------------------------------------------------------------ models and checkpoints


def build_model(cfg) -> nn.Module:
    """The segmenter of a DownstreamConfig: in/out channels from model / data, options from model.args."""
    from sslkit.models.registry import build_segmenter

    in_channels = cfg.model.in_channels * (cfg.data.slice_channels if cfg.data.slices else 1)
    model = build_segmenter(cfg.model.name, spatial_dims=cfg.model.spatial_dims, in_channels=in_channels,
                            out_channels=cfg.data.num_classes,
                            activation_checkpointing=cfg.model.activation_checkpointing, **cfg.model.args)
    if cfg.adapt.mode in _PREPARE:
        model = _PREPARE[cfg.adapt.mode](model, cfg) or model
    return model


def check_buildable(cfg) -> None:
    """The segmenter and its adaptation mode on empty (meta) weights: bad model or adaptation options fail in
    seconds, before any scan is preprocessed."""
    from sslkit.models.base import empty_weights
    from sslkit.monitor.trackers import check_logging_config

    check_logging_config(cfg.logging)
    if not cfg.model.name:
        raise ConfigError("model.name: not set; give --encoder with an sslkit plan, or set model.name in the recipe")
    try:
        with empty_weights():
            model = build_model(_without_checkpoint(cfg))
            adapt(model, cfg.adapt, cfg.optim.lr)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model / adapt: {str(e).splitlines()[0]}") from None


def _without_checkpoint(cfg):
    """A copy of cfg whose model does not load a weights file (SAM `checkpoint`): the fine-tuned model has them."""
    c = copy.deepcopy(cfg)
    c.model.args.pop("checkpoint", None)
    return c


MODEL_FILE = "model.safetensors"
CONFIG_KEY = "sslkit.config"


def save_model(model: nn.Module, cfg, plan: dict, path: Path) -> None:
    """The fine-tuned model's weights with its plan and resolved config in the safetensors metadata."""
    import json

    from sslkit.plan import write_weights

    write_weights(path, model.state_dict(), plan, {CONFIG_KEY: json.dumps(cfg.to_dict())})


def model_file(path: str | Path) -> Path:
    """The fine-tuned model a path names: a .safetensors file, a checkpoint folder, or a run directory (its best
    model, `model.safetensors`)."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise ConfigError(f"{p}: no fine-tuned model here (give a fine-tuning run directory, a checkpoint folder or "
                          f"its {MODEL_FILE})")
    return p


def load_finetuned(path: str | Path):
    """(model with the fine-tuned weights, its DownstreamConfig, its plan, the file)."""
    import json

    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.plan import read_metadata, read_weights

    p = model_file(path)
    meta = read_metadata(p)
    if CONFIG_KEY not in meta:
        kind = "a pretraining encoder" if p.name in ("encoder.safetensors", "student.safetensors") else "not"
        raise ConfigError(f"{p}: {kind} an sslkit fine-tuned model (no {CONFIG_KEY} in its metadata)"
                          + ("; fine-tune it first with `sslkit finetune --encoder`" if kind != "not" else ""))
    cfg = downstream_config_from_dict(json.loads(meta[CONFIG_KEY]))
    sd, plan = read_weights(p)
    model = build_model(_without_checkpoint(cfg))
    model.load_state_dict(sd, strict=True)
    return model, cfg, plan, p
