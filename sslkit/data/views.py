"""Augmented views of a pretraining crop: a pure function of (crop, `data.views` config, seed).

`make_view(crop, cfg, seed)` turns one crop (C, *roi) float32 — 2-D (C, H, W) or 3-D (C, X, Y, Z) — into one view of
the same shape and dtype. All randomness comes from `np.random.default_rng(seed)`, where the dataset passes
seed = (run seed, epoch, index, stream): a resumed run redraws exactly the same view, whatever happened before.

`strength: basic` (draws from the generator in this order):
    1. flip: for each spatial axis in order, `rng.random() < flip_prob` flips it;
    2. a = 1 + U(-intensity_scale, intensity_scale),  b = U(-intensity_shift, intensity_shift):  y = a * x + b;
    3. if noise_std > 0: y += N(0, noise_std) per voxel (`rng.normal(size=crop.shape)`).
    This is draw for draw what `PretrainDataset._augment` did, so basic views are unchanged by the move.

`strength: strong` applies MONAI random array transforms in this order, each with its own probability:
    flip per spatial axis (RandFlip, p=flip_prob) -> zoom (RandZoom keep_size, one isotropic factor in `zoom`,
    p=zoom_prob) -> rotation (RandRotate, angles a, b, c ~ U(-rotate_deg, rotate_deg) in 3-D, one in 2-D,
    p=rotate_prob; content at offset o from the centre moves to R^T o, R = Rx(a) Ry(b) Rz(c)) -> gamma
    (RandAdjustContrast on the crop's min-max range: ((x - m) / r) ** g * r + m, g ~ U(gamma), p=gamma_prob) ->
    contrast (RandScaleIntensityFixedMean: (x - mean) * (1 + U(-contrast, contrast)) + mean, p=contrast_prob) ->
    scale x * (1 + U(-intensity_scale, intensity_scale)) -> shift x + U(-intensity_shift, intensity_shift) ->
    blur (RandGaussianSmooth, sigma per axis ~ U(blur_sigma) voxels, p=blur_prob, on a reflect-padded copy) ->
    noise N(0, noise_std) (float32 normals from a torch generator seeded with the slot's integer, not MONAI's
    RandGaussianNoise: its float64 legacy-NumPy normals took 3.8 of the ~12 ms a 48³ view cost on one core).
    Rotation resamples in float32 (RandRotate's dtype; float64 took 1.2-1.4x the time).
    Scale, shift and noise always apply, as in basic. Zoom-in keeps the centre (the two views' crops already differ
    by `data.views.shift`); zoom-out and rotation fill the border by reflection.
    Randomness: the generator draws `len(STRONG_SLOTS)` 32-bit integers at once, one per slot of STRONG_SLOTS
    (in that order, whether or not the slot is enabled, so one slot's settings never move another's draws); each
    transform's own RandomState (the noise slot's torch generator) is seeded with its integer before it runs (the
    same stream as `set_random_state(seed=...)`), never from global state.

The MONAI transform objects are built once per (thread, spatial dims, config values) and reused. While a view is
drawn, MONAI's metadata tracking is switched off (plain tensors: ~1.3-1.7x faster) and restored afterwards; the flag
is process-wide, so do not run MONAI preprocessing that needs MetaTensor affines in another thread meanwhile
(DataLoader workers are processes, so the data pipeline is unaffected).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from sslkit.config import ViewConfig
from sslkit.errors import ConfigError

STRENGTHS = ("basic", "strong")
# One seed per slot, drawn in this order; "flip2" is unused by 2-D crops but always drawn.
STRONG_SLOTS = ("flip0", "flip1", "flip2", "zoom", "rotate", "gamma", "contrast", "scale", "shift", "blur", "noise")
_MAX_CACHED_PIPELINES = 8  # per thread; a run uses one or two configs


def make_view(crop: np.ndarray, cfg: ViewConfig, seed: Sequence[int] | int) -> np.ndarray:
    """One augmented view of `crop` (C, H, W) or (C, X, Y, Z) -> same shape, float32, a new array.

    A pure function of (crop, cfg, seed): `seed` (e.g. (run seed, epoch, index, stream)) seeds
    `np.random.default_rng(seed)`, the only source of randomness. See the module docstring for both strengths.
    """
    x = np.asarray(crop, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"make_view expects a (C, H, W) or (C, X, Y, Z) crop, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    pipeline = _pipeline(cfg, x.ndim - 1)
    if pipeline is None:
        return _basic_view(x, cfg, rng)
    return _strong_view(x, pipeline, rng)


def strong_transforms(cfg: ViewConfig, spatial_dims: int) -> dict[str, object | None]:
    """The cached MONAI transforms of the strong pipeline for this thread: slot name -> transform (None where the
    slot is disabled), in application order. After `make_view` they hold the parameters of the last view drawn
    (e.g. RandZoom `_zoom`, RandRotate `x, y, z`)."""
    if cfg.strength != "strong":
        raise ConfigError(f"data.views.strength: strong_transforms needs 'strong', got {cfg.strength!r}")
    return dict(_pipeline(cfg, spatial_dims))


def validate_view_config(cfg: ViewConfig) -> None:
    """ConfigError naming the `data.views` key whose value cannot make a view."""
    if cfg.strength not in STRENGTHS:
        raise ConfigError(f"data.views.strength: {cfg.strength!r} is not one of {', '.join(STRENGTHS)}")
    for key in ("flip_prob", "zoom_prob", "rotate_prob", "gamma_prob", "contrast_prob", "blur_prob"):
        p = getattr(cfg, key)
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"data.views.{key}: {p} is not a probability in [0, 1]")
    for key in ("shift", "intensity_scale", "intensity_shift", "noise_std", "rotate_deg", "contrast"):
        if float(getattr(cfg, key)) < 0:
            raise ConfigError(f"data.views.{key}: {getattr(cfg, key)} must be >= 0")
    if cfg.contrast >= 1.0:
        raise ConfigError(f"data.views.contrast: {cfg.contrast} must be < 1 (1 - contrast would flip or erase it)")
    for key in ("zoom", "gamma", "blur_sigma"):
        _check_range(cfg, key)


def _check_range(cfg: ViewConfig, key: str) -> None:
    """`data.views.<key>` must be [low, high] with 0 < low <= high."""
    value = getattr(cfg, key)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"data.views.{key}: expected [low, high], got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (0.0 < lo <= hi < math.inf):
        raise ConfigError(f"data.views.{key}: [{lo}, {hi}] needs 0 < low <= high")


# ------------------------------------------------------------------------------------------- basic


def _basic_view(x: np.ndarray, cfg: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """Flips (p=flip_prob per spatial axis), y = (1 + U(-s, s)) x + U(-t, t), + N(0, noise_std); module docstring
    gives the draw order."""
    flip_axes = tuple(ax for ax in range(1, x.ndim) if rng.random() < cfg.flip_prob)
    y = np.flip(x, axis=flip_axes) if flip_axes else x
    scale = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale)
    shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift)
    y = y * scale + shift
    if cfg.noise_std > 0:
        y = y + rng.normal(0.0, cfg.noise_std, size=y.shape)
    return np.ascontiguousarray(y, dtype=np.float32)


# ------------------------------------------------------------------------------------------- strong


def _strong_view(x: np.ndarray, pipeline: list[tuple[str, object | None]], rng: np.random.Generator) -> np.ndarray:
    """Seed every slot from `rng` (one draw of len(STRONG_SLOTS) integers), then apply the enabled transforms."""
    seeds = rng.integers(0, 2**32, size=len(STRONG_SLOTS), dtype=np.uint64)
    if not (x.flags.c_contiguous and x.flags.writeable):  # torch wants positive strides; a memmap may be read-only
        x = np.array(x, order="C", copy=True)
    img = torch.from_numpy(x)  # the transforms never write into their input, so the crop itself is not copied
    with _plain_tensors():
        for (_slot, transform), seed in zip(pipeline, seeds):
            if transform is None:
                continue
            transform.R.seed(int(seed))  # == set_random_state(seed=int(seed)) without building a new RandomState
            img = transform(img)
    out = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out.copy() if np.shares_memory(out, x) else out


def _build_strong(cfg: ViewConfig, spatial_dims: int) -> list[tuple[str, object | None]]:
    """The strong pipeline in STRONG_SLOTS order; disabled slots (probability 0, or a no-op range) are None."""
    from monai.transforms import (RandAdjustContrast, RandFlip, RandGaussianSmooth, RandRotate,
                                  RandScaleIntensity, RandScaleIntensityFixedMean, RandShiftIntensity, RandZoom)

    linear = "bilinear" if spatial_dims == 2 else "trilinear"
    angle = math.radians(float(cfg.rotate_deg))
    sigma = tuple(float(s) for s in cfg.blur_sigma)
    zoom_lo, zoom_hi = (float(z) for z in cfg.zoom)

    def enabled(prob: float, active: bool = True) -> bool:
        return float(prob) > 0 and active

    slots: dict[str, object | None] = {}
    for axis in range(3):
        slots[f"flip{axis}"] = (RandFlip(prob=cfg.flip_prob, spatial_axis=axis)
                                if axis < spatial_dims and enabled(cfg.flip_prob) else None)
    slots["zoom"] = (RandZoom(prob=cfg.zoom_prob, min_zoom=zoom_lo, max_zoom=zoom_hi, mode=linear,
                              padding_mode="reflect", align_corners=False, keep_size=True)
                     if enabled(cfg.zoom_prob, (zoom_lo, zoom_hi) != (1.0, 1.0)) else None)
    in_3d = angle if spatial_dims == 3 else 0.0
    slots["rotate"] = (RandRotate(range_x=angle, range_y=in_3d, range_z=in_3d, prob=cfg.rotate_prob, keep_size=True,
                                  mode="bilinear", padding_mode="reflection", align_corners=False, dtype=torch.float32)
                       if enabled(cfg.rotate_prob, angle > 0) else None)
    slots["gamma"] = (RandAdjustContrast(prob=cfg.gamma_prob, gamma=tuple(float(g) for g in cfg.gamma))
                      if enabled(cfg.gamma_prob, tuple(cfg.gamma) != (1.0, 1.0)) else None)
    slots["contrast"] = (RandScaleIntensityFixedMean(prob=cfg.contrast_prob, factors=float(cfg.contrast),
                                                     fixed_mean=True, preserve_range=False)
                         if enabled(cfg.contrast_prob, cfg.contrast > 0) else None)
    slots["scale"] = (RandScaleIntensity(factors=float(cfg.intensity_scale), prob=1.0)
                      if cfg.intensity_scale > 0 else None)
    slots["shift"] = (RandShiftIntensity(offsets=float(cfg.intensity_shift), prob=1.0)
                      if cfg.intensity_shift > 0 else None)
    slots["blur"] = (_ReflectPadded(RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma,
                                                       prob=cfg.blur_prob), _gaussian_radius(sigma[1]))
                     if enabled(cfg.blur_prob) else None)
    slots["noise"] = _GaussianNoise(float(cfg.noise_std)) if cfg.noise_std > 0 else None
    for transform in slots.values():
        if transform is not None and not isinstance(transform, _GaussianNoise):
            transform.set_random_state(state=np.random.RandomState(0))  # its own state, reseeded before each use
    return [(name, slots[name]) for name in STRONG_SLOTS]


def _gaussian_radius(sigma: float, truncated: float = 4.0) -> int:
    """Half-width of MONAI's GaussianFilter kernel for `sigma` (its `truncated` default is 4 sigma)."""
    return int(max(float(sigma) * truncated, 0.5) + 0.5)


