"""Issue 13's fault suite: runs that survive a cluster, and bad input at every entry point.

One test per case of the issue's list. Each asserts the exit code, the one line a user reads (`sslkit: error:`,
`sslkit: warning:`, the preemption line), and that nothing already written was lost. Runs go through
`sslkit.cli.main` as a user runs them, in this process (conftest.cli) except where a signal or a second process is
the point; faults that cannot be caused from outside (a NaN loss at a chosen step, a full disk mid-write) are
injected by patching one function for the call.

Exit codes: 2 user error (one line), 3 stopped by a non-finite step or an alarm, 75 stopped by a signal after
writing a checkpoint, 130 interrupted at once (a second Ctrl-C).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, CliChild, ckpt_tensors, cli, max_abs_diff, tiny_raw, write_cfg
from sslkit import run as R
from sslkit.errors import DataError

FINETUNE = REPO / "downstream" / "demo_mni_gm_wm.yaml"


# ------------------------------------------------------------------------------------------------ helpers


def _stderr_lines(res, prefix: str) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith(prefix)]


def _one_line(res, code: int, prefix: str, *needles: str) -> str:
    """The run exited with `code`, printed no traceback and exactly one stderr line starting with `prefix`,
    which holds every needle. Returns that line."""
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = _stderr_lines(res, prefix)
    assert len(lines) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _with_fault(monkeypatch, fault: str, value, *args: str):
    """`sslkit ARGS` in this process with one fault injected for the call (monkeypatch undoes it)."""
    import errno

    if fault == "nan_loss_at":  # the loss of these micro-batches (1-based) is NaN: a deterministic non-finite step
        from sslkit.engine import trainer

        steps, calls, forward = {int(s) for s in str(value).split(",")}, [0], trainer.SSLModel.forward

        def poisoned(self, batch):
            out = forward(self, batch)
            calls[0] += 1
            if calls[0] in steps:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(trainer.SSLModel, "forward", poisoned)
    elif fault == "free_bytes":  # the file system reports this many free bytes
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(value)))
    elif fault == "enospc_at":  # the n-th student weights file meets a full disk half-way
        from sslkit.engine import checkpoint

        calls, write = [0], checkpoint.write_weights

        def full(path, *a, **k):
            calls[0] += 1
            if calls[0] == int(value):
                with open(path, "wb") as f:
                    f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return write(path, *a, **k)

        monkeypatch.setattr(checkpoint, "write_weights", full)
    else:
        raise ValueError(fault)
    try:
        return cli(*args)
    finally:
        monkeypatch.undo()


def _wait_for(predicate, proc: CliChild | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, "the run ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _metrics_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in R.read_jsonl(run_dir / "metrics.jsonl")]


def _lock_holder_pid(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / R.RunLock.NAME).read_text(encoding="utf-8") or "{}").get("pid")
    except (OSError, ValueError):
        return None


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> blake2b of its bytes): 'nothing already written was lost'
    compares two."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _all_finite(run_dir: Path) -> bool:
    from safetensors.torch import load_file

    for ck in R.list_checkpoints(run_dir / R.CHECKPOINTS):
        for name in ("student.safetensors", "teacher.safetensors"):
            if (ck / name).is_file() and not all(bool(v.isfinite().all()) for v in load_file(str(ck / name)).values()):
                return False
    return True


def _copy_run(src: Path, dst: Path, steps: list[int]) -> Path:
    """A run directory holding `src`'s config, metrics and the checkpoints of `steps` (as a run killed then)."""
    (dst / R.CHECKPOINTS).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(src / name, dst / name)
    for s in steps:
        shutil.copytree(src / R.CHECKPOINTS / R.step_dir_name(s), dst / R.CHECKPOINTS / R.step_dir_name(s))
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`sslkit ARGS` in this process (commands that need no training): (exit code, stdout, stderr)."""
    from sslkit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _cli_one_line(capsys, code: int, prefix: str, *args: str) -> str:
    rc, out, err = _cli(capsys, *args)
    assert rc == code, (rc, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ref(sgd_reference):
    """The uninterrupted reference (conftest): one process, SGD, micro-batch 2, 4 steps, a checkpoint after every
    step."""
    return sgd_reference


@pytest.fixture(scope="module")
def sigterm_run(ref, tmp_path_factory):
    """A run stopped by SIGTERM after its first step, then `--resume auto`. It checkpoints only on the signal and at
    the end (ckpt_every 100), so the checkpoint it leaves is the signal's."""
    _, cfg = ref
    run_dir = tmp_path_factory.mktemp("faults-sigterm") / "run"
    args = ("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress", "--set", "train.ckpt_every=100")
    first = CliChild(*args)
    _wait_for(lambda: _metrics_steps(run_dir), first)
    first.send_signal(signal.SIGTERM)
    stopped = first.finish()
    kept = sorted(p.name for p in (run_dir / R.CHECKPOINTS).iterdir())
    resumed = cli(*args, "--resume", "auto")
    return {"run_dir": run_dir, "stopped": stopped, "kept_after_stop": kept, "resumed": resumed}


