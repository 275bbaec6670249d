"""Weights in and out of MONAI, research-contributions, VoCo, SAM / timm and Hugging Face-style folders.

Each foreign file is written by the package that defines the format where it is installed (MONAI `SwinUNETR`
state dicts, timm `samvit` state dicts) and by its documented key layout otherwise (research-contributions
`model_swinvit.pt`, VoCo releases and pretraining checkpoints, official SAM files) -- the layout then proven by the
reader that owns it (`SwinUNETR.load_from`, timm's SAM `checkpoint_filter_fn`). Random weights at tiny sizes; the
loaded encoder's outputs are compared with the reference model's on the same input (max |diff| printed, `-s`).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sslkit.errors import UserError
from sslkit.models import build_encoder
from sslkit.models.weights import (export_weights, from_pretrained, load_pretrained, load_pretrained_state,
                                   timm_model_args)
from sslkit.plan import make_plan, read_plan

monai_nets = pytest.importorskip("monai.networks.nets")
timm = pytest.importorskip("timm")

SWIN = dict(feature_size=12, depths=[1, 1, 1, 1])  # MONAI heads (3, 6, 12, 24), window 7 clipped at 32^3
SAM_TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4)
TIMM_TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=4, num_classes=0,
                 norm_layer=None)  # norm_layer None: timm builds LayerNorm(eps=1e-6) as SAM
TOL = 1e-5


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm scales around 1, everything else around 0), so a wrong or missing key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def max_diff(ours, ref) -> float:
    ours, ref = (list(ours), list(ref)) if isinstance(ours, (list, tuple)) else ([ours], [ref])
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape, (a.shape, b.shape)
    return max(float((a - b).abs().max()) for a, b in zip(ours, ref))


def report(name: str, diff: float, desc: str = "") -> None:
    print(f"\n[interop] {name}: max|diff| = {diff:.3g}" + (f"  <- {desc}" if desc else ""))


def swin_encoder(**kw):
    return build_encoder("swin_unetr", spatial_dims=3, in_channels=1, **{**SWIN, **kw}).eval()


def monai_swinunetr(seed: int, **kw):
    net = monai_nets.SwinUNETR(in_channels=1, out_channels=3, **{**SWIN, **kw})
    return randomize(net, seed)


def sam_encoder(img_size: int = 64, **kw):
    return build_encoder("sam_vit", spatial_dims=2, in_channels=3, img_size=img_size, input_range="none",
                         **{**SAM_TINY, **kw}).eval()


def timm_samvit(seed: int, img_size: int = 64, **kw):
    return randomize(timm.create_model("samvit_base_patch16", pretrained=False, img_size=img_size,
                                       **{**TIMM_TINY, **kw}), seed)


def tiny_plan(encoder, name: str, args: dict, spatial_dims: int, in_channels: int) -> dict:
    pre = {"spatial_dims": spatial_dims, "in_channels": in_channels, "slices": False,
           "axis_order": "CXYZ" if spatial_dims == 3 else "CXY", "orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
           "modality": "ct", "intensity": {"ct": {"scheme": "window", "window": [-175.0, 250.0]}},
           "crop_foreground": True, "crop_size": [32, 32, 32]}
    strides = [[2 ** (i + 1)] * spatial_dims for i in range(len(encoder.feature_channels))]
    return make_plan(name, args, pre, encoder.feature_channels, strides,
                     recipe={"name": "demo_ct_byol", "path": "pretrain_configs/demo_ct_byol.yaml", "sha256": "ab" * 32},
                     source={"kind": "pretrain", "run_dir": "/tmp/run", "step": 120},
                     corpus={"scans": 3, "modalities": {"ct": 1, "mri": 2}})


@pytest.fixture(scope="module")
def x3() -> torch.Tensor:
    return torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def x2() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))


def research_contributions_file(net) -> dict:
    """A MONAI SwinTransformer's weights nested as the research-contributions SSL model saved them
    (`model_swinvit.pt`): "module." + SwinTransformer key with the pre-release `mlp.fc1/fc2` names, beside the SSL
    heads, under "state_dict"."""
    sd = {"module." + k[len("swinViT."):].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."):
          v.clone() for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    dim = 16 * SWIN["feature_size"]
    sd.update({"module.norm.weight": torch.ones(dim), "module.norm.bias": torch.zeros(dim),
               "module.rotation_head.weight": torch.randn(4, dim), "module.rotation_head.bias": torch.zeros(4),
               "module.contrastive_head.weight": torch.randn(512, dim),
               "module.contrastive_head.bias": torch.zeros(512),
               "module.convTrans3d.weight": torch.randn(dim, 1, 4, 4, 4), "module.convTrans3d.bias": torch.zeros(1)})
    return {"state_dict": sd, "global_step": 100}


# ============================================================================================== weights in


def test_monai_swinunetr_state_dict_in(tmp_path, x3):
    net = monai_swinunetr(1)
    path = tmp_path / "swin_unetr_btcv.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 5, "best_acc": 0.8}, path)
    enc = swin_encoder()
    desc = load_pretrained(enc, path)
    with torch.no_grad():
        d = max_diff(enc(x3), net.swinViT(x3, True))
    report("MONAI SwinUNETR state dict -> ours", d, desc)
    n_decoder = sum(not k.startswith("swinViT.") for k in net.state_dict())
    assert "MONAI SwinUNETR state dict" in desc and f"dropped {n_decoder} tensors" in desc
    assert d < TOL


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_research_contributions_ssl_checkpoint_in(tmp_path, x3, prefix):
    net = monai_swinunetr(2)
    ckpt = research_contributions_file(net)
    # the layout is the one MONAI's SwinUNETR.load_from reads: a fresh model takes exactly net's encoder
    probe = monai_nets.SwinUNETR(in_channels=1, out_channels=3, **SWIN)
    probe.load_from(ckpt)
    assert all(torch.equal(v, net.swinViT.state_dict()[k]) for k, v in probe.swinViT.state_dict().items())
    if not prefix:
        ckpt = {"state_dict": {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}}
    path = tmp_path / "model_swinvit.pt"
    torch.save(ckpt, path)
    enc = swin_encoder()
    desc = load_pretrained(enc, path)
    with torch.no_grad():
        d = max_diff(enc(x3), net.swinViT(x3, True))
    report(f"research-contributions SSL ('{prefix}' prefix) -> ours", d, desc)
    n_enc = len(enc.state_dict())
    assert desc.startswith("MONAI Swin-UNETR SSL checkpoint (research-contributions format")
    assert f"{n_enc} tensors mapped to swinViT.*" in desc and "dropped 8 head tensors" in desc
    assert ("'module.' prefix" in desc) == bool(prefix)
    assert d < TOL
    # an SSLHead training checkpoint (main.py saves {"state_dict": model.state_dict()} of SSLHead under DDP)
    training = {f"module.swinViT.{k[len('swinViT.'):]}": v for k, v in net.state_dict().items()
                if k.startswith("swinViT.")}
    training.update({"module.rotation_head.weight": torch.randn(4, 192), "module.conv.0.weight": torch.randn(2, 2)})
    torch.save({"epoch": 1, "state_dict": training}, tmp_path / "model_final_epoch.pt")
    state, desc = load_pretrained_state(tmp_path / "model_final_epoch.pt", swin_encoder())
    assert desc.startswith("research-contributions SSLHead training checkpoint ('module.' prefix)")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items() if k.startswith("swinViT."))


def test_voco_layouts_in(tmp_path, x3):
    teacher, student = monai_swinunetr(3, use_v2=True), monai_swinunetr(4, use_v2=True)
    keep = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
    released = {k: v for k, v in teacher.state_dict().items() if k.startswith(keep)}  # VoCo_B_SSL_head.pt
    dp_10k = {"module." + k.replace("swinViT.", "swin_vit."): v for k, v in released.items()}  # VoCo_10k.pt spelling
    pretrain = {f"module.{branch}.{k}": v for branch, net in (("student", student), ("teacher", teacher))
                for k, v in net.state_dict().items() if k.startswith(keep)}  # VoCoHead under DDP
    pretrain["module.student.proj_head.layer1.0.weight"] = torch.randn(2048, 1152)
    with torch.no_grad():
        ref = teacher.swinViT(x3, True)
    for name, obj in (("released", released), ("10k", dp_10k), ("pretraining", {"state_dict": pretrain})):
        path = tmp_path / f"voco_{name}.pt"
        torch.save(obj, path)
        enc = swin_encoder(use_v2=True)
        desc = load_pretrained(enc, path)
        with torch.no_grad():
            d = max_diff(enc(x3), ref)
        report(f"VoCo {name} -> ours (use_v2)", d, desc)
        assert desc.startswith("VoCo") and d < TOL
    assert "teacher branch" in desc
    with pytest.raises(UserError, match="use_v2: true") as e:
        load_pretrained_state(tmp_path / "voco_released.pt", swin_encoder())
    assert "\n" not in str(e.value)


def test_timm_samvit_state_dict_in(tmp_path, x2):
    ref = timm_samvit(5, num_classes=5)  # a classifier head, dropped on the way in
    path = tmp_path / "model.safetensors"  # timm's hub format
    save_file(ref.state_dict(), str(path))
    enc = sam_encoder()
    desc = load_pretrained(enc, path)
    with torch.no_grad():
        d = max_diff(enc(x2)[-1], ref.forward_features(x2))
    report("timm samvit state dict -> ours", d, desc)
    assert desc.startswith("timm samvit") and "dropped 2 head tensors (head)" in desc and d < TOL


def test_timm_samvit_at_another_image_size_is_resampled(tmp_path, x2):
    ref = timm_samvit(6, img_size=128)  # trained at 128 px; timm resamples positions at run time, we at load time
    path = tmp_path / "samvit128.pth"
    torch.save(ref.state_dict(), path)
    enc = sam_encoder(64)
    desc = load_pretrained(enc, path)
    with torch.no_grad():
        d = max_diff(enc(x2)[-1], ref.forward_features(x2))
    report("timm samvit 128 px -> ours 64 px", d, desc)
    assert "pos_embed resampled 8x8 -> 4x4" in desc and d < TOL


@pytest.mark.parametrize("prefix,wrapper", [("", None), ("module.", None), ("model.", "model")])
def test_official_sam_layout_in(tmp_path, x2, prefix, wrapper):
    ref = timm_samvit(9)
    official = {"image_encoder." + k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2"): v
                for k, v in ref.state_dict().items()}
    official.update({"prompt_encoder.no_mask_embed.weight": torch.randn(1, 256),
                     "mask_decoder.iou_token.weight": torch.randn(1, 256)})
    # timm's own SAM filter reads this layout into samvit strictly: the layout is the official one
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    probe = timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, **TIMM_TINY)
    probe.load_state_dict(checkpoint_filter_fn(official, probe), strict=True)
    sd = {prefix + k: v for k, v in official.items()}  # MedSAM / SAM-Med2D style wrappers
    path = tmp_path / "medsam_vit_tiny.pth"
    torch.save({wrapper: sd, "epoch": 1} if wrapper else sd, path)
    enc = sam_encoder()
    desc = load_pretrained(enc, path)
    with torch.no_grad():
        d = max_diff(enc(x2)[-1], ref.forward_features(x2))
    report(f"official SAM layout ('{prefix}' prefix) -> ours", d, desc)
    assert desc.startswith("SAM checkpoint (official image_encoder.* layout") and "dropped 2 tensors" in desc
    assert (f"'{prefix}' prefix" in desc) == bool(prefix)
    assert d < TOL


def test_sslkit_files_in(tmp_path, x3):
    src = randomize(swin_encoder(), 10)
    plan = tiny_plan(src, "swin_unetr", SWIN, 3, 1)
    from sslkit.plan import write_weights

    write_weights(tmp_path / "encoder.safetensors", src.state_dict(), plan)
    save_file({"encoder." + k: v for k, v in src.state_dict().items()} | {"heads.0.proj.weight": torch.randn(4, 4)},
              str(tmp_path / "student.safetensors"))  # a checkpoint's student: encoder.* beside objective heads
    with torch.no_grad():
        ref = src(x3)
    for name in ("encoder.safetensors", "student.safetensors"):
        enc = swin_encoder()
        desc = load_pretrained(enc, tmp_path / name)
        with torch.no_grad():
            assert max_diff(enc(x3), ref) == 0.0
    assert "'encoder.' prefix" in desc and "dropped 1 tensors of other parts (heads)" in desc
    assert load_pretrained(swin_encoder(), tmp_path).startswith("sslkit encoder file (plan: swin_unetr, 3-D")


# ============================================================================================= weights out


def test_monai_export_loads_into_swinunetr(tmp_path, x3):
    enc = randomize(swin_encoder(), 11)
    plan = tiny_plan(enc, "swin_unetr", SWIN, 3, 1)
    for name in ("encoder_monai.pt", "encoder_monai.safetensors"):
        files = export_weights(enc, plan, tmp_path / name, "monai")
        args = json.loads(files[1].read_text())["SwinUNETR"]
        net = monai_nets.SwinUNETR(out_channels=4, **args).eval()
        sd = torch.load(files[0], weights_only=True) if name.endswith(".pt") else load_file(str(files[0]))
        missing, unexpected = net.load_state_dict(sd, strict=False)
        assert not unexpected and not [k for k in missing if k.startswith("swinViT.")] and missing
        with torch.no_grad():
            d = max_diff(net.swinViT(x3, True), enc(x3))
        report(f"ours -> monai ({name}) -> SwinUNETR.swinViT", d)
        assert d < TOL
    assert read_plan(tmp_path / "encoder_monai.safetensors") == plan


def test_monai_load_from_export(tmp_path, x3):
    enc = randomize(swin_encoder(), 12)
    plan = tiny_plan(enc, "swin_unetr", SWIN, 3, 1)
    out = tmp_path / "model_swinvit.pt"
    export_weights(enc, plan, out, "monai_load_from")
    net = monai_nets.SwinUNETR(in_channels=1, out_channels=2, **SWIN).eval()
    net.load_from(torch.load(out, weights_only=True))
    with torch.no_grad():
        d = max_diff(net.swinViT(x3, True), enc(x3))
        back = swin_encoder()
        desc = load_pretrained(back, out)
        d_back = max_diff(back(x3), enc(x3))
    report("ours -> load_from format -> SwinUNETR.load_from", d)
    report("ours -> load_from format -> ours", d_back, desc)
    assert d < TOL and d_back == 0.0 and desc.startswith("sslkit encoder file")
    v2 = swin_encoder(use_v2=True)
    with pytest.raises(UserError, match="layers\\{i\\}c"):
        export_weights(v2, plan, tmp_path / "v2.pt", "monai_load_from")


def test_timm_export_loads_strictly_with_equal_outputs(tmp_path):
    enc = randomize(build_encoder("sam_vit", spatial_dims=2, in_channels=1, img_size=64, **SAM_TINY), 13)
    plan = tiny_plan(enc, "sam_vit", {**SAM_TINY, "img_size": 64}, 2, 1)
    files = export_weights(enc, plan, tmp_path / "samvit_tiny.safetensors", "timm")
    side = json.loads(files[1].read_text())
    assert (side["model_name"], side["kwargs"]) == tuple(json.loads(json.dumps(timm_model_args(enc))))
    ref = timm.create_model(side["model_name"], pretrained=False, **side["kwargs"]).eval()
    ref.load_state_dict(load_file(str(files[0])), strict=True)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(14))  # grey, [0, 1]
    with torch.no_grad():
        d = max_diff(ref.forward_features(enc.normalize(x)), enc(x)[-1])
    report("ours -> timm samvit (strict)", d)
    assert d < TOL
    from sslkit.models.sam import add_adapters

    with pytest.raises(UserError, match="Adapter"):
        export_weights(add_adapters(enc), plan, tmp_path / "adapted.safetensors", "timm")


@pytest.mark.parametrize("family", ["swin_unetr", "sam_vit"])
def test_hf_folder_round_trip(tmp_path, family):
    if family == "swin_unetr":
        args, dims, chans = dict(SWIN), 3, 1
        x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(15))
    else:
        args, dims, chans = {**SAM_TINY, "img_size": 64, "adapters": True}, 2, 1  # MSA adapters travel too
        x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(15))
    enc = randomize(build_encoder(family, spatial_dims=dims, in_channels=chans, **args), 16)
    plan = tiny_plan(enc, family, args, dims, chans)
    health = {"effective_rank": 11.25, "embedding_std": 0.0712, "alarms": 0}
    out = tmp_path / "hf"
    export_weights(enc, plan, out, "hf", health=health)
    assert json.loads((out / "config.json").read_text()) == plan
    card = (out / "README.md").read_text()
    for fact in ("demo_ct_byol", "3 scans (ct: 1, mri: 2)", "optimizer steps: 120", "| effective_rank | 11.25 |",
                 "| embedding_std | 0.0712 |", "library_name: sslkit"):
        assert fact in card, fact
    for source in (out, out / "model.safetensors"):
        back = from_pretrained(source)
        assert type(back) is type(enc) and back.plan == plan and not back.training
        with torch.no_grad():
            d = max_diff(back(x), enc(x))
        report(f"ours -> hf folder -> from_pretrained ({family}, {source.name})", d)
        assert d == 0.0


# ================================================================================================== errors


def test_unknown_layout_is_one_line_naming_the_closest_format(tmp_path):
    resnet = {"conv1.weight": torch.randn(8, 1, 3, 3, 3), "bn1.weight": torch.ones(8), "fc.weight": torch.randn(2, 8)}
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pt")
    with pytest.raises(UserError) as e:
        load_pretrained_state(tmp_path / "resnet.pt", swin_encoder())
    msg = str(e.value)
    print(f"\n[interop] unknown layout: {msg}")
    assert "\n" not in msg and "resnet.pt" in msg and "not a known weights layout" in msg
    assert "closest: none of" in msg and "conv1.weight" in msg and "swinViT.patch_embed.proj.weight" in msg
    official = {"image_encoder." + k: v for k, v in sam_encoder().state_dict().items()}
    torch.save(official, tmp_path / "sam.pth")
    with pytest.raises(UserError) as e:
        load_pretrained_state(tmp_path / "sam.pth", swin_encoder())
    print(f"[interop] SAM file into Swin: {e.value}")
    assert "closest: official SAM (image_encoder.*)" in str(e.value) and "\n" not in str(e.value)


def test_mismatched_shapes_and_depths_are_one_line(tmp_path):
    torch.save(monai_swinunetr(17, feature_size=24).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(UserError) as e:
        load_pretrained_state(tmp_path / "wide.pt", swin_encoder())
    msg = str(e.value)
    print(f"\n[interop] wider file: {msg}")
    assert "\n" not in msg and "shape mismatch" in msg and "embedding width 24 in the file vs 12" in msg
    deep = monai_swinunetr(18, depths=[2, 2, 2, 2]).state_dict()
    torch.save(deep, tmp_path / "deep.pt")
    extra = sum(k.startswith("swinViT.") for k in deep) - len(swin_encoder().state_dict())  # the second blocks
    with pytest.raises(UserError) as e:
        load_pretrained_state(tmp_path / "deep.pt", swin_encoder())
    assert f"unexpected {extra}: swinViT.layers1.0.blocks.1" in str(e.value) and "depths differ" in str(e.value)
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="weights-only torch file"):
        load_pretrained_state(tmp_path / "pickled.pt", swin_encoder())
    with pytest.raises(UserError, match="not one of monai, monai_load_from, timm, hf"):
        export_weights(swin_encoder(), None, tmp_path / "x", "onnx")
