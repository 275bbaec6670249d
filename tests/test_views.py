"""Augmented pretraining views (sslkit.data.views): determinism, basic parity with a hand-written formula, each
strong transform alone doing what it says, and the strong pipeline on a real CT crop."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from sslkit.config import ViewConfig
from sslkit.data.views import STRONG_SLOTS, make_view, strong_transforms, validate_view_config
from sslkit.errors import ConfigError

# Every strong slot switched off; a test switches on the one it checks.
ALL_OFF = dict(strength="strong", flip_prob=0.0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0,
               zoom_prob=0.0, rotate_prob=0.0, gamma_prob=0.0, contrast_prob=0.0, blur_prob=0.0)
ALL_ON = dict(strength="strong", zoom_prob=1.0, rotate_prob=1.0, gamma_prob=1.0, contrast_prob=1.0, blur_prob=1.0)


def only(**kw) -> ViewConfig:
    return ViewConfig(**{**ALL_OFF, **kw})


def random_crop(spatial: tuple, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((channels, *spatial), dtype=np.float32)


def gaussian_blob(shape: tuple, centre, sigma: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    r2 = sum((grid[i] - centre[i]) ** 2 for i in range(len(shape)))
    return np.exp(-r2 / (2 * sigma**2)).astype(np.float32)


def centre_of_mass(a: np.ndarray) -> np.ndarray:
    grid = np.indices(a.shape, dtype=np.float64)
    return np.array([(grid[i] * a).sum() / a.sum() for i in range(a.ndim)])


def spread(a: np.ndarray) -> float:
    """sqrt of the mass-weighted mean squared distance from the centre of mass."""
    grid = np.indices(a.shape, dtype=np.float64)
    c = centre_of_mass(a)
    return math.sqrt(sum(((grid[i] - c[i]) ** 2 * a).sum() for i in range(a.ndim)) / a.sum())


SHAPES = {2: (48, 40), 3: (24, 20, 16)}


# ------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cfg", [ViewConfig(), ViewConfig(strength="strong"), ViewConfig(**ALL_ON)],
                         ids=["basic", "strong", "strong_all_on"])
def test_same_seed_same_view_different_seed_different_view(cfg, dims):
    x = random_crop(SHAPES[dims], channels=2)
    a = make_view(x, cfg, (7, 2, 11, 1))
    np.random.seed(123)  # global numpy / torch state must not matter
    torch.manual_seed(5)
    b = make_view(x, cfg, (7, 2, 12, 1))
    a_again = make_view(x, cfg, (7, 2, 11, 1))
    np.testing.assert_array_equal(a, a_again)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, make_view(x, cfg, (7, 2, 11, 2)))  # the other view stream

    in_thread = {}
    t = threading.Thread(target=lambda: in_thread.setdefault("v", make_view(x, cfg, (7, 2, 11, 1))))
    t.start()
    t.join()
    np.testing.assert_array_equal(a, in_thread["v"])  # a fresh thread (fresh transform cache) draws the same view


def test_one_config_does_not_disturb_another():
    x = random_crop(SHAPES[3])
    strong, all_on = ViewConfig(strength="strong"), ViewConfig(**ALL_ON)
    first = make_view(x, strong, (1, 0, 3, 1))
    make_view(x, all_on, (1, 0, 3, 1))
    np.testing.assert_array_equal(first, make_view(x, strong, (1, 0, 3, 1)))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cfg", [ViewConfig(), ViewConfig(**ALL_ON)], ids=["basic", "strong_all_on"])
def test_shape_dtype_kept_and_input_untouched(cfg, dims):
    x = random_crop(SHAPES[dims], channels=2)
    before = x.copy()
    y = make_view(x, cfg, (0, 0, 0, 1))
    assert y.shape == x.shape and y.dtype == np.float32 and y.flags["C_CONTIGUOUS"]
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(x, before)


def test_strided_read_only_crop_gives_the_same_view_as_its_copy():
    x = random_crop(SHAPES[3])
    strided = np.flip(x, 2)
    strided.flags.writeable = False
    cfg = ViewConfig(**ALL_ON)
    np.testing.assert_array_equal(make_view(strided, cfg, (5,)), make_view(strided.copy(), cfg, (5,)))


def test_metadata_tracking_is_restored():
    from monai.data import get_track_meta

    assert get_track_meta()
    make_view(random_crop(SHAPES[3]), ViewConfig(**ALL_ON), (0,))
    assert get_track_meta()


# ------------------------------------------------------------------------------------------- basic


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("noise_std", [0.05, 0.0])
def test_basic_equals_hand_computed_flip_scale_shift_noise(dims, noise_std):
    cfg = ViewConfig(strength="basic", flip_prob=0.5, intensity_scale=0.2, intensity_shift=0.1, noise_std=noise_std)
    x = random_crop(SHAPES[dims], channels=2, seed=4)
    seed = (3, 1, 7, 1)
    rng = np.random.default_rng(seed)
    expected = x.astype(np.float64)
    for axis in range(1, dims + 1):
        if rng.random() < 0.5:
            expected = expected[(slice(None),) * axis + (slice(None, None, -1),)]
    a = 1.0 + rng.uniform(-0.2, 0.2)
    b = rng.uniform(-0.1, 0.1)
    expected = a * expected + b
    if noise_std > 0:
        expected = expected + rng.normal(0.0, noise_std, size=x.shape)
    np.testing.assert_allclose(make_view(x, cfg, seed), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- strong, one at a time


@pytest.mark.parametrize("dims", [2, 3])
def test_strong_flip_with_probability_one_flips_every_axis(dims):
    x = random_crop(SHAPES[dims])
    y = make_view(x, only(flip_prob=1.0), (2, 0, 1, 1))
    np.testing.assert_array_equal(y, np.flip(x, tuple(range(1, dims + 1))))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("zoom", [[1.35, 1.5], [0.6, 0.75]], ids=["in", "out"])
def test_zoom_scales_a_blob_by_the_drawn_factor(dims, zoom):
    """A centred Gaussian blob: its mass grows by z**dims and its spread by z, with z inside the configured range
    and equal to the factor RandZoom drew as realised on the grid (o = floor(n z) voxels, z = o / n; linear
    interpolation widens a blob by ~1%). Moments are taken over the o central voxels of a zoomed-out view: the
    reflected border around them holds mirror images, not the zoomed crop."""
    n = 48
    x = gaussian_blob((n,) * dims, [(n - 1) / 2] * dims, sigma=2.5)[None]
    cfg = only(zoom=zoom, zoom_prob=1.0)
    y = make_view(x, cfg, (4, 0, 2, 1))
    drawn = strong_transforms(cfg, dims)["zoom"]._zoom[0]
    o = math.floor(n * drawn)
    inner = y[(0,) + (slice((n - o) // 2, (n - o) // 2 + o),) * dims] if o < n else y[0]
    z_mass = (inner.sum() / x.sum()) ** (1 / dims)
    z_spread = spread(inner) / spread(x[0])
    assert zoom[0] - 0.03 <= z_mass <= zoom[1] + 0.03
    assert z_mass == pytest.approx(o / n, rel=0.01)
    assert z_spread == pytest.approx(o / n, rel=0.025)
    np.testing.assert_allclose(centre_of_mass(inner), [(inner.shape[0] - 1) / 2] * dims, atol=0.6)


def _rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_rotation_2d_moves_off_centre_blobs_as_predicted():
    """MONAI maps output to input coordinates with R(theta), so image content turns by -theta about the centre:
    a blob at offset o ends at R(-theta) o. Two blobs (one per channel) pin the angle and its sign."""
    n = 64
    centre = np.full(2, (n - 1) / 2)
    offsets = np.array([[12.0, 0.0], [-4.0, 10.0]])
    x = np.stack([gaussian_blob((n, n), centre + o, sigma=2.0) for o in offsets])
    cfg = only(rotate_deg=40.0, rotate_prob=1.0)
    y = make_view(x, cfg, (1, 2, 3))
    theta = strong_transforms(cfg, 2)["rotate"].x
    assert 5.0 < abs(math.degrees(theta)) <= 40.0  # this seed draws a real rotation within range
    c, s = math.cos(-theta), math.sin(-theta)
    turn = np.array([[c, -s], [s, c]])
    for ch, o in enumerate(offsets):
        np.testing.assert_allclose(centre_of_mass(y[ch]) - centre, turn @ o, atol=0.03)
        assert y[ch].sum() == pytest.approx(x[ch].sum(), rel=1e-3)


def test_rotation_3d_is_the_inverse_of_the_intrinsic_xyz_rotation():
    """3-D: MONAI's matrix is R = Rx(a) Ry(b) Rz(c) (intrinsic x, y, z) from output to input coordinates, so a blob
    at offset o ends at R^T o. Three blobs along the axes and one off-axis check it."""
    n = 40
    centre = np.full(3, (n - 1) / 2)
    offsets = np.array([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [5.0, -4.0, 6.0]])
    x = np.stack([gaussian_blob((n,) * 3, centre + o, sigma=2.0) for o in offsets])
    cfg = only(rotate_deg=25.0, rotate_prob=1.0)
    y = make_view(x, cfg, (1, 2, 5))
    t = strong_transforms(cfg, 3)["rotate"]
    angles = np.array([t.x, t.y, t.z])
    assert np.all(np.abs(angles) <= math.radians(25.0)) and np.abs(angles).max() > math.radians(5.0)
    rot = _rx(t.x) @ _ry(t.y) @ _rz(t.z)
    for ch, o in enumerate(offsets):
        np.testing.assert_allclose(centre_of_mass(y[ch]) - centre, rot.T @ o, atol=0.03)


@pytest.mark.parametrize("dims", [2, 3])
def test_gamma_on_unit_range_data_is_a_power(dims):
    """[0, 1] data holding both 0 and 1: RandAdjustContrast's ((x - min) / range) ** g * range + min is x ** g."""
    x = random_crop(SHAPES[dims], seed=3)
    x.flat[0], x.flat[1], x.flat[2] = 0.0, 1.0, 0.5
    gammas = []
    for i in range(4):
        y = make_view(x, only(gamma=[0.5, 2.0], gamma_prob=1.0), (0, 0, i, 1))
        g = math.log(y.flat[2]) / math.log(0.5)
        np.testing.assert_allclose(y, x.astype(np.float64) ** g, atol=2e-6)
        assert 0.5 <= g <= 2.0
        gammas.append(g)
    assert np.ptp(gammas) > 0.1  # different seeds draw different gammas