@pytest.fixture(scope="module")
def two_processes(ref, tmp_path_factory):
    """A second `sslkit pretrain` on the run directory of a first one that holds the lock (stopped with SIGSTOP
    meanwhile, so the second meets the lock whatever the machine's load); then the first is SIGKILLed, leaving its
    .lock file, and the directory gets the reference's step-2 checkpoint (as if the killed run had written it)
    before `--resume auto`."""
    ref_dir, cfg = ref
    run_dir = tmp_path_factory.mktemp("faults-lock") / "run"
    args = ("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress")
    first = CliChild(*args)
    _wait_for(lambda: _lock_holder_pid(run_dir) == first.pid and (run_dir / "config.yaml").is_file(), first)
    first.send_signal(signal.SIGSTOP)
    try:
        before = _snapshot(run_dir)
        second = cli(*args)  # flock: the lock of another process is held whichever process asks
        after = _snapshot(run_dir)
    finally:
        first.kill()
        first.wait()
    stale_pid = _lock_holder_pid(run_dir)
    shutil.copytree(ref_dir / R.CHECKPOINTS / "step_00000002", run_dir / R.CHECKPOINTS / "step_00000002")
    shutil.copy(ref_dir / "metrics.jsonl", run_dir / "metrics.jsonl")
    resumed = cli(*args, "--resume", "auto")
    return {"run_dir": run_dir, "first_pid": first.pid, "second": second, "unchanged": before == after,
            "stale_pid": stale_pid, "resumed": resumed}


# ------------------------------------------------------------------------------------------------ non-finite


def test_huge_lr_never_writes_a_nonfinite_checkpoint(demo_dir, scan_cache, tmp_path):
    """`--set optim.lr=1e6`: before, step 2's checkpoint held 96 % non-finite values marked healthy and the monitor
    died in a LinAlgError. Now no checkpoint holds a NaN / inf, the run ends with 0 or stops with 3 and one line,
    and the monitor raises no exception."""
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache), tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress", "--set", "optim.lr=1e6",
              "--set", "train.max_steps=3")  # one step past the one whose checkpoint was non-finite
    assert "Traceback" not in res.stderr and "LinAlgError" not in res.stderr, res.stderr[-4000:]
    assert res.returncode in (0, 3), res.stderr[-3000:]
    assert R.list_checkpoints(run_dir / R.CHECKPOINTS) and _all_finite(run_dir)  # the healthy one among them
    if res.returncode == 3:  # stopped: the reason is said
        assert any("non-finite" in ln for ln in res.stderr.splitlines()), res.stderr[-3000:]


def test_nonfinite_skip_counts_the_step_and_leaves_weights_and_teacher(ref, tmp_path, monkeypatch):
    """train.nonfinite: skip with a NaN loss at step 2 of 3: the step is counted in metrics.jsonl, the optimizer
    step and the EMA update are skipped (the checkpoint of step 2 equals step 1's exactly), step 3 trains again."""
    ref_dir, cfg = ref
    run_dir = tmp_path / "run"
    res = _with_fault(monkeypatch, "nan_loss_at", 2, "pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir),
                  "--no-progress", "--set", "train.max_steps=3", "--set", "train.nonfinite=skip")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = R.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert [r["ema_updates"] for r in rows] == [1.0, 1.0, 2.0]
    s1, t1 = ckpt_tensors(run_dir, 1)
    s2, t2 = ckpt_tensors(run_dir, 2)
    s3, t3 = ckpt_tensors(run_dir, 3)
    assert max_abs_diff(s1, s2) == 0.0 and max_abs_diff(t1, t2) == 0.0
    assert max_abs_diff(s2, s3) > 0.0 and max_abs_diff(t2, t3) > 0.0
    assert max_abs_diff(s1, ckpt_tensors(ref_dir, 1)[0]) == 0.0  # step 1 ran as in the reference
    assert _all_finite(run_dir)


def test_nonfinite_stop_exits_3_naming_the_last_finite_checkpoint(ref, tmp_path, monkeypatch):
    _, cfg = ref
    run_dir = tmp_path / "run"
    res = _with_fault(monkeypatch, "nan_loss_at", 2, "pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir),
                  "--no-progress", "--set", "train.nonfinite=stop")
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "non-finite" in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "step 2" in lines[0] and str(run_dir / R.CHECKPOINTS / "step_00000001") in lines[0], lines[0]
    assert [p.name for p in R.list_checkpoints(run_dir / R.CHECKPOINTS)] == ["step_00000001"]
    assert R.checkpoint_problem(run_dir / R.CHECKPOINTS / "step_00000001") is None
    assert not (run_dir / "encoder.safetensors").exists()
    assert _metrics_steps(run_dir) == [1]


# ------------------------------------------------------------------------------------------------ one run per dir


