"""The task probe's own pieces: features, classifiers, Dice, and refusals of probes that cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslkit.config import TaskProbeConfig
from sslkit.errors import ConfigError
from sslkit.monitor import task_probe as tp


class KnownFeatureEncoder(nn.Module):
    """A fixed 'encoder': stage 1 is the input itself (the feature the labels are cut from), stage 2 its local mean
    at half resolution."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return [x * self.scale, torch.nn.functional.avg_pool3d(x, 2)]


def _blob_volume(seed: int, n: int = 24, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Image: `channels` smooth random fields; label: the index of the largest field at each voxel (with 3 channels
    the classes 0, 1, 2 are balanced), a function of the image a linear classifier can represent exactly."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    fields = np.stack([ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 2.0) for _ in range(channels)])
    fields = (fields - fields.mean()) / fields.std()
    return torch.from_numpy(fields.astype(np.float32)), torch.from_numpy(fields.argmax(0).astype(np.int64))


def _probe_set(shuffle: bool = False) -> tp.ProbeSet:
    tr = [_blob_volume(s) for s in (0, 1)]
    va = [_blob_volume(s) for s in (2, 3)]
    xt, yt = torch.stack([a for a, _ in tr]), torch.stack([b for _, b in tr])
    if shuffle:
        g = torch.Generator().manual_seed(0)
        yt = yt.flatten()[torch.randperm(yt.numel(), generator=g)].reshape(yt.shape)
    return tp.ProbeSet(xt, yt, torch.stack([a for a, _ in va]), torch.stack([b for _, b in va]), ["mid", "high"],
                       "synthetic")


def _cfg(**kw) -> TaskProbeConfig:
    return TaskProbeConfig(datalist="x.json", every=1, grid_stride=1, voxels=4000, **kw)


def test_probe_finds_a_label_that_is_a_function_of_a_feature():
    probe = tp.TaskProbe(_probe_set(), _cfg(), seed=0)
    m = probe.measure(KnownFeatureEncoder())
    assert m["task_probe/dice_mean"] >= 0.95, m
    assert set(m) == {"task_probe/dice_mean", "task_probe/dice/mid", "task_probe/dice/high"}
    knn = tp.TaskProbe(_probe_set(), _cfg(method="knn", knn_k=10), seed=0).measure(KnownFeatureEncoder())
    assert knn["task_probe/dice_mean"] >= 0.9, knn


def test_probe_on_shuffled_labels_stays_near_chance():
    m = tp.TaskProbe(_probe_set(shuffle=True), _cfg(), seed=0).measure(KnownFeatureEncoder())
    # three balanced classes: random votes give each class Dice ~1/3, a constant vote 0.5 for one class and 0 for
    # the other: a mean of 0.25-0.33; the probe with the real labels is >= 0.95
    assert m["task_probe/dice_mean"] < 0.45, m


def test_logistic_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    probe = tp.TaskProbe(_probe_set(), _cfg(), seed=0)
    d = probe.data
    enc = KnownFeatureEncoder()
    ft = tp.encoder_features(enc, d.train_images, probe.grid)
    fv = tp.encoder_features(enc, d.val_images, probe.grid)
    y = tp.label_grid(d.train_labels, probe.grid).flatten()
    xt = ft.movedim(1, -1).reshape(-1, ft.shape[1])
    xv = fv.movedim(1, -1).reshape(-1, fv.shape[1])
    idx = tp.balanced_sample(y, 3, 4000, torch.Generator().manual_seed(0))
    xs, xvs = tp.standardise(xt[idx], xv)
    ours = probe.measure(enc)
    sk = LogisticRegression(C=probe.cfg.c, max_iter=2000, tol=1e-8).fit(xs.double().numpy(), y[idx].numpy())
    theirs = probe.dice_metrics(torch.from_numpy(sk.decision_function(xvs.double().numpy())).float())
    for k in ours:
        assert abs(ours[k] - theirs[k]) <= 0.01, (k, ours[k], theirs[k])
    w, b = tp.fit_logistic(xs, y[idx], 3, probe.cfg.c)
    # the same optimum: equal class probabilities on the validation voxels
    p_ours = torch.softmax(xvs @ w + b, 1).double().numpy()
    assert np.abs(p_ours - sk.predict_proba(xvs.double().numpy())).max() < 2e-3


def test_dice_per_class_by_hand_and_padding_ignored():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    lab = torch.tensor([0, 1, 2, 2, 2, -1])
    d1, d2 = tp.dice_per_class(pred, lab, 3)
    assert d1 == pytest.approx(2 * 1 / (2 + 1))     # class 1: one hit, pred 2, truth 1
    assert d2 == pytest.approx(2 * 2 / (2 + 3))     # class 2: the padded voxel is left out


def test_balanced_sample_draws_per_class_and_never_padding():
    y = torch.tensor([0] * 100 + [1] * 10 + [-1] * 50)
    idx = tp.balanced_sample(y, 2, 40, torch.Generator().manual_seed(1))
    assert (y[idx] == 0).sum() == 20 and (y[idx] == 1).sum() == 10 and (y[idx] >= 0).all()


def test_intensity_features_are_the_documented_filters():
    from scipy import ndimage

    x, _ = _blob_volume(5, 16, channels=2)
    f = tp.intensity_features(x[None], [16, 16, 16])
    assert f.shape == (1, 12, 16, 16, 16)                       # 6 filters per input channel
    ref = ndimage.gaussian_gradient_magnitude(x[1].double().numpy(), 2.0, mode="nearest")
    assert np.allclose(f[0, 11].numpy(), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------ files and refusals


def _nifti(path: Path, arr: np.ndarray, spacing: float = 2.0) -> str:
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.diag([spacing] * 3 + [1.0])), str(path))
    return path.name