@pytest.mark.parametrize("dims", [2, 3])
def test_contrast_scales_around_the_mean(dims):
    x = random_crop(SHAPES[dims], seed=5)
    y = make_view(x, only(contrast=0.5, contrast_prob=1.0), (0, 0, 1, 1))
    m = x.mean(dtype=np.float64)
    k = float(np.polyfit(x.ravel() - m, y.ravel() - m, 1)[0])
    assert 0.5 <= k <= 1.5 and abs(k - 1) > 1e-3
    np.testing.assert_allclose(y, (x - m) * k + m, atol=2e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_intensity_scale_and_shift(dims):
    x = random_crop(SHAPES[dims], seed=6) + 0.5
    y = make_view(x, only(intensity_scale=0.3), (0, 0, 1, 1))
    a = float(y.flat[0] / x.flat[0])
    assert 0.7 <= a <= 1.3 and abs(a - 1) > 1e-3
    np.testing.assert_allclose(y, a * x, rtol=1e-6)
    y = make_view(x, only(intensity_shift=0.2), (0, 0, 1, 1))
    b = float(y.flat[0] - x.flat[0])
    assert -0.2 <= b <= 0.2 and abs(b) > 1e-4
    np.testing.assert_allclose(y, x + b, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_blur_lowers_laplacian_energy_and_matches_a_mirrored_gaussian_filter(dims):
    """Blur with the drawn per-axis sigmas equals scipy's Gaussian filter with mirrored borders (MONAI's kernel is
    the erf-integrated Gaussian, scipy's the sampled one: they differ by ~1e-2), so no dark frame at the edges."""
    x = random_crop(SHAPES[dims], seed=7)
    cfg = only(blur_sigma=[1.0, 1.5], blur_prob=1.0)
    y = make_view(x, cfg, (0, 0, 1, 1))
    energy = lambda a: float((ndimage.laplace(a[0].astype(np.float64)) ** 2).sum())  # noqa: E731
    assert energy(y) < 0.1 * energy(x)
    blur = strong_transforms(cfg, dims)["blur"]
    sigmas = (blur.x, blur.y, blur.z)[:dims]
    assert all(1.0 <= s <= 1.5 for s in sigmas)
    reference = ndimage.gaussian_filter(x[0].astype(np.float64), sigmas, mode="mirror")
    np.testing.assert_allclose(y[0], reference, atol=0.02)
    assert abs(float(y.mean() - x.mean())) < 0.005


@pytest.mark.parametrize("strength", ["basic", "strong"])
def test_noise_has_the_configured_std(strength):
    x = np.zeros((1, 32, 32, 32), np.float32)
    cfg = dataclasses.replace(only(noise_std=0.1), strength=strength)
    y = make_view(x, cfg, (0, 0, 1, 1))
    assert y.std() == pytest.approx(0.1, rel=0.02)
    assert abs(float(y.mean())) < 0.003


ENABLED_BUT_NEVER = {
    "flip": dict(flip_prob=0.0),
    "zoom": dict(zoom=[1.5, 1.6], zoom_prob=0.0),
    "rotate": dict(rotate_deg=45.0, rotate_prob=0.0),
    "gamma": dict(gamma=[0.3, 3.0], gamma_prob=0.0),
    "contrast": dict(contrast=0.9, contrast_prob=0.0),
    "blur": dict(blur_sigma=[2.0, 3.0], blur_prob=0.0),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("slot", sorted(ENABLED_BUT_NEVER))
def test_probability_zero_leaves_the_crop_unchanged(slot, dims):
    x = random_crop(SHAPES[dims], seed=8)
    y = make_view(x, only(**ENABLED_BUT_NEVER[slot]), (0, 0, 1, 1))
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(y, x)


def test_each_slot_draws_its_own_seed():
    """Switching one slot on or off does not change what another slot draws (one seed per slot, always drawn)."""
    x = np.zeros((1, 16, 16, 16), np.float32)
    noise_only = make_view(x, only(noise_std=0.1), (9, 9))
    noise_and_shift = make_view(x, only(noise_std=0.1, intensity_shift=0.2), (9, 9))
    offset = noise_and_shift - noise_only
    np.testing.assert_allclose(offset, offset.flat[0], atol=1e-6)  # same noise field, plus a constant shift
    assert len(STRONG_SLOTS) == len(set(STRONG_SLOTS))


# ------------------------------------------------------------------------------------------- real scan


def _windowed_ct(demo_dir) -> np.ndarray:
    import nibabel as nib

    hu = np.asarray(nib.load(str(demo_dir / "ct_head.nii.gz")).dataobj, dtype=np.float32)
    return np.clip((hu + 175.0) / 425.0, 0.0, 1.0)  # -175..250 HU -> [0, 1]


@pytest.mark.parametrize("dims", [2, 3])
def test_strong_views_of_a_real_ct_crop_stay_finite_and_in_range(demo_dir, dims):
    vol = _windowed_ct(demo_dir)
    c = [s // 2 for s in vol.shape]
    if dims == 3:  # 48^3 across the skull: air, bone and brain
        crop = vol[c[0] - 84:c[0] - 36, c[1] - 24:c[1] + 24, c[2] - 24:c[2] + 24][None]
    else:
        crop = vol[c[0] - 96:c[0], c[1] - 48:c[1] + 48, c[2]][None]
    crop = np.ascontiguousarray(crop)
    assert crop.std() > 0.15  # the crop holds anatomy with contrast, not only air or brain
    for cfg in (ViewConfig(strength="strong"), ViewConfig(**ALL_ON)):
        for i in range(3):
            y = make_view(crop, cfg, (0, 0, i, 1))
            assert y.shape == crop.shape and y.dtype == np.float32 and np.isfinite(y).all()
            lo, hi = np.percentile(y, [1, 99])
            assert -0.35 <= lo and hi <= 1.35, (lo, hi)
            assert abs(float(y.mean() - crop.mean())) < 0.2
            # flips and rotations move voxels, but the intensity distribution is still this crop's
            assert np.corrcoef(np.sort(y.ravel()), np.sort(crop.ravel()))[0, 1] > 0.9


# ------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("change, key", [
    (dict(strength="medium"), "data.views.strength"),
    (dict(zoom=[1.25, 0.8]), "data.views.zoom"),
    (dict(gamma=[0.0, 1.5]), "data.views.gamma"),
    (dict(blur_sigma=[1.0]), "data.views.blur_sigma"),
    (dict(rotate_prob=1.5), "data.views.rotate_prob"),
    (dict(noise_std=-0.1), "data.views.noise_std"),
    (dict(contrast=1.0), "data.views.contrast"),
])
def test_bad_view_config_names_the_key(change, key):
    cfg = dataclasses.replace(ViewConfig(strength="strong"), **change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_view_config(cfg)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_view(random_crop(SHAPES[2]), cfg, (0,))