def test_second_process_on_a_run_dir_exits_2_naming_the_first(two_processes):
    """Before: both exited 0 with metrics.jsonl interleaved and config.yaml of one run over the other's weights.
    Now the second exits 2 naming the holder's PID and host, and changes no file."""
    r = two_processes
    _one_line(r["second"], 2, "sslkit: error:", str(r["run_dir"]), f"PID {r['first_pid']}",
              f"host {socket.gethostname()}")
    assert r["unchanged"]


def test_stale_lock_of_a_killed_run_never_blocks_resume(ref, two_processes):
    """The .lock file of the SIGKILLed first run stays (naming a process that is gone); the OS released its flock,
    so `--resume auto` runs and ends with the uninterrupted run's weights."""
    ref_dir, _ = ref
    r, run_dir = two_processes, two_processes["run_dir"]
    assert r["stale_pid"] == r["first_pid"]
    res = r["resumed"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run_dir / R.CHECKPOINTS / 'step_00000002'} at step 2" in res.stdout
    s_ref, t_ref = ckpt_tensors(ref_dir, 4)
    s, t = ckpt_tensors(run_dir, 4)
    assert max_abs_diff(s_ref, s) == 0.0 and max_abs_diff(t_ref, t) == 0.0
    assert _metrics_steps(run_dir) == [1, 2, 3, 4]
    assert _lock_holder_pid(run_dir) != r["first_pid"]  # the resumed run took the lock over


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_equals_uninterrupted(ref, sigterm_run):
    ref_dir, cfg = ref
    r, run_dir = sigterm_run, sigterm_run["run_dir"]
    line = _one_line(r["stopped"], 75, "sslkit: stopped by SIGTERM", "--resume auto", str(run_dir))
    assert "sslkit pretrain" in line
    kept = r["kept_after_stop"]
    assert len(kept) == 1 and kept[0].startswith("step_") and kept[0] != "step_00000004", kept
    stop_step = int(kept[0][5:])
    assert stop_step < 4 and R.checkpoint_problem(run_dir / R.CHECKPOINTS / kept[0]) is None
    s_ref, t_ref = ckpt_tensors(ref_dir, stop_step)
    s, t = ckpt_tensors(run_dir, stop_step)
    assert max_abs_diff(s_ref, s) == 0.0 and max_abs_diff(t_ref, t) == 0.0  # the signal's checkpoint
    res = r["resumed"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run_dir / R.CHECKPOINTS / kept[0]}" in res.stdout
    s_ref, t_ref = ckpt_tensors(ref_dir, 4)
    s, t = ckpt_tensors(run_dir, 4)
    assert max_abs_diff(s_ref, s) == 0.0 and max_abs_diff(t_ref, t) == 0.0  # student and teacher, exactly
    ref_rows, rows = R.read_jsonl(ref_dir / "metrics.jsonl"), R.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


