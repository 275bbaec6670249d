"""Shared fixtures: the demo corpus (built once per machine) and tiny, fast pretraining configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "sslkit" / "torch_extensions"))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo corpus of real scans (SSLKIT_DEMO_DIR may point to a prebuilt one)."""
    from sslkit.data.demo import build_demo_corpus

    d = Path(os.environ.get("SSLKIT_DEMO_DIR", "/tmp/sslkit-test-demo"))
    build_demo_corpus(d)
    return d


USER_DATA = ("demo_data", ".cache", "runs")  # a user's demo corpus, stores and runs in the repository


def _user_data_files() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the repository's user-data folders."""
    found = {}
    for name in USER_DATA:
        for p in (REPO / name).rglob("*") if (REPO / name).is_dir() else []:
            if p.is_file():
                st = p.stat()
                found[str(p.relative_to(REPO))] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="session", autouse=True)
def repository_user_data_untouched():
    """Tests write under temporary folders only: the repository's demo_data/, .cache/ and runs/ (a user's corpus,
    stores and runs, which `make demo` builds) are the same after the session as before it."""
    before = _user_data_files()
    yield
    after = _user_data_files()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the tests wrote into the repository: {', '.join(changed[:5])}" + \
        (f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def session_root(tmp_path_factory) -> Path:
    """A folder of this test session that its xdist worker processes share (each worker's basetemp is a
    sub-folder of it); without xdist, the session's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, by whichever worker process asks first (the others wait for it):
    the expensive prepared data and runs that several modules read and never change."""
    import fcntl
    import shutil

    root = session_root(tmp_path_factory) / "built-once"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed try left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def scan_cache(tmp_path_factory) -> Path:
    """Preprocessed-volume store shared by the tests' runs (and by the xdist workers: the store locks each entry
    while one process prepares it), so each scan is resampled once per session."""
    cache = session_root(tmp_path_factory) / "scan-cache"
    cache.mkdir(exist_ok=True)
    return cache


SGD = {"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999]}


@pytest.fixture(scope="session")
def sgd_reference(demo_dir, scan_cache, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, recipe) of the uninterrupted run that the fault, resume and multi-process tests compare
    with: `sslkit pretrain` of tiny_raw with SGD (micro-batch 2, 4 steps, a checkpoint after every step), one
    process, one thread. Read-only: tests that change a run copy it first."""
    def build(folder: Path) -> None:
        cfg = write_cfg(tiny_raw(demo_dir, scan_cache, optim=SGD), folder / "ref.yaml")
        res = cli("pretrain", "--cfg", cfg, "--run-dir", folder / "run", "--no-progress")
        assert res.returncode == 0, res.stderr[-3000:]

    folder = built_once(tmp_path_factory, "sgd-reference", build)
    return folder / "run", folder / "ref.yaml"


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under xdist with a worker per core (`make test`), each worker's torch uses one intra-op thread: two OpenMP
    threads per worker on shared cores spin-wait on each other (see one_thread). Set after collection, so a
    module's own set_num_threads at import does not undo it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and workers >= (os.cpu_count() or 1):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads spin-waiting on a busy core made
    small loops 10-30x slower; one thread keeps each run at a few seconds."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_swin(dims: int = 3):
    """A Swin-UNETR encoder small enough for CPU loss tests (feature size 12, window 4, one block per stage)."""
    from sslkit.models import build_encoder

    return build_encoder("swin_unetr", spatial_dims=dims, in_channels=1, feature_size=12, window_size=4,
                         depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def tiny_raw(demo_dir: Path, cache: Path, **sections) -> dict:
    """A 4-step BYOL recipe on the demo corpus with a tiny Swin encoder (feature size 12, 32^3 crops).

    LayerNorm heads and a LayerNorm encoder keep samples independent, so accumulation and data parallelism
    must give the same weights as one larger batch.
    """
    raw = {
        "train": {"micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 4, "seed": 3, "ckpt_every": 1,
                  "keep_last": 10},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 1e-4},
        "data": {"datalist": str(demo_dir / "datalist.json"), "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0],
                 "crops_per_volume": 2, "cache_dir": str(cache)},
        "model": {"name": "swin_unetr", "args": {"feature_size": 12, "depths": [1, 1, 1, 1]}},
        "objectives": [{"name": "byol", "hidden_dim": 64, "out_dim": 32, "head_norm": "layer",
                        "tau_base": 0.9}],
        "monitor": {"bank_size": 64},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def nan_scan(folder: Path) -> Path:
    """A 16^3 NIfTI scan with one NaN voxel (a bad entry a run must skip and record), as folder/nan.nii.gz."""
    import nibabel as nib
    import numpy as np

    arr = np.ones((16, 16, 16), np.float32)
    arr[0, 0, 0] = np.nan
    path = folder / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def write_cfg(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRAINING_COMMANDS = ("pretrain", "finetune", "study")


def one_thread_args(args) -> list[str]:
    """ARGS of a training command with `--set train.threads=1` unless they set it: the demo recipes pin 2 threads
    (figures that reproduce on any machine), which under two test workers on 2 cores oversubscribes them."""
    args = [str(a) for a in args]
    if args and args[0] in TRAINING_COMMANDS and not any(a.startswith("train.threads=") for a in args):
        args += ["--set", "train.threads=1"]
    return args


def sslkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sslkit", *one_thread_args(args)]


def job_env(**extra: str) -> dict:
    """Environment of a child job: one thread per process, no launcher variables from this process."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(v, None)
    return e


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None, env: dict | None = None):
    """`sslkit ARGS` in a fresh interpreter, for what only one shows (import-time output). A job that is stopped,
    killed or locked runs in a `CliChild`; everything else uses `cli`: both skip a fresh interpreter's 8-9 s of
    imports."""
    return subprocess.run(sslkit_cmd(*args), capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout, cwd=cwd or REPO, env=job_env(**(env or {})))


