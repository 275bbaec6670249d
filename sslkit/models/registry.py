"""Name -> builder registries for encoders and segmentation models."""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from sslkit.errors import ConfigError, closest

_ENCODERS: dict[str, Callable] = {}
_SEGMENTERS: dict[str, Callable] = {}
_FROM_ENCODER: dict[str, Callable] = {}  # encoder name -> fn(name, args) -> (segmenter name, segmenter args)


def register_encoder(name: str):
    def wrap(fn):
        _ENCODERS[name] = fn
        return fn

    return wrap


def register_segmenter(name: str):
    def wrap(fn):
        _SEGMENTERS[name] = fn
        return fn

    return wrap


def register_segmenter_for(*encoder_names: str):
    """Declare how a segmentation model wraps encoders whose names differ from its own (e.g. "sam" wraps
    "sam_vit_b"): fn(encoder name, encoder args) -> (segmenter name, segmenter args)."""
    def wrap(fn):
        for n in encoder_names:
            _FROM_ENCODER[n] = fn
        return fn

    return wrap


def segmenter_for_encoder(name: str, args: dict) -> tuple[str, dict]:
    """(segmenter name, its args) that holds the encoder `name` built with `args` (what a plan records).
    A segmenter of the same name takes the encoder args it knows; others declare register_segmenter_for."""
    _load_all()
    if name in _FROM_ENCODER:
        return _FROM_ENCODER[name](name, dict(args))
    if name in _SEGMENTERS:
        params = inspect.signature(_SEGMENTERS[name]).parameters
        return name, {k: v for k, v in args.items() if k in params}
    raise ConfigError(f"model.name: no segmentation model holds a '{name}' encoder; set model.name in the recipe "
                      f"(known: {', '.join(sorted(_SEGMENTERS))})")


def _load_all() -> None:
    """Import every module of sslkit.models once (on the first lookup, so that `import sslkit` stays light): each
    registers its builders as it is imported, so a new architecture needs no list kept here."""
    import pkgutil
    import sys

    package = sys.modules[__package__]  # sslkit.models, imported before any of its modules
    for info in pkgutil.iter_modules(package.__path__, __package__ + "."):
        importlib.import_module(info.name)


def _build(table: dict, kind: str, name: str, key: str, **kwargs):
    _load_all()
    if name not in table:
        close = closest(name, list(table))
        hint = f" (did you mean '{close}'?)" if close else f" (known: {', '.join(sorted(table))})"
        raise ConfigError(f"{key}: unknown {kind} '{name}'{hint}")
    fn = table[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for k in kwargs:
            if k not in params:
                close = closest(k, list(params))
                hint = f" (did you mean '{close}'?)" if close else ""
                raise ConfigError(f"model.{k}: not an option of {kind} '{name}'{hint}")
    return fn(**kwargs)


def build_encoder(name: str, activation_checkpointing: bool = False, **kwargs):
    """Build a registered Encoder, e.g. build_encoder('swin_unetr', spatial_dims=3, in_channels=1).
    `activation_checkpointing` (model.activation_checkpointing): recompute each block's activations in the
    backward pass (every family supports it; see sslkit.models.base.set_activation_checkpointing)."""
    return _checkpointed(_build(_ENCODERS, "encoder", name, "model.name", **kwargs), activation_checkpointing)


def build_segmenter(name: str, activation_checkpointing: bool = False, **kwargs):
    """Build a registered segmentation model (encoder + decoder); its `.encoder` is an Encoder.
    `activation_checkpointing` as for build_encoder (the decoder's blocks too, where it has any)."""
    return _checkpointed(_build(_SEGMENTERS, "segmentation model", name, "model.name", **kwargs),
                         activation_checkpointing)


def _checkpointed(model, enabled: bool):
    if enabled:
        from sslkit.models.base import set_activation_checkpointing

        try:
            set_activation_checkpointing(model, True)
        except ValueError as e:
            raise ConfigError(f"model.activation_checkpointing: {e}") from None
    return model


def encoder_names() -> list[str]:
    _load_all()
    return sorted(_ENCODERS)