@pytest.fixture(scope="module")
def signal_runs(ref, tmp_path_factory):
    """SIGUSR1, one SIGINT and two SIGINTs, each sent to its own run after its first step (the three run at once)."""
    _, cfg = ref
    root = tmp_path_factory.mktemp("faults-signals")
    runs = {}
    for name in ("SIGUSR1", "SIGINT", "SIGINT_TWICE"):
        run_dir = root / name
        runs[name] = (run_dir, CliChild("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress",
                                        "--set", f"train.ckpt_every={1 if name == 'SIGINT_TWICE' else 100}"))
    pending = dict(runs)
    while pending:
        for name, (run_dir, proc) in list(pending.items()):
            ready = (run_dir / R.CHECKPOINTS / "step_00000001" / R.COMPLETE).is_file() if name == "SIGINT_TWICE" \
                else bool(_metrics_steps(run_dir))
            if ready:
                proc.send_signal(signal.SIGUSR1 if name == "SIGUSR1" else signal.SIGINT)
                if name == "SIGINT_TWICE":
                    time.sleep(0.3)
                    proc.send_signal(signal.SIGINT)
                del pending[name]
            else:
                assert proc.poll() is None, f"{name}: the run ended before the signal"
        time.sleep(0.05)
    return {name: (run_dir, proc.finish()) for name, (run_dir, proc) in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGINT"])
def test_sigusr1_and_one_sigint_stop_like_sigterm(name, ref, signal_runs):
    """The scheduler's SIGUSR1 and one Ctrl-C: finish the step, write a checkpoint equal to the uninterrupted run's
    at that step, exit 75 with the resume line."""
    ref_dir, _ = ref
    run_dir, res = signal_runs[name]
    _one_line(res, 75, f"sslkit: stopped by {name}", "--resume auto", str(run_dir))
    found = R.list_checkpoints(run_dir / R.CHECKPOINTS)
    assert len(found) == 1 and R.checkpoint_problem(found[0]) is None
    step = R.checkpoint_step(found[0])
    assert step < 4 and _metrics_steps(run_dir) == list(range(1, step + 1))
    s_ref, t_ref = ckpt_tensors(ref_dir, step)
    s, t = ckpt_tensors(run_dir, step)
    assert max_abs_diff(s_ref, s) == 0.0 and max_abs_diff(t_ref, t) == 0.0
    assert not (run_dir / "encoder.safetensors").exists()


@pytest.mark.slow
def test_second_sigint_stops_at_once(signal_runs):
    run_dir, res = signal_runs["SIGINT_TWICE"]
    _one_line(res, 130, "sslkit: interrupted")
    assert not (run_dir / "encoder.safetensors").exists()
    assert max(_metrics_steps(run_dir)) < 4
    found = R.list_checkpoints(run_dir / R.CHECKPOINTS)
    assert found and all(R.checkpoint_problem(p) is None for p in found)  # what was written stays usable


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def fallback_run(ref, tmp_path_factory):
    """A killed run's directory: checkpoints 1-3 of the reference, step 3's student truncated, step 2's
    trainer.json missing, a `.tmp-step_00000004` folder of an interrupted write; then `--resume auto`."""
    ref_dir, cfg = ref
    run_dir = _copy_run(ref_dir, tmp_path_factory.mktemp("faults-fallback") / "run", [1, 2, 3])
    ckpts = run_dir / R.CHECKPOINTS
    _truncate(ckpts / "step_00000003" / "student.safetensors")
    (ckpts / "step_00000002" / "trainer.json").unlink()
    partial = ckpts / ".tmp-step_00000004"
    (partial / "ds").mkdir(parents=True)
    (partial / "student.safetensors").write_bytes(b"\0" * 1000)
    step1 = _snapshot(ckpts / "step_00000001")
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress", "--resume", "auto")
    return run_dir, res, step1


def test_corrupt_newest_checkpoints_fall_back_with_one_line_each(ref, fallback_run):
    """Before: `PytorchStreamReader failed` / `KeyError` / `FileNotFoundError` tracebacks, or a truncated student
    not noticed. Now one warning line per bad checkpoint (and one saying they were set aside), the run resumes
    from the newest valid one and ends with the uninterrupted run's weights."""
    ref_dir, _ = ref
    run_dir, res, _ = fallback_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    warnings = _stderr_lines(res, "sslkit: warning:")
    assert len(warnings) == 3, res.stderr[-3000:]
    assert "step_00000003" in warnings[0] and "student.safetensors" in warnings[0] and "bytes" in warnings[0]
    assert "step_00000002" in warnings[1] and "trainer.json is missing" in warnings[1]
    assert "the 2 newer checkpoint(s) moved to" in warnings[2]  # set aside (kept), never resumed from again
    assert sorted(p.name for p in (run_dir / R.CHECKPOINTS / "abandoned").iterdir()) == ["step_00000002",
                                                                                       "step_00000003"]
    assert f"resumed from {run_dir / R.CHECKPOINTS / 'step_00000001'} at step 1" in res.stdout
    s_ref, t_ref = ckpt_tensors(ref_dir, 4)
    s, t = ckpt_tensors(run_dir, 4)
    assert max_abs_diff(s_ref, s) == 0.0 and max_abs_diff(t_ref, t) == 0.0
    assert _metrics_steps(run_dir) == [1, 2, 3, 4]


def test_leftover_temporary_checkpoint_folder_is_removed_at_start(fallback_run):
    run_dir, res, step1 = fallback_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list((run_dir / R.CHECKPOINTS).glob(".tmp-*"))
    assert _snapshot(run_dir / R.CHECKPOINTS / "step_00000001") == step1  # the valid one resumed from: untouched


def test_corrupt_checkpoint_named_by_hand_and_pruning(ref, tmp_path, capsys):
    """`export --checkpoint` and `--resume PATH` on a corrupt checkpoint exit 2 with one line and change nothing;
    resuming by hand from an older one sets the newer ones aside (checkpoints/abandoned/, nothing deleted), so a
    later `--resume auto` continues the resumed run, and pruning counts only the valid checkpoints of that run."""
    ref_dir, cfg = ref
    run_dir = _copy_run(ref_dir, tmp_path / "run", [1, 2, 3, 4])
    ckpts = run_dir / R.CHECKPOINTS
    _truncate(ckpts / "step_00000004" / "student.safetensors")
    before = _snapshot(run_dir)

    line = _cli_one_line(capsys, 2, "sslkit: error:", "export", "--run-dir", run_dir, "--checkpoint",
                         ckpts / "step_00000004", "--out", tmp_path / "enc.safetensors")
    assert "step_00000004" in line and "student.safetensors" in line
    assert not (tmp_path / "enc.safetensors").exists()
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress",
                  "--resume", str(ckpts / "step_00000004"))
    _one_line(res, 2, "sslkit: error:", "step_00000004", "not a usable checkpoint")
    assert _snapshot(run_dir) == before  # neither refusal changed a byte

    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(run_dir), "--no-progress",
                  "--resume", str(ckpts / "step_00000001"), "--set", "train.max_steps=2", "--set", "train.keep_last=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 newer checkpoint(s) moved to" in res.stderr  # the abandoned future is set aside, not deleted
    assert sorted(p.name for p in (ckpts / "abandoned").iterdir()) == ["step_00000002", "step_00000003",
                                                                      "step_00000004"]
    valid = [p.name for p in R.list_checkpoints(ckpts) if R.checkpoint_problem(p) is None]
    assert valid == ["step_00000002"]  # the one just written; keep_last 1 pruned step 1
    assert R.newest_valid_checkpoint(ckpts) == ckpts / "step_00000002"


