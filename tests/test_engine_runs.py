"""End-to-end engine runs through the CLI: SIGKILL + resume, export, bad input. Commands run in this process
(conftest.cli) except the killed run. (Two processes: tests/test_multinode.py and tests/test_dino_ibot.py.)"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CliChild, ckpt_tensors, cli, max_abs_diff, tiny_raw, write_cfg


@pytest.fixture(scope="module")
def reference_run(sgd_reference):
    """One process, micro-batch 2, 4 steps, through the CLI (the way a user runs it; conftest)."""
    return sgd_reference


def test_sigkill_then_resume_equals_uninterrupted(reference_run, tmp_path):
    ref_dir, cfg = reference_run
    run_dir = tmp_path / "run"
    proc = CliChild("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress", "--set",
                    "train.ckpt_every=2")
    first = run_dir / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "encoder.safetensors").exists()  # it really stopped mid-run

    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress",
                  "--set", "train.ckpt_every=2", "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    s_ref, t_ref = ckpt_tensors(ref_dir, 4)
    s_res, t_res = ckpt_tensors(run_dir, 4)
    assert max_abs_diff(s_ref, s_res) == 0.0
    assert max_abs_diff(t_ref, t_res) == 0.0
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert steps == [1, 2, 3, 4]  # lines past the checkpoint were replaced, not duplicated
    ref_loss = [json.loads(x)["loss"] for x in (ref_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    res_loss = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert res_loss == ref_loss


def test_export_command_writes_encoder(reference_run, tmp_path):
    from safetensors.torch import load_file

    ref_dir, _ = reference_run
    res = cli("export", "--run-dir", str(ref_dir), "--out", str(tmp_path / "enc.safetensors"))
    assert res.returncode == 0, res.stderr
    exported = load_file(str(tmp_path / "enc.safetensors"))
    assert max_abs_diff(exported, load_file(str(ref_dir / "encoder.safetensors"))) == 0.0


# --------------------------------------------------------------------------------------------- bad input


def _one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("sslkit: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_bad_config_and_paths(demo_dir, scan_cache, tmp_path):
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache), tmp_path / "c.yaml")
    _one_line_error(cli("pretrain", "--cfg", str(cfg), "--set", "train.max_step=3"),
                    "train.max_step", "did you mean 'train.max_steps'")
    _one_line_error(cli("pretrain", "--cfg", str(cfg), "--set", "optim.lr=fast"), "optim.lr", "number")
    _one_line_error(cli("pretrain", "--cfg", str(tmp_path / "missing.yaml")), "missing.yaml", "not found")
    _one_line_error(cli("pretrain", "--cfg", str(cfg), "--set", f"data.datalist={tmp_path}/none.json",
                            "--run-dir", str(tmp_path / "r")), "none.json")
    _one_line_error(cli("export", "--run-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")),
                    "nothing")


def test_bad_scans_are_skipped_and_recorded(demo_dir, scan_cache, tmp_path):
    """A corrupt scan, a truncated one, a 2-D image and a NaN volume in the datalist: the run records each in
    skipped.jsonl and trains on the rest."""
    import nibabel as nib

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.nii.gz").write_bytes(b"this is not a nifti file")
    good = (demo_dir / "ct_head.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.float32), np.eye(4)), str(bad / "flat.nii.gz"))
    vol = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    vol[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(bad / "nan.nii.gz"))
    entries = [{"image": str(demo_dir / "ct_head.nii.gz"), "modality": "ct"},
               {"image": str(demo_dir / "mri_colin27_t1.nii.gz"), "modality": "mri"}]
    entries += [{"image": str(bad / n)} for n in ("corrupt.nii.gz", "truncated.nii.gz", "flat.nii.gz",
                                                   "nan.nii.gz", "missing.nii.gz")]
    (tmp_path / "list.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    raw = tiny_raw(demo_dir, scan_cache, train={"max_steps": 2, "ckpt_every": 0},
                   data={"datalist": str(tmp_path / "list.json")})
    cfg = write_cfg(raw, tmp_path / "c.yaml")
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    names = {Path(s["path"]).name for s in skipped}
    assert names == {"corrupt.nii.gz", "truncated.nii.gz", "flat.nii.gz", "nan.nii.gz", "missing.nii.gz"}
    assert all(s["error"] for s in skipped)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("command", [[], ["pretrain"], ["export"], ["data"], ["data", "demo"], ["data", "index"],
                                     ["info"], ["dashboard"], ["probe"], ["finetune"], ["evaluate"], ["predict"]])
def test_every_subcommand_has_help(command):
    from sslkit.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0


def test_info_and_data_index(demo_dir, tmp_path):
    res = cli("info")
    assert res.returncode == 0 and "deepspeed" in res.stdout and "torch" in res.stdout
    res = cli("data", "index", str(demo_dir), "--out", str(tmp_path / "dl.json"))
    assert res.returncode == 0, res.stderr
    found = json.loads((tmp_path / "dl.json").read_text(encoding="utf-8"))["training"]
    assert any(e["image"].endswith("ct_head.nii.gz") for e in found)


def test_new_run_refuses_a_run_directory_with_checkpoints(reference_run):
    ref_dir, cfg = reference_run
    kept = {n: (ref_dir / n).read_bytes() for n in ("metrics.jsonl", "config.yaml", "encoder.safetensors")}
    _one_line_error(cli("pretrain", "--cfg", str(cfg), "--run-dir", str(ref_dir), "--set", "train.seed=9"),
                    str(ref_dir), "--resume auto")
    assert all((ref_dir / n).read_bytes() == b for n, b in kept.items())  # nothing already written is lost
