"""Typed config schema over YAML recipes, `--set a.b=c` overrides, and did-you-mean on unknown keys.

A recipe is a YAML mapping with the sections below. Every key is checked: an unknown key or a value of the
wrong type raises ConfigError naming the key (and the closest valid key), which the CLI prints as one line.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sslkit.errors import ConfigError, closest


@dataclass
class TrainConfig:
    micro_batch_size: int = 2          # crops per process per micro-batch
    grad_accum_steps: int = 1          # micro-batches per optimizer step
    max_steps: int = 100               # optimizer steps
    seed: int = 0
    precision: str = "fp32"            # fp32 | bf16 | fp16
    zero_stage: int = 0                # DeepSpeed ZeRO stage 0..3
    grad_clip: float = 1.0             # 0 disables clipping
    ckpt_every: int = 50               # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 3                 # checkpoints kept
    log_every: int = 1                 # optimizer steps between progress-bar updates
    num_workers: int = 0               # DataLoader workers per process
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch CPU threads (0: torch default)


@dataclass
class OptimConfig:
    name: str = "adamw"                # adamw | adam | sgd (momentum = betas[0])
    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0              # linear warm-up, in optimizer steps
    min_lr_ratio: float = 0.0          # cosine floor as a fraction of lr


@dataclass
class DataConfig:
    datalist: str = ""                 # decathlon-style JSON, or a folder of scans
    datalist_key: str = "training"
    modality: str = "ct"               # ct | mri | 2d
    spatial_dims: int = 3
    roi: list[int] = field(default_factory=lambda: [64, 64, 64])
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])
    intensity_range: list[float] = field(default_factory=lambda: [-175.0, 250.0])  # CT window (HU)
    crops_per_volume: int = 2          # random crops drawn from one cached volume per epoch
    cache_dir: str = ""                # preprocessed volumes; default <run_dir>/../.cache/sslkit
    view_flip_prob: float = 0.5
    view_intensity_shift: float = 0.1
    view_intensity_scale: float = 0.1
    view_noise_std: float = 0.05
    view_shift: float = 0.0            # second view's crop moved by up to this fraction of roi per axis
    # with_labels: entries must carry "label"; label maps are resampled on the image grid (nearest), cached next to
    # the image and cut with the image crop's window; batches gain "label" (B, 1, *roi) int64, 0 where padded
    with_labels: bool = False


@dataclass
class ModelConfig:
    name: str = "swin_unetr"
    spatial_dims: int = 3
    in_channels: int = 1
    args: dict = field(default_factory=dict)  # builder options, checked against the builder's signature


@dataclass
class AlarmConfig:
    metric: str = "embedding_std"
    below: float | None = None
    above: float | None = None
    patience: int = 5                  # consecutive steps beyond the threshold before the alarm fires
    action: str = "warn"               # warn | stop | stop_keep_healthy


@dataclass
class MonitorConfig:
    enabled: bool = True
    bank_size: int = 256               # rolling bank of embeddings for rank / cosine statistics
    probe_every: int = 0               # optimizer steps between probe-set evaluations (0: off)
    probe_crops: int = 8
    alarms: list[AlarmConfig] = field(default_factory=list)


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: list[dict] = field(default_factory=lambda: [{"name": "byol", "weight": 1.0}])
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 4e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = closest(str(k), names)
            where = f"{prefix}." if prefix else ""
            hint = f"; did you mean '{where}{close}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _parse_scalar(text: str):
    """`--set` values are YAML scalars: 4e-4, true, [64, 64, 64], bf16."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set value {text!r} is not valid YAML: {e}") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply 'a.b.c=value' to the raw mapping; list items by index ('objectives.0.weight=2')."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"--set {path}: '{p}' is not an index of {'.'.join(parts[:i]) or 'config'}")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {path}: '{'.'.join(parts[:i + 1])}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {path}: '{last}' is not an index")
        node[int(last)] = _parse_scalar(text)
    else:
        node[last] = _parse_scalar(text)


def _validate_objectives(specs: list) -> list[dict]:
    out = []
    for i, s in enumerate(specs):
        if isinstance(s, str):
            s = {"name": s}
        if not isinstance(s, dict) or "name" not in s:
            raise ConfigError(f"objectives[{i}]: expected a mapping with a 'name'")
        w = s.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"objectives[{i}].weight: expected a number, got {w!r}")
        out.append({**s, "weight": float(w)})
    if not out:
        raise ConfigError("objectives: at least one objective is needed")
    return out


def _check_values(cfg: Config) -> None:
    t = cfg.train
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: '{t.precision}' is not one of fp32, bf16, fp16")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: {t.zero_stage} is not one of 0, 1, 2, 3")
    for name in ("micro_batch_size", "grad_accum_steps", "max_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be at least 1, got {getattr(t, name)}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: '{t.device}' is not one of auto, cpu, cuda")
    if cfg.data.spatial_dims not in (2, 3) or len(cfg.data.roi) != cfg.data.spatial_dims:
        raise ConfigError(f"data.roi: needs {cfg.data.spatial_dims} sizes for data.spatial_dims="
                          f"{cfg.data.spatial_dims}, got {cfg.data.roi}")
    if cfg.model.spatial_dims != cfg.data.spatial_dims:
        raise ConfigError(f"model.spatial_dims: {cfg.model.spatial_dims} differs from data.spatial_dims "
                          f"{cfg.data.spatial_dims}")
    if cfg.data.modality not in ("ct", "mri", "2d"):
        raise ConfigError(f"data.modality: '{cfg.data.modality}' is not one of ct, mri, 2d")
    for i, o in enumerate(cfg.objectives):
        if o["name"] == "prompt_segmentation" and o.get("label_key", "label") == "label" and not cfg.data.with_labels:
            raise ConfigError(f"objectives[{i}]: prompt_segmentation needs labelled crops; set data.with_labels: true "
                              f"(and a datalist whose entries carry 'label')")
    for a in cfg.monitor.alarms:
        if a.action not in ("warn", "stop", "stop_keep_healthy"):
            raise ConfigError(f"monitor.alarms: action '{a.action}' is not one of warn, stop, stop_keep_healthy")


def config_from_dict(raw: dict) -> Config:
    raw = dict(raw or {})
    objectives = _validate_objectives(raw.pop("objectives", [{"name": "byol"}]))
    cfg = _build(Config, raw, "")
    cfg.objectives = objectives
    _check_values(cfg)
    return cfg


def read_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The raw mapping of a YAML recipe (empty for path=None) with `--set` overrides applied, not yet checked."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a recipe must be a YAML mapping")
    for o in overrides:
        apply_override(raw, o)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a pretraining recipe (or start from defaults with path=None), apply `--set` overrides, validate."""
    return config_from_dict(read_recipe(path, overrides))


def save_config(cfg, path: str | Path) -> None:
    """Write a resolved config (any schema with `to_dict`) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