# ------------------------------------------------------------------------------------------------ disk full


@pytest.mark.parametrize("fault", ["free_bytes", "enospc_at"])
def test_full_disk_one_line_previous_checkpoint_intact(fault, ref, tmp_path, monkeypatch):
    """free_bytes: the free-space check before step 2's checkpoint refuses; enospc_at: step 2's student file meets
    a full disk half-way. Before: two chained C++ tracebacks and a `.tmp-step_*` folder left behind."""
    _, cfg = ref
    run_dir = tmp_path / "run"
    res = _with_fault(monkeypatch, fault, 123_456 if fault == "free_bytes" else 2, "pretrain", "--cfg", str(cfg),
                  "--run-dir", str(run_dir), "--no-progress", "--set", "train.max_steps=3")
    line = _one_line(res, 2, "sslkit: error:", str(run_dir / R.CHECKPOINTS), "disk full", "bytes")
    if fault == "free_bytes":
        assert "123,456 are free" in line
        size = R.checkpoint_bytes(run_dir / R.CHECKPOINTS / "step_00000001")
        assert f"{size:,} bytes" in line  # what the next one needs: the size of the last one
    else:
        assert "step_00000001 is intact" in line
    assert [p.name for p in R.list_checkpoints(run_dir / R.CHECKPOINTS)] == ["step_00000001"]
    assert R.checkpoint_problem(run_dir / R.CHECKPOINTS / "step_00000001") is None
    assert not list((run_dir / R.CHECKPOINTS).glob(".tmp-*"))


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_full_disk_on_a_real_tmpfs(ref, tmp_path):
    """A real small file system: 10 MB cannot hold the first checkpoint (about 17 MB: the writers fail mid-file,
    safetensors with 'os error 28', torch.save with stream errors); 26 MB holds one, and the check before the
    second refuses. One line each, no partial folder."""
    _, cfg = ref
    small, medium = tmp_path / "small", tmp_path / "medium"
    if not (_mount_tmpfs(small, "10m") and _mount_tmpfs(medium, "26m")):
        pytest.skip("mounting a tmpfs needs root")
    try:
        res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(small / "run"), "--no-progress",
                      "--set", "train.max_steps=2")
        _one_line(res, 2, "sslkit: error:", str(small / "run" / R.CHECKPOINTS), "disk full", "bytes are free",
                  "no checkpoint was written yet")
        assert not (small / "run").exists()  # a run that wrote no checkpoint leaves nothing behind

        res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(medium / "run"), "--no-progress",
                      "--set", "train.max_steps=2")
        _one_line(res, 2, "sslkit: error:", str(medium / "run" / R.CHECKPOINTS), "disk full", "needs about")
        ckpts = medium / "run" / R.CHECKPOINTS
        assert [p.name for p in R.list_checkpoints(ckpts)] == ["step_00000001"]
        assert R.checkpoint_problem(ckpts / "step_00000001") is None and not list(ckpts.glob(".tmp-*"))
    finally:
        for m in (small, medium):
            subprocess.run(["umount", str(m)], capture_output=True)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("case", ["micro_batch_1_batchnorm", "negative_lr", "fp16_on_cpu", "duplicate_key"])
def test_bad_config_is_one_line_before_any_scan_is_prepared(case, demo_dir, tmp_path):
    """Before: tracebacks (BatchNorm 'Expected more than 1 value per channel', fp16 on CPU), a negative lr refused
    only after the corpus was prepared, a duplicate `train:` silently dropping the first. Now one line naming the
    key, exit 2, the scan cache never created and no run directory left."""
    cache = tmp_path / "cache"
    raw = tiny_raw(demo_dir, cache)
    cfg = write_cfg(raw, tmp_path / "c.yaml")
    sets, needles = [], []
    if case == "micro_batch_1_batchnorm":
        sets, needles = ["train.micro_batch_size=1", "objectives.0.head_norm=batch"], ["train.micro_batch_size",
                                                                                        "BatchNorm"]
    elif case == "negative_lr":
        sets, needles = ["optim.lr=-0.001"], ["optim.lr", "positive"]
    elif case == "fp16_on_cpu":
        sets, needles = ["train.precision=fp16", "train.device=cpu"], ["train.precision", "fp16"]
    else:
        text = cfg.read_text(encoding="utf-8")
        cfg.write_text(text + "train:\n  max_steps: 2\n", encoding="utf-8")
        first = 1 + text.splitlines().index("train:")
        needles = [str(cfg), "'train'", f"lines {first} and {len(text.splitlines()) + 1}"]
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress",
                  *[a for s in sets for a in ("--set", s)])
    _one_line(res, 2, "sslkit: error:", *needles)
    assert not cache.exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ readers


