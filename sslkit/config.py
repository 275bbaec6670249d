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


# ------------------------------------------------------------------------------- sections both loops share

COMPILE_MODES = ("auto", "off", "default", "max-autotune")  # train.compile (sslkit.engine.compile)



@dataclass
class TrainConfig:
    """Keys every training loop has (pretraining and fine-tuning add their own in subclasses)."""
    max_steps: int = 100               # optimizer steps
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch CPU threads (0: torch default)
    num_workers: int = 0               # DataLoader workers per process
    worker_nice: int = 0               # niceness added to the DataLoader workers (0-19): raise it when they share
                                       # cores with the training threads (CPU runs), so the step goes first and
                                       # the workers fill its idle moments; keep 0 on cores shared with other jobs
    grad_clip: float = 1.0             # 0 disables clipping
    ckpt_every: int = 50               # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 3                 # step checkpoints kept (the newest valid and a marked healthy one always)
    nonfinite: str = "skip"            # a NaN / inf loss or gradient norm: skip that optimizer step (and the EMA
                                       # update; counted in metrics.jsonl; 20 in a row stop the run) | stop
    precision: str = "fp32"            # fp32 | bf16 (fp32 master weights and EMA teachers, losses in fp32; on CPU
                                       # and CUDA) | fp16 (pretraining on CUDA: DeepSpeed's loss scaling)
    compile: str = "auto"              # torch.compile of the encoder, the objectives' heads and the EMA teachers
                                       # (fine-tuning: the model): off | default | max-autotune | auto (CUDA:
                                       # default; CPU: off, where compiling costs more than a short run gains).
                                       # Inductor's caches persist in $TORCHINDUCTOR_CACHE_DIR (default
                                       # ~/.cache/sslkit/inductor), so a second run skips most of the compile


@dataclass
class OptimConfig:
    name: str = "adamw"                # adamw | adam | sgd (momentum = betas[0])
    lr: float = 1e-4                   # peak lr
    weight_decay: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"           # cosine (linear warm-up, then cosine to min_lr_ratio) | constant | one_cycle
    warmup_steps: int = 0              # linear warm-up, in optimizer steps (cosine)
    min_lr_ratio: float = 0.0          # cosine floor as a fraction of lr


@dataclass
class PreprocessConfig:
    """What the encoder's input looks like: the keys of the plan. Scans are read, turned to RAS, resampled to
    `spacing`, intensity-normalised by the scheme of their modality, cropped to the foreground; `roi` is the crop
    (window) the model trains on. Both loops share these keys (sslkit.data.preprocess)."""
    modality: str = "ct"               # ct | mri (a datalist entry's own "modality" overrides it)
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])  # mm per axis; [] or a value <= 0 keeps
    intensity_range: list[float] = field(default_factory=lambda: [-175.0, 250.0])  # CT window (HU) -> [0, 1]
    mri_norm: str = "percentile"       # MRI: percentile (mri_percentiles -> [0, 1], clipped) | zscore (all voxels)
                                       # | zscore_nonzero (over non-zero voxels, MSD practice)
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    crop_foreground: bool = True       # crop to the box of voxels > 0 (after the CT window / MRI percentiles)
    roi: list[int] = field(default_factory=lambda: [64, 64, 64])  # crop size in voxels


