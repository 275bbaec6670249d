"""Typed schema for downstream (segmentation) recipes: `downstream/*.yaml`.

Separate from the pretraining schema (`sslkit.config.Config`) but parsed by the same helpers, so unknown keys,
wrong types and `--set a.b=c` overrides behave the same way (one-line ConfigError with a did-you-mean).

Sections: data, model, adapt, train, optim, loss, logging. train / optim / model / logging and the preprocessing
keys of data (modality, spacing, intensity_range, mri_norm, mri_percentiles, crop_foreground, roi) are the
pretraining schema's own classes, so a key means the same in both. See `downstream/btcv.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sslkit.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    TrainConfig,
    _build,
    apply_override,
    check_choice,
    check_shared,
    read_recipe,
)
from sslkit.errors import ConfigError

LAYOUTS = ("msd", "btcv", "acdc", "datalist", "mni_gm_wm", "demo_ct_head")
# the modes sslkit.downstream.adapt registers, named here so that config does not import it (adapt imports config);
# tests/test_transfer.py checks that the two agree
ADAPT_MODES = ("full", "frozen_encoder", "linear_head", "adapter", "prompt")


@dataclass
class DownstreamDataConfig(PreprocessConfig):
    layout: str = "datalist"           # msd | btcv | acdc | datalist | mni_gm_wm (the demo corpus's MNI152 T1, left /
                                       # right hemisphere) | demo_ct_head (the demo corpus's head CT, left / right)
    demo_source: str = ""              # "mni_gm_wm": first write the MNI152 GM/WM demo under root in this layout
    root: str = ""                     # MSD task folder / BTCV folder (holding RawData/) / datalist JSON / demo dir
    task: str = ""                     # informative name, e.g. Task09_Spleen
    num_classes: int = 2               # including background
    label_names: list[str] = field(default_factory=list)  # foreground class names (optional, for reports)
    nsd_tolerance_mm: list[float] = field(default_factory=lambda: [2.0])  # normalised surface Dice tolerance (mm):
                                       # one value for every class, or one per foreground class
    num_labelled: int = 0              # 0: all training cases; n: the first n of a seeded order of the training
                                       # cases (nested: the 3-case subset holds the 1-case subset)
    split_seed: int = 0
    val_fraction: float = 0.2          # used when the layout has no fixed validation split
    btcv_val_count: int = 6            # BTCV: the last n cases by id are validation (common 24/6 split)
    slices: bool = False               # 2D model on 3D scans: train on axial (last-axis) slices of the volumes,
                                       # predict slice by slice and stack back for 3D metrics; roi is 2D then
    slice_channels: int = 1            # slices: 3 repeats each slice to 3 channels (SAM's RGB input)
    samples_per_volume: int = 4
    pos: float = 1.0                   # RandCropByPosNegLabeld ratio pos:neg
    neg: float = 1.0
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    scale_intensity_prob: float = 0.0  # RandScaleIntensityd factor 0.1
    shift_intensity_prob: float = 0.5  # RandShiftIntensityd offset 0.1
    cache_rate: float = 1.0            # fraction of volumes kept preprocessed in memory (MONAI CacheDataset)
    roi: list[int] = field(default_factory=lambda: [96, 96, 96])


@dataclass
class AdaptConfig:
    mode: str = "full"                 # full | frozen_encoder | linear_head | adapter (SAM) | prompt (PUNet);
                                       # see sslkit.downstream.adapt
    encoder_lr_scale: float = 1.0      # full mode: encoder lr = lr * scale (0.1 by default from an encoder's plan:
                                       # sslkit.downstream.from_plan.TRANSFER_DEFAULTS)
    warmup_frozen_steps: int = 0       # full mode: N > 0 trains the decoder / head alone for N steps (encoder
                                       # frozen, their lr warming up linearly), then the whole model with a linear
                                       # lr warm-up over N more steps (nnssl's pretrained fine-tuning)
    options: dict = field(default_factory=dict)  # mode options: prompt {classes}; adapter {ratio, mlp_scale,
                                                 # depth_branch}


@dataclass
class FinetuneTrainConfig(TrainConfig):
    max_steps: int = 0                 # optimizer steps; 0: use max_epochs
    max_epochs: int = 100
    batch_size: int = 1                # volumes per step (each gives samples_per_volume crops)
    val_every: int = 100               # optimizer steps between validations (each also writes a checkpoint)
    val_cases: int = 0                 # validate during training on this many evenly spaced cases (0: all)
    sw_overlap: float = 0.5
    sw_mode: str = "constant"          # constant | gaussian
    sw_batch_size: int = 4
    grad_clip: float = 0.0             # 0 disables clipping
    ckpt_every: int = 0                # checkpoints at every validation, at the end and every ckpt_every steps


@dataclass
class LossConfig:
    name: str = "dice_ce"              # dice_ce | focal (log-softmax focal loss, PUNet's prompt segmentation)
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    gamma: float = 4.0                 # focal loss exponent
    temperature: float = 1.0           # focal: log-softmax(scores / temperature); 1 = the reference (PUNet scores
                                       # lie in [0, 1], so small values sharpen them)


def _downstream_model() -> ModelConfig:
    return ModelConfig(name="")        # "": the encoder's plan decides (sslkit finetune --encoder)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    schedule: str = "constant"
    layer_decay: float = 1.0           # full mode: layer-wise lr decay by encoder depth (MAE / BEiT fine-tuning):
                                       # depth d of L (0 = patch embedding) trains at lr x decay^(L + 1 - d)


@dataclass
class DownstreamConfig:
    data: DownstreamDataConfig = field(default_factory=DownstreamDataConfig)
    model: ModelConfig = field(default_factory=_downstream_model)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(cfg: DownstreamConfig) -> None:
    d, t, sd = cfg.data, cfg.train, cfg.model.spatial_dims
    check_shared(t, cfg.optim, d, cfg.model, cfg.logging, scan_dims=3 if d.slices else sd)
    if t.precision == "fp16":
        raise ConfigError("train.precision: fp16 is for pretraining (DeepSpeed's loss scaling); fine-tuning takes "
                          "fp32 or bf16")
    check_choice("data.layout", d.layout, LAYOUTS)
    if d.demo_source not in ("", "mni_gm_wm") or (d.demo_source and d.layout != "acdc"):
        raise ConfigError(f"data.demo_source: '{d.demo_source}' must be empty or 'mni_gm_wm' with layout acdc")
    check_choice("data.slice_channels", d.slice_channels, (1, 3))
    if d.slices and sd != 2:
        raise ConfigError("data.slices: needs a 2D model (model.spatial_dims: 2)")
    if d.num_classes < 2:
        raise ConfigError(f"data.num_classes: needs at least 2 (background + 1), got {d.num_classes}")
    if len(d.nsd_tolerance_mm) not in (1, d.num_classes - 1) or min(d.nsd_tolerance_mm) <= 0:
        raise ConfigError(f"data.nsd_tolerance_mm: needs one positive value or one per foreground class "
                          f"({d.num_classes - 1}), got {d.nsd_tolerance_mm}")
    if d.num_labelled < 0:
        raise ConfigError(f"data.num_labelled: must be >= 0, got {d.num_labelled}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if d.pos < 0 or d.neg < 0 or d.pos + d.neg == 0:
        raise ConfigError(f"data.pos/data.neg: need non-negative values, not both 0 (got {d.pos}, {d.neg})")
    check_choice("train.sw_mode", t.sw_mode, ("constant", "gaussian"))
    if not 0.0 <= t.sw_overlap < 1.0:
        raise ConfigError(f"train.sw_overlap: must be in [0, 1), got {t.sw_overlap}")
    if t.max_steps == 0 and t.max_epochs < 1:
        raise ConfigError("train.max_steps / train.max_epochs: set max_steps >= 1 or max_epochs >= 1")
    if t.batch_size < 1 or t.val_every < 1:
        raise ConfigError("train.batch_size and train.val_every must be at least 1")
    check_choice("loss.name", cfg.loss.name, ("dice_ce", "focal"))
    check_choice("adapt.mode", cfg.adapt.mode, ADAPT_MODES)
    _check_transfer(cfg)
    for k in ("in_channels", "out_channels", "spatial_dims"):
        if k in cfg.model.args:
            raise ConfigError(f"model.args.{k}: set by model.in_channels / data.num_classes / model.spatial_dims")


def _check_transfer(cfg: DownstreamConfig) -> None:
    """The transfer-schedule keys: ranges, and the mode / schedule they need."""
    a, o, t = cfg.adapt, cfg.optim, cfg.train
    if not 0.0 < o.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay: must be in (0, 1], got {o.layer_decay}")
    if a.encoder_lr_scale < 0:
        raise ConfigError(f"adapt.encoder_lr_scale: must be >= 0, got {a.encoder_lr_scale}")
    if a.warmup_frozen_steps < 0:
        raise ConfigError(f"adapt.warmup_frozen_steps: must be >= 0, got {a.warmup_frozen_steps}")
    for key, on in (("optim.layer_decay", o.layer_decay != 1.0), ("adapt.warmup_frozen_steps", a.warmup_frozen_steps)):
        if on and a.mode != "full":
            raise ConfigError(f"{key}: applies to adapt.mode full (the encoder trains), not '{a.mode}'")
    if a.warmup_frozen_steps and o.schedule == "one_cycle":
        raise ConfigError("adapt.warmup_frozen_steps: needs optim.schedule cosine or constant (one_cycle has its own "
                          "warm-up)")
    if a.warmup_frozen_steps and t.max_steps and 2 * a.warmup_frozen_steps > t.max_steps:
        raise ConfigError(f"adapt.warmup_frozen_steps: {a.warmup_frozen_steps} frozen + {a.warmup_frozen_steps} "
                          f"warm-up steps do not fit in train.max_steps {t.max_steps}")


def downstream_config_from_dict(raw: dict) -> DownstreamConfig:
    cfg = _build(DownstreamConfig, dict(raw or {}), "")
    _check(cfg)
    return cfg


def writes_under_root(data: dict) -> bool:
    """True for the demo layouts that write files under data.root (the hemispheres, the ACDC-shaped demo)."""
    return data.get("layout") in ("mni_gm_wm", "demo_ct_head") or bool(data.get("demo_source"))


def _anchor_root(raw: dict, folder: Path) -> None:
    """A relative data.root of a layout that writes under it, taken from `folder`."""
    data = raw.get("data")
    if isinstance(data, dict) and writes_under_root(data) and isinstance(data.get("root"), str) and data["root"]:
        root = Path(data["root"]).expanduser()
        if not root.is_absolute():
            data["root"] = str((folder / root).resolve())


def read_downstream_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The raw mapping of a downstream recipe with `--set` overrides applied, not yet checked. A relative data.root
    of a demo layout that writes files under it is the recipe file's folder's (the same folder from wherever the
    command runs); one given with --set is the current folder's, where it was typed."""
    raw = read_recipe(path)
    if path is not None:
        _anchor_root(raw, Path(path).resolve().parent)
    for o in overrides:
        apply_override(raw, o)
    _anchor_root(raw, Path.cwd())
    return raw


def load_downstream_config(path: str | Path | None, overrides: list[str] = ()) -> DownstreamConfig:
    """Read a downstream YAML recipe (or defaults with path=None), apply `--set` overrides, validate."""
    return downstream_config_from_dict(read_downstream_recipe(path, overrides))