def _dicom_series(folder: Path, img: sitk.Image, uid: str = "1.2.826.0.1.3680043.2.1125.1.7", first: int = 0,
                  positions: list[float] | None = None, tags: dict[str, str] | None = None) -> Path:
    """One DICOM file per axial slice of a 3-D int16 image with the position / orientation tags a scanner writes.
    positions: the (fractional) slice index whose position each file claims (default: its own); tags: more
    header tags for every file."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    orient = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(img.GetDepth()):
        at = float(positions[k] if positions else k)
        sl = img[:, :, k]
        header = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".1", "0020|0037": orient,
                  "0020|0013": str(k + 1), "0008|0018": f"{uid}.2.{first + k + 1}",
                  "0018|0050": str(img.GetSpacing()[2]),
                  "0020|0032": "\\".join(str(v) for v in img.TransformContinuousIndexToPhysicalPoint((0, 0, at))),
                  **(tags or {})}
        for tag, value in header.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"im{first + k:03d}.dcm"))
        writer.Execute(sl)
    return folder


@pytest.fixture(scope="module")
def ct_block(demo_dir) -> sitk.Image:
    """A real 40 x 32 x 12 block of the demo head CT (int16, LPS geometry)."""
    img = sitk.ReadImage(str(demo_dir / "ct_head.nii.gz"))
    return sitk.Cast(img[100:140, 110:142, 50:62], sitk.sitkInt16)


def test_dicom_missing_slice_is_one_line_naming_the_gap(ct_block, tmp_path):
    """Before: read with a uniform spacing across the gap (every voxel behind it misplaced)."""
    from sslkit.data.readers import load_scan

    folder = _dicom_series(tmp_path / "gap", ct_block)
    (folder / "im005.dcm").unlink()
    with pytest.raises(DataError) as e:
        load_scan(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "1 missing slice" in msg
    assert "im004.dcm" in msg and "im006.dcm" in msg and "3.00 mm" in msg and "1.50 mm apart" in msg

    uneven = _dicom_series(tmp_path / "uneven", ct_block[:, :, :6], positions=[0, 1, 2, 3, 4, 5.5])
    with pytest.raises(DataError) as e:
        load_scan(uneven)
    msg = str(e.value)
    assert "uneven slice spacing" in msg and str(uneven) in msg and "2.25 mm" in msg and "1.50 mm apart" in msg


def test_dicom_duplicates_copies_dropped_with_a_warning_others_refused(ct_block, tmp_path, capsys):
    from sslkit.data.readers import load_scan

    clean = load_scan(_dicom_series(tmp_path / "clean", ct_block))
    copies = _dicom_series(tmp_path / "copies", ct_block)
    shutil.copy(copies / "im004.dcm", copies / "im004_copy.dcm")
    capsys.readouterr()
    got = load_scan(copies)
    err = capsys.readouterr().err
    assert got.shape == clean.shape == (40, 32, 12)
    np.testing.assert_array_equal(got.array, clean.array)
    np.testing.assert_allclose(got.affine, clean.affine, atol=1e-4)
    warn = [ln for ln in err.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(warn) == 1 and str(copies) in warn[0] and "im004_copy.dcm" in warn[0] and "byte-identical" in warn[0]

    clash = _dicom_series(tmp_path / "clash", ct_block, positions=[0, 1, 2, 3, 4, 5, 5, 7, 8, 9, 10, 11])
    with pytest.raises(DataError) as e:
        load_scan(clash)
    msg = str(e.value)
    assert str(clash) in msg and "im005.dcm" in msg and "im006.dcm" in msg and "same position" in msg


def test_dicom_mixed_series_use_the_largest_with_a_warning_a_tie_refused(ct_block, tmp_path, capsys):
    from sslkit.data.readers import check_dicom_series, load_scan

    folder = _dicom_series(tmp_path / "mixed", ct_block, uid="1.2.826.0.1.3680043.2.1125.1.7")
    _dicom_series(folder, ct_block[:, :, :5], uid="1.2.826.0.1.3680043.2.1125.1.8", first=100)
    capsys.readouterr()
    scan = load_scan(folder)
    warn = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sslkit: warning:")]
    assert scan.shape == (40, 32, 12)
    assert len(warn) == 1 and "2 DICOM series" in warn[0] and "1.2.826.0.1.3680043.2.1125.1.7 (12 files)" in warn[0]
    assert "ignoring 1 other(s) of 5 file(s)" in warn[0]
    assert check_dicom_series(folder).uid == "1.2.826.0.1.3680043.2.1125.1.7"

    tie = _dicom_series(tmp_path / "tie", ct_block[:, :, :6], uid="1.2.826.0.1.3680043.2.1125.1.9")
    _dicom_series(tie, ct_block[:, :, 6:], uid="1.2.826.0.1.3680043.2.1125.1.10", first=100)
    with pytest.raises(DataError) as e:
        load_scan(tie)
    assert str(tie) in str(e.value) and "2 DICOM series" in str(e.value) and "own folder" in str(e.value)


def test_nifti_not_gzip_and_nan_voxels_are_one_line_each(tmp_path):
    from sslkit.data.readers import load_scan

    vol = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(plain))
    named_gz = tmp_path / "plain_named.nii.gz"
    shutil.copy(plain, named_gz)
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image", encoding="utf-8")
    nan = vol.copy()
    nan[2:5, 3:7, 4:6] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full_like(vol, np.nan), np.eye(4)), str(tmp_path / "allnan.nii.gz"))
    cases = {named_gz: "rename it .nii", text: "not gzip-compressed",
             tmp_path / "nan.nii.gz": "24 NaN/inf voxels (0.3% of the image, within x 2..4, y 3..6, z 4..5)",
             tmp_path / "allnan.nii.gz": "all 8,000 voxels are NaN/inf"}
    for path, words in cases.items():
        with pytest.raises(DataError) as e:
            load_scan(path)
        assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert load_scan(plain).shape == (20, 20, 20)


def test_data_index_warns_per_broken_series_and_keeps_going(ct_block, tmp_path, capsys):
    root = tmp_path / "scans"
    _dicom_series(root / "good", ct_block)
    (_dicom_series(root / "gap", ct_block) / "im005.dcm").unlink()
    _dicom_series(root / "clash", ct_block, positions=[0, 1, 2, 3, 4, 5, 5, 7, 8, 9, 10, 11])
    mixed = _dicom_series(root / "mixed", ct_block, uid="1.2.826.0.1.3680043.2.1125.1.7")
    _dicom_series(mixed, ct_block[:, :, :4], uid="1.2.826.0.1.3680043.2.1125.1.8", first=100)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(root / "vol.nii.gz"))
    out = tmp_path / "dl.json"
    rc, stdout, err = _cli(capsys, "data", "index", root, "--out", out)
    assert rc == 0 and "Traceback" not in err, err
    warns = [ln for ln in err.splitlines() if ln.startswith("sslkit: warning:")]
    assert len(warns) == 3, err
    assert any(str(root / "gap") in w and "missing slice" in w and w.endswith("left out") for w in warns)
    assert any(str(root / "clash") in w and "same position" in w and w.endswith("left out") for w in warns)
    assert any(str(mixed) in w and "2 DICOM series" in w for w in warns)
    listed = sorted(Path(e["image"]).name for e in json.loads(out.read_text(encoding="utf-8"))["training"])
    assert listed == ["good", "mixed", "vol.nii.gz"]
    assert "3 scans" in stdout and "2 left out" in stdout


# ------------------------------------------------------------------------------------------------ downstream


def _finetune_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["finetune", "--cfg", str(FINETUNE), "--run-dir", str(run_dir), "--no-progress",
            "--set", "data.layout=datalist", "--set", f"data.root={data}", "--set", "train.max_steps=4",
            "--set", "train.val_every=1", "--set", "data.spacing=[4,4,4]", "--set", "train.threads=1", *extra]


def _hemispheres(demo_dir: Path, folder: Path) -> Path:
    """The demo's MNI152 hemispheres (train left, validate right) as a datalist in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("mni_left", "mni_left_label", "mni_right", "mni_right_label"):
        shutil.copy(demo_dir / "halves" / f"{f}.nii.gz", folder / f"{f}.nii.gz")
    dl = {"training": [{"image": "mni_left.nii.gz", "label": "mni_left_label.nii.gz"}],
          "validation": [{"image": "mni_right.nii.gz", "label": "mni_right_label.nii.gz"}]}
    (folder / "dl.json").write_text(json.dumps(dl), encoding="utf-8")
    return folder / "dl.json"


