"""BYOL math, the EMA teacher, and the engine's once-per-optimizer-step teacher under accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ckpt_tensors, max_abs_diff, tiny_raw
from sslkit.config import config_from_dict
from sslkit.engine.trainer import build_model, pretrain
from sslkit.models import build_encoder
from sslkit.objectives.byol import BYOL, byol_loss
from sslkit.objectives.teacher import EMATeacher, cosine_tau


def test_byol_loss_formula():
    torch.manual_seed(0)
    q, z = torch.randn(5, 8), torch.randn(5, 8)
    by_hand = torch.stack([2 - 2 * (q[i] @ z[i]) / (q[i].norm() * z[i].norm()) for i in range(5)]).mean()
    assert torch.allclose(byol_loss(q, z), by_hand, atol=1e-6)
    assert float(byol_loss(z, z)) == pytest.approx(0.0, abs=1e-6)


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(1 - 0.004 * 0.5)
    taus = [cosine_tau(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_teacher_update_is_an_ema_over_all_parameters():
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = EMATeacher({"net": student}, tau_base=0.9, schedule="constant")
    t0 = {k: v.clone() for k, v in teacher["net"].state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(6, 4))  # moves the student's BN statistics only
    teacher.update(step=1, total_steps=10)
    for (name, p), s in zip(teacher["net"].named_parameters(), student.parameters()):
        assert torch.allclose(p, 0.9 * t0[name] + 0.1 * s.detach(), atol=1e-6)
    # BatchNorm statistics are the teacher's own, not averaged from the student
    assert torch.equal(teacher["net"][1].running_mean, t0["1.running_mean"])
    assert teacher.updates == 1 and all(not p.requires_grad for p in teacher.modules.parameters())


def test_gradients_reach_student_and_heads_never_teacher():
    enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=12, depths=[1, 1, 1, 1])
    byol = BYOL(enc, hidden_dim=32, out_dim=16, head_norm="layer")
    x = {"view1": torch.randn(2, 1, 32, 32, 32), "view2": torch.randn(2, 1, 32, 32, 32)}
    byol(x, enc).loss.backward()
    assert all(p.grad is not None for p in byol.predictor.parameters())
    assert all(p.grad is not None for p in byol.projector.parameters())
    assert sum(p.grad is not None for p in enc.parameters()) > 0
    assert all(p.grad is None for p in byol.teacher.modules.parameters())
    # the teacher is not a registered submodule: it never reaches the optimizer
    own = {id(p) for p in byol.parameters()}
    assert not any(id(p) in own for p in byol.teacher.modules.parameters())


# ------------------------------------------------------------------------------- engine, accumulation


@pytest.fixture(scope="module")
def accum_runs(demo_dir, scan_cache, tmp_path_factory):
    """Same 4 optimizer steps: micro-batch 1 x accumulation 2, and micro-batch 2 without accumulation.

    SGD keeps the comparison sharp: Adam divides by sqrt(v) + eps, which turns float-rounding differences of
    near-zero gradients into weight differences of order lr.
    """
    root = tmp_path_factory.mktemp("accum")
    runs = {}
    for name, mb, k in (("accum", 1, 2), ("plain", 2, 1)):
        raw = tiny_raw(demo_dir, scan_cache, train={"micro_batch_size": mb, "grad_accum_steps": k},
                       optim={"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999]})
        runs[name] = pretrain(config_from_dict(raw), root / name, progress=False)
    return runs, raw


def test_teacher_updated_once_per_optimizer_step(accum_runs):
    runs, _ = accum_runs
    lines = [json.loads(x) for x in (runs["accum"].run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [m["micro_step"] for m in lines] == [2, 4, 6, 8]  # N = 8 micro-batches, k = 2
    assert [m["ema_updates"] for m in lines] == [1, 2, 3, 4]  # N / k updates, not N
    for m in lines:  # tau follows the schedule in optimizer steps
        assert m["ema_tau"] == pytest.approx(cosine_tau(m["step"] - 1, 4, 0.9))


def test_teacher_equals_hand_computed_ema_of_student(accum_runs):
    runs, raw = accum_runs
    run_dir = runs["accum"].run_dir
    torch.manual_seed(raw["train"]["seed"])  # the engine's initial weights
    init = build_model(config_from_dict(raw))
    keys = [k for k in init.state_dict() if k.startswith("encoder.") or k.startswith("objectives.objectives.0.projector.")]
    teacher = {k: init.state_dict()[k].double() for k in keys}
    for step in range(1, 5):
        student, _ = ckpt_tensors(run_dir, step)
        tau = cosine_tau(step - 1, 4, 0.9)
        teacher = {k: tau * teacher[k] + (1 - tau) * student[k].double() for k in keys}
    _, saved = ckpt_tensors(run_dir, 4)
    mapping = {"encoder.": "teacher.encoder.", "objectives.objectives.0.projector.": "teacher.projector."}
    worst = 0.0
    for k in keys:
        if "relative_position_index" in k:
            continue
        prefix = next(p for p in mapping if k.startswith(p))
        t_key = "0." + mapping[prefix] + k[len(prefix):]
        worst = max(worst, float((saved[t_key].double() - teacher[k]).abs().max()))
    assert worst < 1e-6
    assert int(saved["0.teacher._updates"]) == 4


def test_accumulation_equals_larger_micro_batch(accum_runs):
    runs, _ = accum_runs
    s_acc, t_acc = ckpt_tensors(runs["accum"].run_dir, 4)
    s_big, t_big = ckpt_tensors(runs["plain"].run_dir, 4)
    assert max_abs_diff(s_acc, s_big) < 1e-5
    assert max_abs_diff(t_acc, t_big) < 1e-5
    # and training really moved the weights (the comparison is not between two initial states)
    s1, _ = ckpt_tensors(runs["plain"].run_dir, 1)
    assert max_abs_diff(s1, s_big) > 1e-3


def test_run_directory_contents(accum_runs):
    runs, _ = accum_runs
    d = runs["plain"].run_dir
    assert (d / "config.yaml").is_file() and (d / "encoder.safetensors").is_file()
    assert list((d / "tb").glob("events.out.tfevents.*"))
    m = json.loads((d / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    for key in ("step", "micro_step", "epoch", "lr", "loss", "loss/byol", "ema_tau", "ema_updates",
                "samples_per_s", "time", "monitor/embedding_std", "update_to_weight", "grad_norm"):
        assert key in m, key
    assert math.isfinite(m["loss"]) and m["samples_per_s"] > 0
    ckpts = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert ckpts == [f"step_{s:08d}" for s in range(1, 5)]  # no temporary directories left behind
    from safetensors.torch import load_file

    from sslkit.engine.export import encoder_state

    exported = load_file(str(d / "encoder.safetensors"))
    weights, plan = encoder_state(d / "checkpoints" / "step_00000004")
    assert max_abs_diff(exported, weights) == 0.0 and plan["encoder"]["name"] == "swin_unetr"
    assert m["skipped_steps"] == 0 and m["eta_s"] == 0.0 and (d / "plan.json").is_file()


def test_exported_encoder_loads_into_monai_swin_unetr(accum_runs):
    from monai.networks.nets import SwinUNETR
    from safetensors.torch import load_file

    runs, _ = accum_runs
    sd = load_file(str(runs["plain"].run_dir / "encoder.safetensors"))
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all(not k.startswith("swinViT.") for k in missing)
    assert torch.equal(net.swinViT.patch_embed.proj.weight, sd["swinViT.patch_embed.proj.weight"])


def test_byol_loss_falls_on_real_scans(accum_runs):
    runs, _ = accum_runs
    losses = [json.loads(x)["loss"] for x in (runs["plain"].run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert losses[-1] < losses[0]


def test_bf16_zero1_run_and_resume(demo_dir, scan_cache, tmp_path):
    """bf16 under ZeRO-1: the run trains, the teacher stays fp32, and resuming from a middle checkpoint
    (optimizer partitions read with torch.load(weights_only=True)) ends with the same weights."""
    import shutil

    raw = tiny_raw(demo_dir, scan_cache, train={"precision": "bf16", "zero_stage": 1, "max_steps": 3})
    full = pretrain(config_from_dict(raw), tmp_path / "full", progress=False)
    assert full.steps == 3 and math.isfinite(full.last_metrics["loss"])
    s_full, t_full = ckpt_tensors(full.run_dir, 3)
    assert all(v.dtype == torch.float32 for k, v in t_full.items() if v.is_floating_point() and "._" not in k)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step_00000002", part / "checkpoints" / "step_00000002")
    resumed = pretrain(config_from_dict(raw), part, resume="auto", progress=False)
    assert resumed.steps == 3
    s_res, t_res = ckpt_tensors(part, 3)
    assert max_abs_diff(s_full, s_res) == 0.0 and max_abs_diff(t_full, t_res) == 0.0
