"""DINO and iBOT for 3-D encoders (issue 23): the loss against hand computations (centring, the teacher-temperature
schedule, iBOT's masked-token selection and the 3-D mask shape lightly would misread), the multi-crop data request
(a pure function of seed, epoch and index), a loss that falls on real CT crops, and engine runs of DINO + iBOT +
SMIT composed in one recipe: exact resume after SIGKILL and ZeRO-2 on 2 gloo ranks started by the DeepSpeed
launcher (one shared set of runs covers all three objectives; SMIT's own tests are in test_smit.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (CliChild, ckpt_tensors, cli, free_port, job_env, max_abs_diff, tiny_raw, tiny_swin,
                      train_objective, write_cfg)
from sslkit.data.multicrop import crop_boxes, token_masks
from sslkit.objectives.dino import DINO
from sslkit.objectives.distill import MaskToken, PatchDistillLoss, masked_features, views_to_batch, warmup_value
from sslkit.objectives.ibot import IBOT
from sslkit.objectives.registry import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def _ce(t_logits, s_logits, center, t_temp, s_temp=0.1):
    """-sum_k softmax((t - c) / T_t)_k log softmax(s / T_s)_k for one pair of vectors, in float64."""
    p = torch.softmax((t_logits.double() - center.double()) / t_temp, -1)
    return float(-(p * torch.log_softmax(s_logits.double() / s_temp, -1)).sum())


# ------------------------------------------------------------------------------------------ loss and schedule


def test_teacher_temperature_schedule_in_optimizer_steps():
    assert warmup_value(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert warmup_value(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert warmup_value(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert warmup_value(99, 0.04, 0.07, 30) == pytest.approx(0.07)
    # SMIT's patch temperature: held for the delay, then the same ramp
    assert [round(warmup_value(k, 0.04, 0.07, 2, delay_steps=3), 3) for k in range(7)] == \
        [0.04, 0.04, 0.04, 0.04, 0.055, 0.07, 0.07]
    obj = DINO(tiny_swin(), **SMALL, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=4,
               n_local=0)
    temps = []
    for step in range(1, 7):
        temps.append(obj.teacher_temp())
        obj.on_optimizer_step(step, 6)
    assert temps == pytest.approx([0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07])
    assert obj.teacher.updates == 6
    assert obj.teacher.tau == pytest.approx(1.0 - 0.004 * (math.cos(math.pi * 5 / 6) + 1) / 2)


def test_dino_loss_equals_hand_computation_with_centring():
    """The objective on 2 global + 2 local crops: teacher on globals only, all (teacher i, student j != i) pairs,
    the centre used then moved by 0.1 towards the mean teacher output; a second call uses the moved centre."""
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = DINO(enc, **SMALL, n_local=2, teacher_temp=0.05, center_momentum=0.9, tau_base=0.9)
    batch = {"global_crops": torch.rand(2, 2, 1, 32, 32, 32), "local_crops": torch.rand(2, 2, 1, 16, 16, 16)}
    with torch.no_grad():  # the teacher differs from the student after one update: both sides are checked
        for p in obj.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for call in range(2):
        center = obj.loss_fn.center.reshape(-1).clone()
        out = obj(batch, enc)
        with torch.no_grad():
            student = [obj.head(enc(v)[-1].flatten(2).mean(-1)) for v in
                       [*batch["global_crops"].unbind(1), *batch["local_crops"].unbind(1)]]
            t_enc, t_head = obj.teacher["encoder"], obj.teacher["head"]
            teacher = [t_head(t_enc(v)[-1].flatten(2).mean(-1)) for v in batch["global_crops"].unbind(1)]
        terms = [_ce(teacher[i][b], student[j][b], center, 0.05) for i in range(2) for j in range(4) if j != i
                 for b in range(2)]
        assert out.logs["dino"] == pytest.approx(sum(terms) / len(terms), rel=1e-5)
        want_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0)
        torch.testing.assert_close(obj.loss_fn.center.reshape(-1), want_center, rtol=1e-5, atol=1e-6)
        assert not torch.equal(obj.loss_fn.center.reshape(-1), center)
        torch.testing.assert_close(out.embeddings, F.normalize(obj.head.layers(
            enc(batch["global_crops"][:, 0])[-1].flatten(2).mean(-1)), dim=-1), rtol=1e-4, atol=1e-6)


def test_frozen_last_layer_gets_no_gradient_until_its_step():
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = DINO(enc, **SMALL, n_local=0, freeze_last_layer_steps=2)
    batch = {"global_crops": torch.rand(2, 2, 1, 32, 32, 32)}
    for step, frozen in ((0, True), (1, True), (2, False)):
        obj.steps_done.fill_(step)
        obj.zero_grad()
        obj(batch, enc).loss.backward()
        grad = obj.head.last_layer.weight_v.grad
        assert (grad is None or float(grad.abs().sum()) == 0.0) == frozen
        assert obj.head.last_layer.weight_g.grad is None  # norm_last_layer: g stays 1
        assert float(obj.head.layers[0].weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------ iBOT


def test_ibot_patch_loss_on_masked_tokens_and_the_3d_mask_pitfall():
    """Per image: the mean over its masked tokens of CE(teacher, student); images averaged (one without masked
    tokens adds 0); the centre moves towards the mean of *all* teacher tokens. lightly's IBOTPatchLoss, handed the
    3-D token mask as it is, would weight by masks summed over two axes only: a different number."""
    from lightly.loss import IBOTPatchLoss

    gen = torch.Generator().manual_seed(0)
    b, cells, k = 3, (2, 2, 2), 10
    teacher, student = torch.randn(b, 8, k, generator=gen), torch.randn(b, 8, k, generator=gen)
    mask = torch.zeros(b, *cells, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 1, 1, 1] = mask[0, 1, 0, 1] = True  # 3 masked tokens
    mask[1, :, :, 1] = True  # 4; image 2 has none
    flat = mask.flatten(1)
    loss_fn = PatchDistillLoss(k, student_temp=0.1, center_momentum=0.9)
    got = loss_fn(teacher, student[flat], flat, teacher_temp=0.07)
    zero = torch.zeros(k)
    per_image = [np.mean([_ce(teacher[i, n], student[i, n], zero, 0.07) for n in range(8) if flat[i, n]])
                 if flat[i].any() else 0.0 for i in range(b)]
    assert float(got) == pytest.approx(sum(per_image) / b, rel=1e-5)
    torch.testing.assert_close(loss_fn.center.reshape(-1), 0.1 * teacher.reshape(-1, k).mean(0))
    raw = IBOTPatchLoss(k, teacher_temp=0.07)(teacher[flat], student[flat], mask)  # (B, D, H, W) as it is
    assert abs(float(raw) - float(got)) > 1e-3
    # a micro-batch without any masked token: zero loss, a finite centre
    none = torch.zeros(b, 8, dtype=torch.bool)
    assert float(loss_fn(teacher, student[none], none, 0.07)) == 0.0
    assert bool(torch.isfinite(loss_fn.center).all())


def test_masked_features_replace_exactly_the_masked_tokens():
    torch.manual_seed(0)
    enc = tiny_swin()
    mask_token = MaskToken(enc)
    token = mask_token.token.detach()
    x = torch.rand(2, 1, 32, 32, 32)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 1] = mask[1, 0, 0, 0] = True
    with torch.no_grad():
        tokens = enc.embed(x)  # (2, 12, 16, 16, 16): one mask cell = 8^3 tokens
        want = tokens.clone()
        want[0, :, 8:, :8, 8:] = token[0, :, 0, 0, 0][:, None, None, None]
        want[1, :, :8, :8, :8] = token[0, :, 0, 0, 0][:, None, None, None]
        for a, b in zip(masked_features(enc, x, mask, mask_token), enc.forward_tokens(want)):
            torch.testing.assert_close(a, b)
        for a, b in zip(masked_features(enc, x, torch.zeros_like(mask), mask_token), enc(x)):
            torch.testing.assert_close(a, b)


def test_ibot_objective_wires_masks_tokens_and_heads():
    """iBOT = DINO on the masked globals' pooled deepest stage + the patch term on the stride-16 stage's masked
    tokens (a separate head); the teacher sees the globals unmasked."""
    torch.manual_seed(0)
    enc = tiny_swin()
    obj = IBOT(enc, **SMALL, n_local=0, patch_out_dim=48, teacher_patch_temp=0.06, patch_weight=0.5)
    g = torch.rand(2, 2, 1, 32, 32, 32)
    masks = torch.rand(2, 2, 2, 2, 2, generator=torch.Generator().manual_seed(1)) < 0.5
    out = obj({"global_crops": g, "masks": masks}, enc)
    assert obj.token_stage == 3 and obj.data_requests()["masks"] == {"patch": 16, "ratio": [0.1, 0.5], "prob": 0.5,
                                                                      "count": 2}
    with torch.no_grad():
        x, m = views_to_batch(g), views_to_batch(masks)
        s_tok = masked_features(enc, x, m, obj.mask_token)[3].flatten(2).transpose(1, 2)
        t_tok = obj.teacher["encoder"](x)[3].flatten(2).transpose(1, 2)
        s, t = obj.patch_head(s_tok), obj.teacher["patch_head"](t_tok)
        flat = m.flatten(1)
        per_image = [np.mean([_ce(t[i, n], s[i, n], torch.zeros(48), 0.06) for n in range(8) if flat[i, n]])
                     if flat[i].any() else 0.0 for i in range(4)]
    assert out.logs["patch"] == pytest.approx(np.mean(per_image), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(out.logs["dino"] + 0.5 * out.logs["patch"], rel=1e-5)
    assert out.logs["mask_fraction"] == pytest.approx(float(masks.float().mean()))


def test_ibot_needs_token_hooks_and_matching_widths():
    from sslkit.errors import ConfigError
    from sslkit.models import build_encoder

    punet = build_encoder("punet", spatial_dims=3, channels=[8, 16, 16, 32, 32], num_heads=2, num_classes=3,
                          prompt_tokens=2, bias_dim=4)
    with pytest.raises(ConfigError, match="token hooks"):
        build_objective({"name": "ibot", **SMALL}, punet)
    build_objective({"name": "dino", **SMALL, "n_local": 2}, punet)  # DINO only pools the deepest stage
    with pytest.raises(ConfigError, match="shared_head"):
        build_objective({"name": "ibot", **SMALL, "shared_head": True}, tiny_swin())
    with pytest.raises(ConfigError, match="no encoder stage"):
        build_objective({"name": "ibot", **SMALL, "mask_patch_size": 12}, tiny_swin())


# ------------------------------------------------------------------------------------------ multi-crop data


def test_crop_boxes_and_token_masks():
    rng = np.random.default_rng(0)
    starts, sizes = crop_boxes((48, 48, 30), 200, (0.05, 0.32), rng)
    frac = sizes.prod(1) / (48 * 48 * 30)
    assert frac.min() > 0.04 and frac.max() < 0.34 and (starts >= 0).all() and (starts + sizes <= [48, 48, 30]).all()
    masks = token_masks((3, 3, 3), 400, (0.2, 0.6), 0.5, np.random.default_rng(1))
    counts = masks.reshape(400, -1).sum(1)
    assert 0.4 < (counts == 0).mean() < 0.6  # half the masks are empty
    assert counts[counts > 0].min() >= math.ceil(0.2 * 27) and counts.max() <= math.ceil(0.6 * 27)
    assert (token_masks((6, 6, 6), 3, (0.7, 0.7), 1.0, rng).reshape(3, -1).sum(1) == 152).all()  # SMIT's 152


def test_multicrop_items_are_a_pure_function_of_seed_epoch_index(demo_dir, scan_cache):
    from sslkit.config import DataConfig
    from sslkit.data.datalist import load_datalist
    from sslkit.data.pretrain import PretrainDataset

    cfg = DataConfig(datalist=str(demo_dir / "datalist.json"), roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0],
                     crops_per_volume=2, cache_dir=str(scan_cache))
    cfg.views.noise_std = 0.02
    req = {"multicrop": {"n_global": 2, "n_local": 3, "local_size": 0.5, "region": 1.5, "global_scale": [0.32, 1.0],
                         "local_scale": [0.05, 0.32]},
           "masks": {"patch": 16, "ratio": [0.1, 0.5], "prob": 0.5, "count": 2}}

    def dataset():
        return PretrainDataset(load_datalist(cfg.datalist), cfg, scan_cache, seed=4, requests=req).prepare(False)

    a, b = dataset(), dataset()
    item = a[(3, 1)]
    assert item["global_crops"].shape == (2, 1, 32, 32, 32) and item["local_crops"].shape == (3, 1, 16, 16, 16)
    assert item["masks"].shape == (2, 2, 2, 2) and item["masks"].dtype == torch.bool
    assert "view1" not in item  # only what the objectives asked for
    for key in ("global_crops", "local_crops", "masks"):
        assert torch.equal(item[key], b[(3, 1)][key])  # another dataset object, same (seed, epoch, index)
    assert not torch.equal(item["global_crops"], a[(3, 2)]["global_crops"])  # next epoch: new crops
    assert not torch.equal(item["global_crops"][0], item["global_crops"][1])
    with pytest.raises(Exception, match="data.roi"):
        PretrainDataset([], DataConfig(roi=[40, 40, 40]), scan_cache, seed=0, requests={"masks": req["masks"]})


# ------------------------------------------------------------------------------------------ real scans


def test_dino_and_ibot_students_learn_their_teacher_on_real_ct_crops(demo_dir, scan_cache):
    """A tiny Swin-UNETR with DINO, then iBOT, over 12 Adam steps on one micro-batch of multi-crop CT crops from the
    data pipeline (2 global 32^3, 2 local 16^3 at 3 mm). With the teacher and the centre held (tau 1, centre
    momentum 1) the loss is a cross-entropy to fixed targets, and every term must fall: the student learns to
    match its teacher. (With both moving, a fixed batch's loss first falls, then rises as centring spreads the
    teacher's targets: not a test.)"""
    from sslkit.config import DataConfig
    from sslkit.data.datalist import load_datalist
    from sslkit.data.pretrain import PretrainDataset

    cfg = DataConfig(datalist=str(demo_dir / "datalist.json"), roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0],
                     crops_per_volume=2, cache_dir=str(scan_cache))
    req = {"multicrop": {"n_global": 2, "n_local": 2, "local_size": 0.5, "region": 1.5, "global_scale": [0.32, 1.0],
                         "local_scale": [0.05, 0.32]}, "masks": {"patch": 16, "ratio": [0.3, 0.6], "prob": 1.0,
                                                                 "count": 2}}
    ds = PretrainDataset(load_datalist(cfg.datalist), cfg, scan_cache, seed=0, requests=req).prepare(False)
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 4)])
    held = {**SMALL, "n_local": 2, "tau_base": 1.0, "center_momentum": 1.0}
    for spec, keys in (({"name": "dino", **held}, ("dino",)),
                       ({"name": "ibot", **held, "mask_ratio": [0.3, 0.6], "mask_prob": 1.0, "patch_out_dim": 64},
                        ("dino", "patch"))):
        logs = train_objective(spec, batch)
        for key in keys:
            values = [row[key] for row in logs]
            print(f"{spec['name']} {key}: {[round(v, 3) for v in values]}")
            assert all(math.isfinite(v) for v in values)
            assert np.mean(values[-3:]) < 0.8 * np.mean(values[:3]), (spec["name"], key, values)