@pytest.fixture(scope="module")
def finetuned(demo_dir, tmp_path_factory):
    """A 4-step fine-tuning run on the demo hemispheres from a (random, seeded) encoder file, a checkpoint and a
    validation every step: (run, datalist, encoder)."""
    import torch
    from safetensors.torch import save_file

    from sslkit.models import build_encoder

    root = tmp_path_factory.mktemp("faults-finetune")
    if not (demo_dir / "halves" / "mni_left.nii.gz").is_file():
        from sslkit.data.demo import build_mni_gm_wm

        build_mni_gm_wm(demo_dir)
    data = _hemispheres(demo_dir, root / "data")
    encoder = root / "encoder.safetensors"
    torch.manual_seed(5)
    save_file(build_encoder("qt_unet", variant="tiny", window_size=4).state_dict(), str(encoder))
    res = cli(*_finetune_args(data, root / "run", "--encoder", str(encoder)))
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run", data, encoder


@pytest.mark.slow
def test_finetune_sigterm_exits_75_and_the_printed_line_resumes_to_the_uninterrupted_run(finetuned, tmp_path,
                                                                                         monkeypatch):
    """SIGTERM mid-run: a checkpoint, exit 75 and one line whose `continue with:` command, typed in another folder,
    continues with the run's own config, --set values and encoder (before: it left out every --set and --encoder,
    and following it exited 2), and ends bitwise where the uninterrupted run does."""
    import shlex

    import yaml
    from safetensors.torch import load_file

    from sslkit.plan import read_plan

    ref_dir, data, encoder = finetuned
    run_dir = tmp_path / "run"
    proc = CliChild(*_finetune_args(data, run_dir, "--encoder", str(encoder)))
    _wait_for(lambda: _metrics_steps(run_dir), proc)
    proc.send_signal(signal.SIGTERM)
    line = _one_line(proc.finish(), 75, "sslkit: stopped by SIGTERM")
    printed = line.split("continue with: ", 1)[1]
    assert printed == f"sslkit finetune --run-dir {shlex.quote(str(run_dir))} --resume auto"
    found = R.list_checkpoints(run_dir / R.CHECKPOINTS)
    assert found and R.checkpoint_step(found[-1]) < 4 and R.checkpoint_problem(found[-1]) is None
    assert max(_metrics_steps(run_dir)) == R.checkpoint_step(found[-1])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = cli(*shlex.split(printed)[1:], cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {found[-1]}" in res.stdout
    name = R.step_dir_name(4)
    a = load_file(str(ref_dir / R.CHECKPOINTS / name / "model.safetensors"))
    b = load_file(str(run_dir / R.CHECKPOINTS / name / "model.safetensors"))
    assert max_abs_diff(a, b) == 0.0
    assert [r["loss"] for r in R.read_jsonl(run_dir / "metrics.jsonl")] == \
        [r["loss"] for r in R.read_jsonl(ref_dir / "metrics.jsonl")]
    used = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert used["data"]["root"] == str(data) and used["model"]["init_from"] == str(encoder)
    assert read_plan(run_dir / "model.safetensors")["source"]["encoder"] == str(encoder)


@pytest.fixture(scope="module")
def bad_inputs(demo_dir, ct_block, tmp_path_factory) -> dict[str, Path]:
    """Scans a user might hand to `sslkit predict`, each wrong in one way."""
    d = tmp_path_factory.mktemp("faults-inputs")
    img = nib.load(str(demo_dir / "mri_mni152_t1.nii.gz"))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(arr[:, :, arr.shape[2] // 2], img.affine), str(d / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(arr, img.affine), str(d / "plain.nii"))
    shutil.copy(d / "plain.nii", d / "not_gzip.nii.gz")
    block = arr.copy()
    block[30:40, 30:40, 30:40] = np.nan
    nib.save(nib.Nifti1Image(block, img.affine), str(d / "nan_block.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(arr.shape, np.nan, np.float32), img.affine), str(d / "all_nan.nii.gz"))
    (_dicom_series(d / "gap_series", ct_block) / "im005.dcm").unlink()
    return {"2d": (d / "flat.nii.gz", "2-D image"),
            "not_gzip": (d / "not_gzip.nii.gz", "not gzip-compressed (it is an uncompressed NIfTI: rename it .nii)"),
            "nan_block": (d / "nan_block.nii.gz", "1,000 NaN/inf voxels"),
            "all_nan": (d / "all_nan.nii.gz", f"all {arr.size:,} voxels are NaN/inf"),
            "missing_slice": (d / "gap_series", "1 missing slice")}


@pytest.mark.parametrize("case", ["2d", "not_gzip", "nan_block", "all_nan", "missing_slice"])
def test_predict_refuses_bad_input_with_one_line(case, finetuned, bad_inputs, tmp_path, capsys):
    """Before: tracebacks (2-D, wrong gzip) or exit 0 with a silently wrong map (NaN voxels: all background;
    a missing slice: uniform spacing across the gap). Now exit 2, one line naming the file, nothing written."""
    ref_dir, _, _ = finetuned
    path, words = bad_inputs[case]
    line = _cli_one_line(capsys, 2, "sslkit: error:", "predict", "--ckpt", ref_dir, "--input", path,
                         "--output", tmp_path / "preds")
    assert str(path) in line and words in line, line
    assert not (tmp_path / "preds").exists() or not list((tmp_path / "preds").iterdir())


def test_label_on_another_grid_finetune_and_evaluate(finetuned, demo_dir, tmp_path, capsys):
    """A validation label cropped by 10 voxels: `finetune` exits 2 with one line naming both files before any
    training; `evaluate` of a run whose label was later replaced does the same (before: a MONAI traceback)."""
    ref_dir, data, _ = finetuned
    bad = _hemispheres(demo_dir, tmp_path / "data")
    label = bad.parent / "mni_right_label.nii.gz"
    lab = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :-10], lab.affine, lab.header), str(label))
    res = cli(*_finetune_args(bad, tmp_path / "run"))
    _one_line(res, 2, "sslkit: error:", str(label), str(bad.parent / "mni_right.nii.gz"), "shape")
    assert not (tmp_path / "run").exists()

    original = data.parent / "mni_right_label.nii.gz"
    kept = original.read_bytes()
    try:
        shutil.copy(label, original)
        line = _cli_one_line(capsys, 2, "sslkit: error:", "evaluate", ref_dir)
        assert str(original) in line and "shape" in line, line
    finally:
        original.write_bytes(kept)
    assert not (ref_dir / "eval" / "metrics.json").exists()