@dataclass
class ModelConfig:
    name: str = "swin_unetr"
    spatial_dims: int = 3
    in_channels: int = 1
    args: dict = field(default_factory=dict)  # builder options, checked against the builder's signature
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass (less
                                       # memory, ~1/3 more compute): every encoder family supports it
    init_from: str = ""                # encoder weights to start from (a local file, checkpoint or run directory):
                                       # sslkit's own, MONAI Swin-UNETR (SSL or model), VoCo, SAM / SAM-derived, timm
                                       # samvit; the layout is detected (sslkit.models.weights). `finetune --encoder X`
                                       # sets it


# ------------------------------------------------------------------------------------------ pretraining


@dataclass
class PretrainTrainConfig(TrainConfig):
    micro_batch_size: int = 2          # crops per process per micro-batch
    grad_accum_steps: int = 1          # micro-batches per optimizer step
    zero_stage: int = 0                # DeepSpeed ZeRO stage 0..3


@dataclass
class ViewConfig:
    """The two augmented views of a pretraining crop (sslkit.data.views). `strength: basic` is flips, intensity
    scale / shift and noise; `strong` adds MONAI's random zoom (resized crop), small rotations, gamma, contrast
    and blur, each with its probability. Every view is a pure function of (seed, epoch, index)."""
    strength: str = "basic"            # basic | strong
    shift: float = 0.0                 # second view's crop moved by up to this fraction of roi per axis
    flip_prob: float = 0.5             # per spatial axis
    intensity_scale: float = 0.1       # multiply by 1 + U(-s, s)
    intensity_shift: float = 0.1       # add U(-s, s)
    noise_std: float = 0.05            # Gaussian noise, std in intensity units ([0, 1] images)
    zoom: list[float] = field(default_factory=lambda: [0.8, 1.25])   # strong: zoom factor range (resized crop)
    zoom_prob: float = 0.5
    rotate_deg: float = 15.0           # strong: max rotation per axis, degrees
    rotate_prob: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])  # strong: gamma range
    gamma_prob: float = 0.3
    contrast: float = 0.25             # strong: contrast factor 1 + U(-c, c) around the mean
    contrast_prob: float = 0.3
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])  # strong: Gaussian blur sigma (voxels)
    blur_prob: float = 0.2


@dataclass
class DataConfig(PreprocessConfig):
    datalist: str = ""                 # decathlon-style JSON, or a folder of scans
    datalist_key: str = "training"
    crops_per_volume: int = 2          # random crops drawn from one cached volume per epoch
    cache_dir: str = ""                # the store of preprocessed volumes (`sslkit data prepare --out`); default
                                       # <run_dir>/../.cache/sslkit, prepared on first use
    store_dtype: str = "float16"       # float16 | int16 (quantised per volume) | float32 (exact)
    views: ViewConfig = field(default_factory=ViewConfig)
    # with_labels: entries must carry "label"; label maps are resampled on the image grid (nearest), cached next to
    # the image and cut with the image crop's window; batches gain "label" (B, 1, *roi) int64, 0 where padded
    with_labels: bool = False


@dataclass
class AlarmConfig:
    metric: str = "embedding_std"
    below: float | None = None
    above: float | None = None
    patience: int = 5                  # consecutive steps beyond the threshold before the alarm fires
    action: str = "warn"               # warn | stop | stop_keep_healthy


@dataclass
class TaskProbeConfig:
    """Does the encoder separate the labels of the user's task? (sslkit.monitor.task_probe)"""
    datalist: str | None = None       # decathlon JSON: "training" image + label pairs are probe-train, "validation"
                                       # probe-val (paths relative to the JSON); null: no task probe
    every: int = 0                     # optimizer steps between probes (it also runs at step 0)
    method: str = "logistic"           # logistic (multinomial logistic regression) | knn (k nearest voxels)
    crops: int = 4                     # fixed crops per probe-train / probe-val scan (or half of the one scan)
    crop_size: list[int] = field(default_factory=list)  # [] : data.roi
    grid_stride: int = 2               # features of every stage are resized to the grid roi / grid_stride
    voxels: int = 8000                 # class-balanced probe-train voxels the classifier is fitted on
    c: float = 0.001                   # logistic: inverse L2 strength (scikit-learn's C; the penalty is
                                       # ||W||^2 / (2 C) beside the sum of cross-entropies over the voxels)
    knn_k: int = 20
    label_names: list[str] = field(default_factory=list)  # foreground class names ([] : the JSON's "labels")


