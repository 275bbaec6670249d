"""Typed schema for downstream (segmentation) recipes: `downstream/*.yaml`.

Separate from the pretraining schema (`sslkit.config.Config`) but parsed by the same helpers, so unknown keys,
wrong types and `--set a.b=c` overrides behave the same way (one-line ConfigError with a did-you-mean).

Sections: data, model, adapt, train, loss. See `downstream/btcv.yaml` for a commented example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sslkit.config import _build, read_recipe, save_config
from sslkit.errors import ConfigError


@dataclass
class DownstreamDataConfig:
    layout: str = "datalist"           # msd | btcv | acdc | datalist | mni_gm_wm (demo from nilearn's bundled maps)
                                       # | demo_ct_head (the demo corpus's head CT, left / right halves)
    demo_source: str = ""              # "mni_gm_wm": first write the MNI152 GM/WM demo under root in this layout
    root: str = ""                     # MSD task folder / BTCV folder (holding RawData/) / datalist JSON / demo dir
    task: str = ""                     # informative name, e.g. Task09_Spleen
    num_classes: int = 2               # including background
    in_channels: int = 1
    label_names: list[str] = field(default_factory=list)  # foreground class names (optional, for reports)
    num_labelled: int = 0              # 0: all training cases; n: a seeded subset of n training cases
    split_seed: int = 0
    val_fraction: float = 0.2          # used when the layout has no fixed validation split
    btcv_val_count: int = 6            # BTCV: the last n cases by id are validation (common 24/6 split)
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])  # target voxel size (mm); [] keeps
    modality: str = "ct"               # ct: clip intensity_range -> [0, 1]; mri: channel-wise z-score
    mri_norm: str = "nonzero"          # mri z-score over nonzero voxels (MSD practice) | volume (all voxels, AutoSAM)
    slices: bool = False               # 2D model on 3D scans: train on axial (last-axis) slices of the volumes,
                                       # predict slice by slice and stack back for 3D metrics; roi is 2D then
    slice_channels: int = 1            # slices: 3 repeats each slice to 3 channels (SAM's RGB input)
    intensity_range: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    crop_foreground: bool = True
    roi: list[int] = field(default_factory=lambda: [96, 96, 96])
    samples_per_volume: int = 4
    pos: float = 1.0                   # RandCropByPosNegLabeld ratio pos:neg
    neg: float = 1.0
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    scale_intensity_prob: float = 0.0  # RandScaleIntensityd factor 0.1
    shift_intensity_prob: float = 0.5  # RandShiftIntensityd offset 0.1
    cache_rate: float = 1.0            # fraction of volumes kept preprocessed in memory (MONAI CacheDataset)


@dataclass
class DownstreamModelConfig:
    name: str = "swin_unetr"           # a registered segmenter: swin_unetr | qt_unet
    spatial_dims: int = 3
    args: dict = field(default_factory=dict)  # builder options (feature_size, depths, ...); in/out channels come
                                               # from data.in_channels / data.num_classes


@dataclass
class AdaptConfig:
    mode: str = "full"                 # full | frozen_encoder | adapter (SAM) | prompt (PUNet); registry in
                                       # sslkit.downstream.adapt
    encoder_lr_scale: float = 1.0      # full mode: encoder lr = lr * scale
    options: dict = field(default_factory=dict)  # mode options: prompt {classes}; adapter {ratio, mlp_scale,
                                                 # depth_branch}


@dataclass
class DownstreamTrainConfig:
    max_steps: int = 0                 # optimizer steps; 0: use max_epochs
    max_epochs: int = 100
    batch_size: int = 1                # volumes per step (each gives samples_per_volume crops)
    lr: float = 1e-4                   # peak lr with lr_schedule one_cycle
    weight_decay: float = 1e-5
    optimizer: str = "adamw"           # adamw | adam
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AutoSAM: [0.5, 0.999]
    lr_schedule: str = "constant"      # constant | one_cycle (torch OneCycleLR over the run; PUNet prompt tuning)
    val_every: int = 100               # optimizer steps between validations (and checkpoints)
    val_cases: int = 0                 # validate during training on this many evenly spaced cases (0: all)
    seed: int = 0
    sw_overlap: float = 0.5
    sw_mode: str = "constant"          # constant | gaussian
    sw_batch_size: int = 4
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch CPU threads (0: torch default)
    num_workers: int = 0
    grad_clip: float = 0.0             # 0 disables clipping


@dataclass
class LossConfig:
    name: str = "dice_ce"              # dice_ce | focal (log-softmax focal loss, PUNet's prompt segmentation)
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    gamma: float = 4.0                 # focal loss exponent
    temperature: float = 1.0           # focal: log-softmax(scores / temperature); 1 = the reference (PUNet scores
                                       # lie in [0, 1], so small values sharpen them)


@dataclass
class DownstreamConfig:
    data: DownstreamDataConfig = field(default_factory=DownstreamDataConfig)
    model: DownstreamModelConfig = field(default_factory=DownstreamModelConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: DownstreamTrainConfig = field(default_factory=DownstreamTrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(cfg: DownstreamConfig) -> None:
    d, t = cfg.data, cfg.train
    layouts = ("msd", "btcv", "acdc", "datalist", "mni_gm_wm", "demo_ct_head")
    if d.layout not in layouts:
        raise ConfigError(f"data.layout: '{d.layout}' is not one of {', '.join(layouts)}")
    if d.demo_source not in ("", "mni_gm_wm") or (d.demo_source and d.layout != "acdc"):
        raise ConfigError(f"data.demo_source: '{d.demo_source}' must be empty or 'mni_gm_wm' with layout acdc")
    if d.mri_norm not in ("nonzero", "volume"):
        raise ConfigError(f"data.mri_norm: '{d.mri_norm}' is not one of nonzero, volume")
    if d.slice_channels not in (1, 3):
        raise ConfigError(f"data.slice_channels: {d.slice_channels} is not 1 or 3")
    if d.slices and cfg.model.spatial_dims != 2:
        raise ConfigError("data.slices: needs a 2D model (model.spatial_dims: 2)")
    if d.modality not in ("ct", "mri"):
        raise ConfigError(f"data.modality: '{d.modality}' is not one of ct, mri")
    if d.num_classes < 2:
        raise ConfigError(f"data.num_classes: needs at least 2 (background + 1), got {d.num_classes}")
    sd = cfg.model.spatial_dims
    if sd not in (2, 3):
        raise ConfigError(f"model.spatial_dims: {sd} is not 2 or 3")
    if len(d.roi) != sd:
        raise ConfigError(f"data.roi: needs {sd} sizes, got {d.roi}")
    vd = 3 if d.slices else sd  # dimensions of the scans themselves
    if d.spacing and len(d.spacing) != vd:
        raise ConfigError(f"data.spacing: needs {vd} values (or [] to keep the scan's; a value <= 0 keeps that "
                          f"axis), got {d.spacing}")
    if d.modality == "ct" and len(d.intensity_range) != 2:
        raise ConfigError(f"data.intensity_range: needs [min, max], got {d.intensity_range}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if d.pos < 0 or d.neg < 0 or d.pos + d.neg == 0:
        raise ConfigError(f"data.pos/data.neg: need non-negative values, not both 0 (got {d.pos}, {d.neg})")
    if t.sw_mode not in ("constant", "gaussian"):
        raise ConfigError(f"train.sw_mode: '{t.sw_mode}' is not one of constant, gaussian")
    if not 0.0 <= t.sw_overlap < 1.0:
        raise ConfigError(f"train.sw_overlap: must be in [0, 1), got {t.sw_overlap}")
    if t.max_steps < 0 or (t.max_steps == 0 and t.max_epochs < 1):
        raise ConfigError("train.max_steps / train.max_epochs: set max_steps >= 1 or max_epochs >= 1")
    if t.batch_size < 1 or t.val_every < 1:
        raise ConfigError("train.batch_size and train.val_every must be at least 1")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: '{t.device}' is not one of auto, cpu, cuda")
    if cfg.loss.name not in ("dice_ce", "focal"):
        raise ConfigError(f"loss.name: '{cfg.loss.name}' is not one of dice_ce, focal")
    if t.optimizer not in ("adamw", "adam"):
        raise ConfigError(f"train.optimizer: '{t.optimizer}' is not one of adamw, adam")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: needs two values in [0, 1), got {t.betas}")
    if t.lr_schedule not in ("constant", "one_cycle"):
        raise ConfigError(f"train.lr_schedule: '{t.lr_schedule}' is not one of constant, one_cycle")
    from sslkit.downstream.adapt import mode_names

    if cfg.adapt.mode not in mode_names():
        raise ConfigError(f"adapt.mode: '{cfg.adapt.mode}' is not one of {', '.join(mode_names())}")
    for k in ("in_channels", "out_channels", "spatial_dims"):
        if k in cfg.model.args:
            raise ConfigError(f"model.args.{k}: set by data.in_channels / data.num_classes / model.spatial_dims")


def downstream_config_from_dict(raw: dict) -> DownstreamConfig:
    cfg = _build(DownstreamConfig, dict(raw or {}), "")
    _check(cfg)
    return cfg


def load_downstream_config(path: str | Path | None, overrides: list[str] = ()) -> DownstreamConfig:
    """Read a downstream YAML recipe (or defaults with path=None), apply `--set` overrides, validate."""
    return downstream_config_from_dict(read_recipe(path, overrides))


def save_downstream_config(cfg: DownstreamConfig, path: str | Path) -> None:
    save_config(cfg, path)
