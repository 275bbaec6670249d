"""SAM downstream (issue 8): the `adapter` adaptation mode (Medical SAM Adapter), the 2D slice pipeline from
volumes with 3D metrics, the ACDC layout, and the three prompt-free heads training on demo slices."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from sslkit.data.demo import build_mni_gm_wm
from sslkit.downstream.adapt import adapt, build_model, load_encoder
from sslkit.downstream.config import load_downstream_config
from sslkit.downstream.data import list_cases, make_datasets
from sslkit.downstream.evaluate import validate
from sslkit.downstream.metrics import case_metrics
from sslkit.downstream.slices import infer_by_slices
from sslkit.errors import DataError

AUTOSAM = "downstream/demo_acdc_autosam.yaml"
MSA_DEMO = "downstream/demo_btcv_msa.yaml"
# where these tests build the recipes' demo data: outside the repository, whose demo_data/ and .cache/ are a user's
MNI_ROOT = Path(tempfile.gettempdir()) / "sslkit-test-mni"
ACDC_ROOT = Path(tempfile.gettempdir()) / "sslkit-test-acdc-mni"


def _adapter_values(dim: int, ratio: float) -> int:
    hidden = int(dim * ratio)
    return 2 * dim * hidden + hidden + dim  # Linear D->h (+bias), Linear h->D (+bias)


# ------------------------------------------------------------------------------------------ adapter mode


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_adapter_mode_trains_only_adapters_and_head_on_vit_b(spatial_dims):
    cfg = load_downstream_config("downstream/btcv_msa.yaml")
    cfg.model.args.pop("checkpoint")  # no SAM weights on CI: the architecture is what is counted here
    cfg.model.spatial_dims = spatial_dims
    cfg.adapt.options = {"ratio": 0.25, "mlp_scale": 0.5, "depth_branch": spatial_dims == 3}
    if spatial_dims == 2:
        cfg.data.roi, cfg.data.spacing = [96, 96], [1.5, 1.5]
    model = build_model(cfg)
    a = adapt(model, cfg.adapt, 1e-4)
    enc = model.encoder
    trainable = {id(p) for g in a.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    for n, p in enc.named_parameters():
        assert p.requires_grad == ("adapter" in n), n
    assert all(p.requires_grad for p in model.head.parameters())

    per_block = 3 if spatial_dims == 3 else 2  # space + MLP (+ depth) adapters
    adapters = sum(p.numel() for n, p in enc.named_parameters() if "adapter" in n)
    assert adapters == 12 * per_block * _adapter_values(768, 0.25)
    vit_b = sum(p.numel() for n, p in enc.named_parameters() if "adapter" not in n)
    assert abs(vit_b - 89.67e6) / 89.7e6 < 0.01
    head = sum(p.numel() for p in model.head.parameters())
    # the paper's D/4 bottleneck costs more than 5 % of ViT-B; a narrower bottleneck is one option away
    small = 12 * per_block * _adapter_values(768, 0.1)
    print(f"\n{spatial_dims}D MSA on ViT-B: adapters {adapters / 1e6:.2f} M = {100 * adapters / vit_b:.2f} % of "
          f"ViT-B ({100 * adapters / (vit_b + adapters):.2f} % of the adapted encoder); head {head / 1e6:.2f} M; "
          f"ratio 0.1: {100 * small / vit_b:.2f} %")
    assert small / vit_b < 0.05

    # forward/backward reaches adapters and head only (tiny input, ViT-B at 64^2 tokens-wise cheap)
    cfg2 = load_downstream_config(MSA_DEMO)
    m2 = build_model(cfg2)
    adapt(m2, cfg2.adapt, 1e-3)
    y = m2(torch.randn(1, 1, 16, 16, 4))
    assert y.shape == (1, 3, 16, 16, 4)
    y.square().mean().backward()
    got = {n for n, p in m2.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all("adapter" in n or n.startswith("head.") for n in got)
    assert any("depth_adapter" in n for n in got)  # the 3D depth branch is used


def test_msa_finetune_changes_only_adapters_and_head(tmp_path):
    """Through `sslkit finetune` (3D, depth branch) from a 'pretrained' encoder without adapters: the encoder's
    own weights are bitwise unchanged, adapters and head moved; evaluate-style rebuild loads the checkpoint."""
    from safetensors.torch import save_file

    from test_downstream import last_checkpoint_weights

    from sslkit.downstream.adapt import load_finetuned
    from sslkit.downstream.train import finetune

    cfg = load_downstream_config(MSA_DEMO, ["train.max_steps=3", "train.val_every=3", "train.val_cases=1",
                                            "data.samples_per_volume=1", f"data.root={MNI_ROOT}"])
    torch.manual_seed(3)
    donor = {k: v + 0.01 for k, v in build_model(cfg).encoder.state_dict().items() if "adapter" not in k}
    save_file(donor, str(tmp_path / "encoder.safetensors"))
    finetune(cfg, tmp_path / "run", encoder_path=str(tmp_path / "encoder.safetensors"), progress=False)
    step, after = last_checkpoint_weights(tmp_path / "run")
    for k, v in donor.items():
        assert torch.equal(after["encoder." + k], v), k
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg).state_dict()
    moved = {k for k, v in after.items() if not torch.equal(v, init[k]) and k[len("encoder."):] not in donor}
    assert any("adapter" in k for k in moved) and any(k.startswith("head.") for k in moved)
    model = load_finetuned(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in after.items())

    # strict loading still names what does not match (an adapter key is allowed to be missing, nothing else)
    bad = dict(donor)
    bad.pop("blocks.0.norm1.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(Exception, match="missing 1: blocks.0.norm1.weight"):
        load_encoder(build_model(cfg), tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------ ACDC layout


def _acdc_tree(root, src, patients, split_dirs: bool):
    """ACDC-shaped tree from real MNI files: each patient two labelled frames (+ a 4D file to be ignored)."""
    (left,), (right,) = src
    for i, pid in enumerate(patients):
        case = left if i % 2 == 0 else right
        d = root / (("training" if i < len(patients) - 1 else "testing") if split_dirs else "") / pid
        d.mkdir(parents=True, exist_ok=True)
        for frame in ("01", "12"):
            shutil.copyfile(case["image"], d / f"{pid}_frame{frame}.nii.gz")
            shutil.copyfile(case["label"], d / f"{pid}_frame{frame}_gt.nii.gz")
        shutil.copyfile(case["image"], d / f"{pid}_4d.nii.gz")


def test_acdc_layout_splits_by_patient(tmp_path):
    src = build_mni_gm_wm(tmp_path / "mni", 3)
    cfg = load_downstream_config(AUTOSAM)
    d = cfg.data
    pids = [f"patient{i:03d}" for i in range(1, 6)]

    _acdc_tree(tmp_path / "flat", src, pids, split_dirs=False)
    d.layout, d.demo_source, d.root, d.num_labelled, d.val_fraction = "acdc", "", str(tmp_path / "flat"), 0, 0.4
    train, val = list_cases(d)
    assert len(train) + len(val) == 10 and len(val) == 4  # 2 of 5 patients, both frames each
    groups = lambda cases: {c["group"] for c in cases}
    assert not groups(train) & groups(val)
    assert all(c["label"].endswith("_gt.nii.gz") and "_4d" not in c["image"] for c in train + val)

    _acdc_tree(tmp_path / "split", src, pids, split_dirs=True)
    d.root = str(tmp_path / "split")
    train, val = list_cases(d)
    assert groups(train) == set(pids[:-1]) and groups(val) == {pids[-1]}
    d.num_labelled = 1
    assert len(list_cases(d)[0]) == 1  # one labelled volume (AutoSAM's setting)

    (tmp_path / "split" / "training" / "patient002" / "patient002_frame12_gt.nii.gz").unlink()
    with pytest.raises(DataError, match="patient002_frame12.nii.gz: no label file patient002_frame12_gt.nii.gz"):
        list_cases(d)


# ------------------------------------------------------------------------------------------ slices


class _SliceNet(nn.Module):
    """A 2D model whose output depends on the pixel values: checks that slices are routed and stacked right."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_slice_pipeline_predicts_by_slice_and_scores_in_3d():
    cfg = load_downstream_config(AUTOSAM, [f"data.root={ACDC_ROOT}"])
    data = make_datasets(cfg.data)
    train_ds, val_ds, val_cases = data.train, data.val, data.val_cases
    vol = train_ds.volumes[0]
    depth = vol["image"].shape[-1]
    assert len(train_ds) == depth  # one labelled volume: all of its axial slices
    item = train_ds[depth // 2]
    assert item["image"].shape == (3, *cfg.data.roi) and item["label"].shape == (1, *cfg.data.roi)
    assert torch.equal(item["image"][0], item["image"][2])  # the slice repeated to 3 channels
    img = vol["image"].as_tensor()
    assert abs(float(img.mean())) < 1e-3 and abs(float(img.std()) - 1) < 1e-2  # z-score over the volume

    net = _SliceNet().eval()
    v = val_ds[0]
    image = v["image"].as_tensor()[None]  # (1, 1, H, W, D)
    logits = infer_by_slices(net, image, cfg, torch.device("cpu"))
    assert logits.shape == (1, 3, *image.shape[2:])
    with torch.no_grad():
        for z in (0, image.shape[-1] // 2, image.shape[-1] - 1):
            want = net(image[..., z].expand(-1, 3, -1, -1))
            assert torch.allclose(logits[..., z], want, atol=1e-5)
    summary, per_case = validate(net, val_ds, cfg, torch.device("cpu"), val_cases)
    m = case_metrics(logits.argmax(1)[0], v["label"].as_tensor()[0].round().long(), 3,
                     [float(s) for s in v["label"].pixdim])
    assert per_case[0]["dice"] == pytest.approx(m["dice"]) and per_case[0]["hd95"] == pytest.approx(m["hd95"])
    assert summary["n_cases"] == 1


def test_spacing_zero_keeps_the_slice_spacing(tmp_path):
    cfg = load_downstream_config(AUTOSAM, ["data.spacing=[3.0, 3.0, 0.0]", f"data.root={ACDC_ROOT}"])
    val_ds = make_datasets(cfg.data).val
    assert [round(float(s), 3) for s in val_ds[0]["image"].pixdim] == [3.0, 3.0, 1.0]  # the 1 mm source's slices


# ------------------------------------------------------------------------------------------ heads train


# the CNN head (4 upsampling stages from the 8x8 token grid) learns slower than the other two on this demo, and
# unevenly at a higher rate: 0.162 -> 0.192 after 60 steps, 0.379 after 120 at the recipe's 5e-4 (measured); the
# AutoSAM and linear heads at 1e-3 reach 0.493 and 0.511 after 30 steps (0.533 / 0.517 after 60 at 5e-4)
@pytest.mark.parametrize("head, steps, lr", [("autosam", 30, 1e-3), ("cnn", 120, 5e-4), ("linear", 30, 1e-3)])
def test_head_trains_on_one_labelled_volume(head, steps, lr, tmp_path):
    """Frozen (random) SAM-shaped encoder, one labelled volume's slices: validation Dice on the other volume beats
    the same model's untrained Dice by at least 0.2."""
    from sslkit.downstream.train import finetune

    cfg = load_downstream_config(AUTOSAM, [f"model.args.head={head}", f"train.max_steps={steps}",
                                           f"train.val_every={steps}", f"optim.lr={lr}", f"data.root={ACDC_ROOT}"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    data = make_datasets(cfg.data)
    val_ds, val_cases = data.val, data.val_cases
    before = validate(model, val_ds, cfg, torch.device("cpu"), val_cases)[0]["mean_dice"]
    out = finetune(cfg, tmp_path / head, progress=False)
    print(f"\n{head}: untrained Dice {before:.3f} -> {out['best_dice']:.3f} after {steps} steps")
    assert out["best_dice"] > before + 0.2
    rows = [json.loads(x) for x in (tmp_path / head / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) < sum(losses[:5])