@dataclass
class MonitorConfig:
    enabled: bool = True
    bank_size: int = 256               # rolling bank of embeddings for rank / cosine statistics
    every: int = 1                     # optimizer steps between collapse statistics (and update_to_weight); the
                                       # embeddings of the steps between still enter the bank. Each is read from
                                       # the device on these steps only: raise it on a GPU (e.g. 10)
    probe_every: int = 0               # optimizer steps between probe-set evaluations (0: off)
    probe_crops: int = 8
    alarms: list[AlarmConfig] = field(default_factory=list)
    task_probe: TaskProbeConfig = field(default_factory=TaskProbeConfig)


@dataclass
class MlflowConfig:
    tracking_uri: str = ""             # "" : MLflow's default (./mlruns); e.g. sqlite:///mlflow.db, http://host:5000
    experiment: str = "sslkit"
    run_name: str = ""                 # "" : the run directory's name


@dataclass
class WandbConfig:
    project: str = "sslkit"
    mode: str = "offline"              # offline | online | disabled
    entity: str = ""
    dir: str = ""                      # "" : <run_dir>


@dataclass
class LoggingConfig:
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of tensorboard, mlflow, wandb
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: list[dict] = field(default_factory=lambda: [{"name": "byol", "weight": 1.0}])
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- parsing


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
        if isinstance(value, bool):  # YAML 1.1 reads `off` / `on` as booleans (train.compile: off)
            return "on" if value else "off"
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


def check_choice(key: str, value, choices) -> None:
    """ConfigError naming `key` when `value` is not one of `choices` (with the closest one)."""
    if value not in choices:
        close = closest(str(value), [str(c) for c in choices])
        hint = f"; did you mean '{close}'?" if close else ""
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}{hint}")


def check_shared(train: TrainConfig, optim: OptimConfig, data: PreprocessConfig, model: ModelConfig,
                 logging: LoggingConfig | None = None, scan_dims: int | None = None) -> None:
    """Enumerations and ranges of the sections both schemas share (checked when a recipe is read).
    `scan_dims`: spatial dimensions of the scans (3 when a 2-D model reads slices of volumes)."""
    check_choice("train.device", train.device, ("auto", "cpu", "cuda"))
    check_choice("train.nonfinite", train.nonfinite, ("skip", "stop"))
    check_choice("train.precision", train.precision, ("fp32", "bf16", "fp16"))
    check_choice("train.compile", train.compile, COMPILE_MODES)
    for name in ("max_steps", "keep_last"):
        if getattr(train, name) < (0 if name == "max_steps" else 1):
            raise ConfigError(f"train.{name}: must be at least 1, got {getattr(train, name)}")
    if train.grad_clip < 0 or train.ckpt_every < 0 or train.num_workers < 0 or train.threads < 0:
        raise ConfigError("train.grad_clip, train.ckpt_every, train.num_workers and train.threads must be >= 0")
    if not 0 <= train.worker_nice <= 19:
        raise ConfigError(f"train.worker_nice: {train.worker_nice} is not a niceness in 0..19")
    check_choice("optim.name", optim.name, ("adamw", "adam", "sgd"))
    check_choice("optim.schedule", optim.schedule, ("cosine", "constant", "one_cycle"))
    if not optim.lr > 0:
        raise ConfigError(f"optim.lr: must be positive, got {optim.lr}")
    if optim.weight_decay < 0 or optim.warmup_steps < 0 or not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError("optim.weight_decay and optim.warmup_steps must be >= 0, optim.min_lr_ratio in [0, 1]")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ConfigError(f"optim.betas: needs two values in [0, 1), got {optim.betas}")
    check_choice("model.spatial_dims", model.spatial_dims, (2, 3))
    if model.in_channels < 1:
        raise ConfigError(f"model.in_channels: must be at least 1, got {model.in_channels}")
    if len(data.roi) != model.spatial_dims or min(data.roi) < 1:
        raise ConfigError(f"data.roi: needs {model.spatial_dims} positive sizes for model.spatial_dims="
                          f"{model.spatial_dims}, got {data.roi}")
    vd = scan_dims or model.spatial_dims
    if data.spacing and len(data.spacing) != vd:
        raise ConfigError(f"data.spacing: needs {vd} values (or [] to keep the scan's; a value <= 0 keeps that "
                          f"axis), got {data.spacing}")
    check_choice("data.modality", data.modality, ("ct", "mri"))
    check_choice("data.mri_norm", data.mri_norm, ("percentile", "zscore", "zscore_nonzero"))
    if len(data.intensity_range) != 2 or data.intensity_range[0] >= data.intensity_range[1]:
        raise ConfigError(f"data.intensity_range: needs [min, max] with min < max, got {data.intensity_range}")
    lo_hi = data.mri_percentiles
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 100:
        raise ConfigError(f"data.mri_percentiles: needs [low, high] with 0 <= low < high <= 100, got {lo_hi}")
    if logging is not None:
        for b in logging.backends:
            check_choice("logging.backends", b, ("tensorboard", "mlflow", "wandb"))
        check_choice("logging.wandb.mode", logging.wandb.mode, ("offline", "online", "disabled"))