def _scan_pair(tmp: Path, name: str, seed: int, n: int = 40) -> dict:
    img, lab = _blob_volume(seed, n, channels=3)
    return {"image": _nifti(tmp / f"{name}.nii.gz", (img[0].numpy() * 100 + 500).astype(np.float32)),
            "label": _nifti(tmp / f"{name}_label.nii.gz", lab.numpy().astype(np.uint8)), "modality": "mri"}


def _data_cfg():
    from sslkit.config import DataConfig

    return DataConfig(modality="mri", spacing=[2.0, 2.0, 2.0], roi=[16, 16, 16], crop_foreground=False)


def test_probe_set_from_a_datalist_and_its_halves(tmp_path):
    doc = {"training": [_scan_pair(tmp_path, "a", 0)], "validation": [_scan_pair(tmp_path, "b", 1)],
           "labels": {"0": "background", "1": "mid", "2": "high"}}
    (tmp_path / "probe.json").write_text(json.dumps(doc))
    cfg = TaskProbeConfig(datalist=str(tmp_path / "probe.json"), every=5, crops=3)
    data = tp.load_probe_set(cfg, _data_cfg(), 3, seed=0)
    assert data.class_names == ["mid", "high"]
    assert data.train_images.shape == (3, 1, 16, 16, 16) and data.val_labels.shape == (3, 16, 16, 16)
    again = tp.load_probe_set(cfg, _data_cfg(), 3, seed=0)
    assert torch.equal(data.val_images, again.val_images)           # fixed crops
    # one labelled scan and no validation list: its two x-halves. The image is its own x coordinate, so the crops
    # show which half they came from.
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None] + 1, (40, 40, 40)).copy()
    one = {**doc["training"][0], "image": _nifti(tmp_path / "ramp.nii.gz", ramp)}
    (tmp_path / "one.json").write_text(json.dumps({"training": [one]}))
    halves = tp.load_probe_set(TaskProbeConfig(datalist=str(tmp_path / "one.json"), every=5, crops=2), _data_cfg(),
                               3, seed=0)
    assert halves.class_names == ["class_1", "class_2"] and len(halves.val_images) == 2
    assert float(halves.train_images.max()) < float(halves.val_images[halves.val_labels[:, None] >= 0].min())


def test_a_probe_that_cannot_run_is_refused_in_one_line(tmp_path):
    good = _scan_pair(tmp_path, "a", 0)
    cases = {
        "nolabel": ({"training": [{"image": good["image"]}]}, "needs 'image' and 'label'"),
        "grid": ({"training": [{**good, "label": _nifti(tmp_path / "small.nii.gz", np.zeros((20, 20, 20), np.uint8))}],
                  "validation": [good]}, "shape"),
        "absent": ({"training": [good], "validation": [{**good, "label": _nifti(
            tmp_path / "only1.nii.gz", np.ones((40, 40, 40), np.uint8))}]}, "class class_2 is absent from probe-val"),
    }
    for name, (doc, words) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ConfigError) as e:
            tp.load_probe_set(TaskProbeConfig(datalist=str(path), every=1), _data_cfg(), 3, seed=0)
        msg = str(e.value)
        assert words in msg and "\n" not in msg and msg.startswith("monitor.task_probe"), msg
    with pytest.raises(ConfigError, match="not found"):
        tp.read_probe_datalist(tmp_path / "missing.json")