class _GaussianNoise:
    """img + N(0, std) per voxel, float32, from its own torch generator. `R.seed(s)` reseeds it, the call the slot
    loop makes on every MONAI transform's RandomState."""

    def __init__(self, std: float):
        self.std = std
        self.generator = torch.Generator()
        self.R = self

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(img.shape, generator=self.generator, dtype=torch.float32)
        return img + noise.mul_(self.std)


class _ReflectPadded:
    """Runs a random filter on a reflect-padded copy and crops back: MONAI's GaussianSmooth pads with zeros, which
    would darken a frame `radius` voxels wide around every blurred view. Randomness, probability and the drawn
    parameters stay the wrapped transform's (attributes are forwarded); padding happens only when it fires."""

    def __init__(self, transform, radius: int):
        self.transform = transform
        self.radius = int(radius)

    def __getattr__(self, name):
        return getattr(self.transform, name)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        self.transform.randomize(None)
        if not self.transform._do_transform:
            return img
        r, dims = self.radius, img.ndim - 1
        mode = "reflect" if min(img.shape[1:]) > r else "replicate"
        padded = torch.nn.functional.pad(img[None], (r, r) * dims, mode=mode)[0]  # (C, *roi) -> (C, *(roi + 2r))
        out = self.transform(padded, randomize=False)
        return out[(slice(None),) + (slice(r, -r),) * dims] if r > 0 else out


# ------------------------------------------------------------------------------------------- caching


_local = threading.local()


def _pipeline(cfg: ViewConfig, spatial_dims: int) -> list[tuple[str, object | None]] | None:
    """Validated config -> None (basic) or this thread's cached strong pipeline. Keyed by the config's values, so
    an edited config gets new transforms; transforms carry per-call state, hence one cache per thread."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    cache: OrderedDict = getattr(_local, "pipelines", None)
    if cache is None:
        cache = _local.pipelines = OrderedDict()
    key = (spatial_dims, repr(cfg))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    validate_view_config(cfg)
    pipeline = _build_strong(cfg, spatial_dims) if cfg.strength == "strong" else None
    cache[key] = pipeline
    if len(cache) > _MAX_CACHED_PIPELINES:
        cache.popitem(last=False)
    return pipeline


@contextlib.contextmanager
def _plain_tensors():
    """MONAI transforms on plain tensors: no MetaTensor wrapping or transform tracing while a view is drawn."""
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)