def _check_values(cfg: Config) -> None:
    t = cfg.train
    check_shared(t, cfg.optim, cfg.data, cfg.model, cfg.logging, scan_dims=3)
    if "use_checkpoint" in cfg.model.args:  # one switch for every family, not each builder's own
        raise ConfigError("model.args.use_checkpoint: set model.activation_checkpointing: true instead")
    check_choice("train.zero_stage", t.zero_stage, (0, 1, 2, 3))
    if cfg.monitor.every < 1:
        raise ConfigError(f"monitor.every: must be at least 1, got {cfg.monitor.every}")
    for name in ("micro_batch_size", "grad_accum_steps", "max_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be at least 1, got {getattr(t, name)}")
    check_choice("data.views.strength", cfg.data.views.strength, ("basic", "strong"))
    for i, a in enumerate(cfg.monitor.alarms):
        check_choice(f"monitor.alarms[{i}].action", a.action, ("warn", "stop", "stop_keep_healthy"))
    _check_task_probe(cfg.monitor.task_probe, cfg.model.spatial_dims)


def _check_task_probe(tp: TaskProbeConfig, spatial_dims: int) -> None:
    if not tp.datalist:
        return
    check_choice("monitor.task_probe.method", tp.method, ("logistic", "knn"))
    if tp.every < 1:
        raise ConfigError(f"monitor.task_probe.every: needs optimizer steps >= 1 with a datalist, got {tp.every}")
    for name in ("crops", "grid_stride", "voxels", "knn_k"):
        if getattr(tp, name) < 1:
            raise ConfigError(f"monitor.task_probe.{name}: must be at least 1, got {getattr(tp, name)}")
    if not tp.c > 0:
        raise ConfigError(f"monitor.task_probe.c: must be positive, got {tp.c}")
    if tp.crop_size and (len(tp.crop_size) != spatial_dims or min(tp.crop_size) < 1):
        raise ConfigError(f"monitor.task_probe.crop_size: needs {spatial_dims} positive sizes, got {tp.crop_size}")


def config_from_dict(raw: dict) -> Config:
    raw = dict(raw or {})
    objectives = _validate_objectives(raw.pop("objectives", [{"name": "byol"}]))
    cfg = _build(Config, raw, "")
    cfg.objectives = objectives
    _check_values(cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping holding the same key twice (YAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{loader.name}: key '{key}' appears twice (lines {seen[key]} and {line}); "
                              "keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`; ConfigError (one line) for a missing file, bad YAML or a duplicate key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loader = _UniqueKeyLoader(p.read_text(encoding="utf-8"))
        loader.name = str(p)
        try:
            raw = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping")
    return raw


def read_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The raw mapping of a YAML recipe (empty for path=None) with `--set` overrides applied, not yet checked."""
    raw: dict = read_yaml(path) if path is not None else {}
    for o in overrides:
        apply_override(raw, o)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a pretraining recipe (or start from defaults with path=None), apply `--set` overrides, validate."""
    return config_from_dict(read_recipe(path, overrides))


def save_config(cfg, path: str | Path) -> None:
    """Write a resolved config (any schema with `to_dict`) as YAML, atomically."""
    from sslkit.run import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