# What a child job imports before its work (sslkit's commands import the rest lazily), and conftest, where its
# process starts (_child_main): the fork server loads them once per test worker.
PRELOADED = ("conftest", "sslkit.cli", "sslkit.engine.trainer", "sslkit.downstream.train", "sslkit.data.prepare",
             "sslkit.data.pretrain", "monai", "lightly.loss", "timm")


def preloaded_forkserver():
    """multiprocessing's forkserver context, its server (one per test worker) importing PRELOADED once."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOADED))
    return ctx


class CliChild:
    """`sslkit ARGS` in a child process forked from a server that has imported sslkit and its heavy dependencies
    once per test worker (multiprocessing's forkserver), for tests that stop, kill or lock a running job. A real
    process (its own pid, signal handlers, locks, file descriptors and exit code; `sslkit.cli.main` with the
    environment, working folder and one thread of `run_cli`) that starts in a fraction of a second instead of a
    fresh interpreter's 8-9 s of imports. The subprocess.Popen methods the tests use; an exit by a signal is minus
    its number, as Popen's. `setup` (a module-level function or a functools.partial of one) runs in the child
    before the CLI, e.g. to slow a step down. Import-time output needs `run_cli`."""

    def __init__(self, *args: str, cwd: Path | None = None, env: dict | None = None, setup=None):
        import tempfile

        self.args = ["sslkit", *one_thread_args(args)]
        self._dir = Path(tempfile.mkdtemp(prefix="sslkit-child-"))
        job = (self.args[1:], str(cwd or REPO), job_env(**(env or {})), str(self._dir), setup)
        self._proc = preloaded_forkserver().Process(target=_child_main, args=job)
        self._proc.start()
        self.pid, self.returncode = self._proc.pid, None

    def poll(self) -> int | None:
        self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import shutil

        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        if self._dir.is_dir():  # the output, read once; no folder left behind
            self._output = tuple((self._dir / name).read_text(encoding="utf-8", errors="replace")
                                 for name in ("out", "err"))
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._output

    def finish(self, timeout: float | None = 900) -> subprocess.CompletedProcess:
        """Wait for the end: exit code, stdout and stderr, as `cli` and `run_cli` return them."""
        out, err = self.communicate(timeout)
        return subprocess.CompletedProcess(self.args, self.returncode, out, err)


def _child_main(args: list[str], cwd: str, env: dict, out_dir: str, setup) -> None:
    """CliChild's process: the job's environment, folder, one thread and stdout / stderr files, `setup`, then the
    CLI."""
    from sslkit.cli import main

    out, err = (os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for name in ("out", "err"))
    _enter_job(out, err, env, cwd)
    os.close(out)
    os.close(err)
    sys.argv = ["sslkit", *args]
    if setup is not None:
        setup()
    try:
        code = main(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _enter_job(out_fd: int, err_fd: int, env: dict, cwd: Path | str) -> None:
    """This process as a job's child process starts: stdout / stderr on `out_fd` / `err_fd` at the file-descriptor
    level (C++ libraries' output included), the job's environment and working folder, one torch thread."""
    import torch

    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout, sys.stderr = [open(fd, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
                              for fd in (1, 2)]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)


def cli(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`sslkit ARGS` through `sslkit.cli.main` in this process, as `run_cli` runs it in a child: the same working
    folder, environment and one thread, stdout / stderr captured at the file-descriptor level (C++ libraries'
    output included), Python warnings printed to stderr under the interpreter's default filters (not recorded by
    pytest), an uncaught exception as exit code 1 with its traceback on stderr, argparse's exits as their code.
    The environment, working folder, thread count and warning filters are restored afterwards. What only a fresh
    interpreter shows (import-time output) needs `run_cli`."""
    import tempfile
    import traceback
    import warnings

    import torch

    from sslkit.cli import main

    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    saved_streams, saved_fds = (sys.stdout, sys.stderr), {}
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        for stream in saved_streams:
            stream.flush()
        try:
            for fd in (1, 2):
                saved_fds[fd] = os.dup(fd)
            _enter_job(out_file.fileno(), err_file.fileno(), job_env(**(env or {})), cwd or REPO)
            try:
                with warnings.catch_warnings():
                    _child_warning_filters()
                    code = main(one_thread_args(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - as a child would: a traceback on stderr and exit code 1
                traceback.print_exc(file=sys.stderr)
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if sys.stdout is not saved_streams[0]:
                sys.stdout.close()
                sys.stderr.close()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(saved_cwd)
            torch.set_num_threads(threads)
        out, err = (f.seek(0) or f.read().decode("utf-8", errors="replace") for f in (out_file, err_file))
    return subprocess.CompletedProcess(["sslkit", *map(str, args)], code, out, err)


def _child_warning_filters() -> None:
    """The warning filters and output of a fresh interpreter (no -W, not in development mode)."""
    import warnings

    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def train_objective(spec: dict, batch: dict, steps: int = 12) -> list[dict]:
    """`steps` Adam steps of a tiny Swin under the objective `spec` on one fixed batch (seed 0), the objective's
    optimizer-step hook after each; the logs of every step."""
    import torch

    from sslkit.objectives import build_objective

    torch.manual_seed(0)
    enc = tiny_swin()
    obj = build_objective(spec, enc)
    opt = torch.optim.Adam(list(enc.parameters()) + list(obj.parameters()), lr=1e-3)
    logs = []
    for step in range(1, steps + 1):
        out = obj(batch, enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.on_optimizer_step(step, steps)
        logs.append(out.logs)
    return logs


def ckpt_tensors(run_dir: Path, step: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    d = run_dir / "checkpoints" / f"step_{step:08d}"
    return load_file(str(d / "student.safetensors")), load_file(str(d / "teacher.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def tiny_encoder(family: str):
    """(encoder, input shape) of each encoder family at a size that compiles and runs in seconds on the CPU;
    every windowed family gets shifted windows (a map larger than its window, two blocks in a stage)."""
    import torch

    from sslkit.models import build_encoder
    from sslkit.models.qt_unet import QTUNetEncoder

    torch.manual_seed(0)
    if family == "swin_unetr_3d":
        enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=12, window_size=4,
                            depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4))
        return enc, (2, 1, 32, 32, 32)
    if family == "qt_unet_3d":
        return QTUNetEncoder(spatial_dims=3, embed_dim=12, window_size=4), (1, 1, 32, 32, 32)
    if family == "qt_unet_2d":
        return QTUNetEncoder(spatial_dims=2, embed_dim=12, window_size=4), (2, 1, 64, 64)
    if family == "punet_3d":
        enc = build_encoder("punet", spatial_dims=3, channels=(8, 8, 16, 16, 16), num_heads=2, num_classes=3,
                            prompt_tokens=2)
        return enc, (2, 1, 32, 32, 16)
    if family == "sam_vit":
        enc = build_encoder("sam_vit", img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                            window_size=2, neck_chans=16)
        return enc, (2, 1, 64, 64)
    if family == "vit_3d":
        enc = build_encoder("vit", spatial_dims=3, patch_size=8, embed_dim=24, depth=2, num_heads=2)
        return enc, (2, 1, 32, 32, 32)
    raise ValueError(family)


ENCODER_FAMILIES = ("swin_unetr_3d", "qt_unet_3d", "qt_unet_2d", "punet_3d", "sam_vit", "vit_3d")


# Modules that take longest (worker seconds measured with --durations on 2 cores), started first: with
# --no-loadscope-reorder (the Makefile), pytest-xdist's loadscope hands out modules in collection order, so a long
# module collected last would run alone on one core at the end. (Without that option xdist orders modules by their
# number of tests, which put the three 40-step recipe runs last.)
LONGEST_FIRST = ("test_demo_recipes_health", "test_sam_downstream", "test_dino_ibot", "test_compile", "test_faults",
                 "test_punet_prompt", "test_study", "test_multinode", "test_prepare", "test_compile_loop",
                 "test_pipeline", "test_punet_pretrain_modes", "test_host_syncs", "test_bundle", "test_byol",
                 "test_downstream", "test_task_probe_run", "test_voco", "test_engine_runs")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))  # stable: order within a module