# ------------------------------------------------------------------------------------------ engine runs

SGD = {"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999]}
_CROPS = {"n_local": 2, "local_size": 0.5, "region": 1.5}
_DISTILL = {**SMALL, "warmup_teacher_temp_steps": 2, "teacher_temp": 0.07, "freeze_last_layer_steps": 1,
            "tau_base": 0.9}
OBJECTIVES = [{"name": "dino", **_DISTILL, **_CROPS},
              {"name": "ibot", **_DISTILL, **_CROPS, "mask_ratio": [0.7, 0.7], "mask_prob": 1.0, "patch_out_dim": 48},
              {"name": "smit", **_DISTILL, "patch_temp_delay_steps": 1, "recon_stage": -2}]


def _raw(demo_dir, scan_cache, **train):
    return tiny_raw(demo_dir, scan_cache, optim=SGD, objectives=OBJECTIVES,
                    train={"ckpt_every": 2, "threads": 1, **train})


@pytest.fixture(scope="module")
def distill_reference(demo_dir, scan_cache, tmp_path_factory):
    """DINO + iBOT + SMIT in one recipe: one process (this one, one thread like the CLI runs below), micro-batch 2,
    4 SGD steps, checkpoints at steps 2 and 4."""
    from sslkit.config import config_from_dict
    from sslkit.engine.trainer import pretrain

    root = tmp_path_factory.mktemp("distill")
    raw = _raw(demo_dir, scan_cache)
    cfg = write_cfg(raw, root / "ref.yaml")
    pretrain(config_from_dict(raw), root / "run", progress=False)
    return root / "run", cfg


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_distillation_run_logs_every_term_and_schedule(distill_reference):
    rows = _rows(distill_reference[0])
    assert [r["ema_updates"] for r in rows] == [1, 2, 3, 4]
    assert [r["dino/teacher_temp"] for r in rows] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert [r["smit/teacher_patch_temp"] for r in rows] == pytest.approx([0.04, 0.04, 0.055, 0.07])
    for r in rows:
        for key in ("loss/dino", "loss/ibot", "ibot/patch", "smit/image", "smit/patch", "smit/recon",
                    "monitor/embedding_std"):
            assert math.isfinite(r[key]), (key, r)
    _, teacher = ckpt_tensors(distill_reference[0], 4)
    assert {k.split(".")[0] for k in teacher} == {"0", "1", "2"}  # one EMA teacher per objective


def test_distillation_sigkill_then_resume_equals_uninterrupted(distill_reference, tmp_path):
    """Killed after its step-2 checkpoint and resumed, the run ends bitwise where the uninterrupted one does:
    student (with the DINO / iBOT centres and step counters), all three teachers and every logged loss."""
    ref_dir, cfg = distill_reference
    run_dir = tmp_path / "run"
    proc = CliChild("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress")
    first = run_dir / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress", "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    s_ref, t_ref = ckpt_tensors(ref_dir, 4)
    s_res, t_res = ckpt_tensors(run_dir, 4)
    assert any("center" in k for k in s_ref) and any("steps_done" in k for k in s_ref)
    assert max_abs_diff(s_ref, s_res) == 0.0
    assert max_abs_diff(t_ref, t_res) == 0.0
    assert [r["loss"] for r in _rows(run_dir)] == [r["loss"] for r in _rows(ref_dir)]


def test_distillation_two_ranks_zero2_under_the_deepspeed_launcher_match_one_process(distill_reference, demo_dir,
                                                                                    scan_cache, tmp_path):
    """2 ranks x micro-batch 1 under ZeRO-2 see the same crops and masks per step as 1 rank x 2 (they are data, a
    function of the sample), and the centres are all-reduced means: student and teachers match. The ranks start the
    way docs/multinode.md documents for the DeepSpeed launcher (hostfile, --module, --no_local_rank) on a one-host
    hostfile with 2 slots, --no_ssh_check because this host is not reachable by ssh, which a real multi-node
    hostfile needs. (ZeRO-3, where the teachers' EMA meets partitioned parameters, under torchrun's two-node
    rendezvous: tests/test_multinode.py.)"""
    ref_dir, _ = distill_reference
    cfg = write_cfg(_raw(demo_dir, scan_cache, micro_batch_size=1, zero_stage=2), tmp_path / "z.yaml")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n", encoding="utf-8")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "--no_local_rank", "sslkit", "pretrain", "--cfg", str(cfg),
           "--run-dir", str(tmp_path / "run"), "--no-progress"]
    env = job_env(DS_ACCELERATOR="cpu", PATH=f"{deepspeed.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    s1, t1 = ckpt_tensors(ref_dir, 4)
    s2, t2 = ckpt_tensors(tmp_path / "run", 4)
    assert max_abs_diff(s1, s2) < 1e-5
    assert max_abs_diff(t1, t2) < 1e-5
    trainer = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "trainer.json").read_text("utf-8"))
    assert trainer["world_size"] == 2
    assert [r["ema_updates"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]
