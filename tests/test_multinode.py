"""Multi-node launches: two simulated nodes under torchrun's c10d rendezvous prepare a fresh store and match one
process, and the SLURM example script derives ranks, forwards the wall-time warning and requeues on exit code 75
(run against fake `srun` / `scontrol` / `scancel` commands)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, ckpt_tensors, cli, free_port, job_env, max_abs_diff, nan_scan, tiny_raw, write_cfg

SBATCH = REPO / "examples" / "slurm_pretrain.sbatch"
SGD = {"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999]}


# ------------------------------------------------------------------------------------------ two nodes


def _node_cmd(node_rank: int, port: int, cfg: Path, run_dir: Path) -> list[str]:
    """One simulated node: torchrun with one process, joining a 2-node c10d rendezvous on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "sslkit-two-nodes", "-m", "sslkit", "pretrain", "--cfg", str(cfg),
            "--run-dir", str(run_dir), "--no-progress"]


@pytest.fixture(scope="module")
def one_process_run(demo_dir, scan_cache, tmp_path_factory) -> Path:
    """The reference: 1 process x micro-batch 2 x accumulation 2 = global batch 4, 4 steps, SGD."""
    root = tmp_path_factory.mktemp("one")
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache, optim=SGD, train={"micro_batch_size": 2, "grad_accum_steps": 2}),
                    root / "one.yaml")
    res = cli("pretrain", "--cfg", str(cfg), "--run-dir", str(root / "run"), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run"


def _run_all(cmds: list[list[str]], logs: list[Path], env: dict, cwd: Path = REPO) -> list[int]:
    """Start every command at once (the nodes), wait for all; kill the rest if one hangs."""
    files = [open(log, "w", encoding="utf-8") for log in logs]
    procs = []
    try:
        procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT) for c, f in zip(cmds, files)]
        return [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()


def _assert_same_training(one: Path, two: Path) -> None:
    s1, t1 = ckpt_tensors(one, 4)
    s2, t2 = ckpt_tensors(two, 4)
    assert max_abs_diff(s1, s2) < 1e-5
    assert max_abs_diff(t1, t2) < 1e-5
    m = [json.loads(x) for x in (two / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["ema_updates"] for x in m] == [1, 2, 3, 4]
    assert (two / "encoder.safetensors").is_file()
    trainer = json.loads((two / "checkpoints" / "step_00000004" / "trainer.json").read_text(encoding="utf-8"))
    assert trainer["world_size"] == 2


@pytest.mark.slow
def test_two_nodes_prepare_a_fresh_store_and_match_one_process(one_process_run, demo_dir, tmp_path):
    """2 simulated nodes x 1 process under torchrun's c10d rendezvous (gloo on CPU), ZeRO-3, micro-batch 1 x
    accumulation 2, train exactly like one process with the same global batch: LayerNorm heads keep samples
    independent and the sampler shards one seeded permutation, so student and EMA teacher (whose update meets
    partitioned parameters) match after 4 steps. The nodes start on a fresh store, from a datalist with two bad
    entries (a missing file, a NaN scan) among the reference's three scans: they prepare it together, record the
    bad entries once and leave no markers. (ZeRO-2 on 2 ranks: DINO / iBOT under the DeepSpeed launcher,
    tests/test_dino_ibot.py; ZeRO-1: tests/test_byol.py in bf16.)"""
    from sslkit.data.datalist import load_datalist
    from sslkit.data.store import VolumeStore

    good = load_datalist(demo_dir / "datalist.json")
    entries = good[:2] + [{"image": str(tmp_path / "missing.nii.gz")}, *good[2:], {"image": str(nan_scan(tmp_path))}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    raw = tiny_raw(demo_dir, tmp_path / "store", optim=SGD,
                   train={"micro_batch_size": 1, "grad_accum_steps": 2, "zero_stage": 3})
    raw["data"]["datalist"] = str(tmp_path / "datalist.json")
    cfg = write_cfg(raw, tmp_path / "two.yaml")
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    codes = _run_all([_node_cmd(r, port, cfg, tmp_path / "two") for r in (0, 1)], logs, job_env())
    assert codes == [0, 0], [log.read_text(encoding="utf-8")[-3000:] for log in logs]
    assert len(VolumeStore(tmp_path / "store").keys()) == len(good)
    skipped = (tmp_path / "two" / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == 2 and not (tmp_path / "two" / ".prepare").exists()  # logged once; markers cleaned up
    _assert_same_training(one_process_run, tmp_path / "two")


# ------------------------------------------------------------------------------------------ SLURM script

FAKE_SRUN = """#!/bin/bash
# fake srun: 2 nodes x 2 tasks on this machine; ignores its own options; exit code = highest task code
while [[ "$1" == -* ]]; do shift; done
pids=()
for p in 0 1 2 3; do
    SLURM_PROCID=$p SLURM_LOCALID=$((p % 2)) SLURM_NODEID=$((p / 2)) "$@" &
    pids+=($!)
done
echo "${pids[@]}" > "$FAKE_DIR/pids"
code=0
for pid in "${pids[@]}"; do
    wait "$pid"; c=$?
    [ "$c" -gt "$code" ] && code=$c
done
exit "$code"
"""

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_DIR/log"
"""

FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/log"
sig=${1#--signal=}
for pid in $(cat "$FAKE_DIR/pids"); do kill -s "$sig" "$pid"; done
"""

FAKE_PYTHON = """#!/bin/bash
# stands in for `python -m sslkit pretrain ...`: records what it was given, then behaves as FAKE_MODE says
{ echo "RANK=$RANK"; echo "LOCAL_RANK=$LOCAL_RANK"; echo "WORLD_SIZE=$WORLD_SIZE"; echo "NODE_RANK=$NODE_RANK"
  echo "MASTER_ADDR=$MASTER_ADDR"; echo "MASTER_PORT=$MASTER_PORT"; echo "ARGS=$*"; } > "$FAKE_DIR/rank$RANK.env"
case "$FAKE_MODE" in
    done) exit 0 ;;
    preempted) exit 75 ;;
    crash) exit 1 ;;
    until_usr1)
        trap 'exit 75' USR1
        touch "$FAKE_DIR/ready$RANK"
        for _ in $(seq 600); do sleep 0.1; done
        exit 9 ;;
esac
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    """Environment for the sbatch script with fake SLURM commands on PATH and a fake python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    _executable(bin_dir / "scancel", FAKE_SCANCEL)
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_DIR=str(tmp_path),
               PYTHON=str(_executable(tmp_path / "python", FAKE_PYTHON)), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NAME="sslkit-test", CFG="recipe.yaml", RUN_DIR=str(tmp_path / "run"))
    return env


def _run_sbatch(env: dict, mode: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *extra], env={**env, "FAKE_MODE": mode}, cwd=env["FAKE_DIR"],
                          capture_output=True, encoding="utf-8", timeout=120)


def _log(env: dict) -> list[str]:
    log = Path(env["FAKE_DIR"]) / "log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def _rank_env(env: dict, rank: int) -> dict[str, str]:
    text = (Path(env["FAKE_DIR"]) / f"rank{rank}.env").read_text(encoding="utf-8")
    return dict(line.split("=", 1) for line in text.splitlines())


def test_sbatch_script_is_valid_shell():
    header = [ln for ln in SBATCH.read_text(encoding="utf-8").splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header
    assert any(ln.startswith("#SBATCH --signal=B:USR1@") for ln in header)
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, encoding="utf-8")
        assert res.returncode == 0, res.stdout


def test_sbatch_gives_every_rank_its_place_and_resumes(fake_slurm):
    res = _run_sbatch(fake_slurm, "done", "--set", "train.max_steps=7")
    assert res.returncode == 0, res.stderr
    ports = set()
    for rank in range(4):
        e = _rank_env(fake_slurm, rank)
        assert (e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"], e["WORLD_SIZE"]) == (str(rank), str(rank % 2),
                                                                                  str(rank // 2), "4")
        assert e["MASTER_ADDR"] == "node-a"
        ports.add(e["MASTER_PORT"])
        assert e["ARGS"] == (f"-m sslkit pretrain --cfg recipe.yaml --run-dir {fake_slurm['RUN_DIR']} "
                             "--resume auto --no-progress --set train.max_steps=7")
    assert ports == {str(20000 + 4242 % 20000)}
    assert _log(fake_slurm) == []                          # finished: no requeue


def test_sbatch_requeues_on_exit_75_only(fake_slurm):
    res = _run_sbatch(fake_slurm, "preempted")
    assert res.returncode == 0, res.stderr
    assert _log(fake_slurm) == ["scontrol requeue 4242"]
    crash = _run_sbatch(fake_slurm, "crash")
    assert crash.returncode == 1 and _log(fake_slurm) == ["scontrol requeue 4242"]   # no second requeue
    limit = _run_sbatch({**fake_slurm, "SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}, "preempted")
    assert limit.returncode == 75 and "requeued 3 times" in limit.stderr
    assert _log(fake_slurm) == ["scontrol requeue 4242"]


def test_sbatch_forwards_the_wall_time_warning_then_requeues(fake_slurm):
    proc = subprocess.Popen(["bash", str(SBATCH)], env={**fake_slurm, "FAKE_MODE": "until_usr1"},
                            cwd=fake_slurm["FAKE_DIR"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8")
    ready = [Path(fake_slurm["FAKE_DIR"]) / f"ready{r}" for r in range(4)]
    deadline = time.time() + 60
    while not all(p.exists() for p in ready) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert all(p.exists() for p in ready), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGUSR1)                        # what --signal=B:USR1@300 delivers to the script
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _log(fake_slurm) == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]
    assert "USR1 received" in err and "requeueing job 4242" in out
