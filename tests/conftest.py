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


@pytest.fixture(scope="session")
def scan_cache(tmp_path_factory) -> Path:
    """Preprocessed-volume cache shared by the tests' runs, so each scan is resampled once per session."""
    return tmp_path_factory.mktemp("scan-cache")


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


def write_cfg(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sslkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sslkit", *args]


def job_env(**extra: str) -> dict:
    """Environment of a child job: one thread per process, no launcher variables from this process."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(v, None)
    return e


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(sslkit_cmd(*args), capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout, cwd=cwd or REPO, env=job_env(**(env or {})))


def ckpt_tensors(run_dir: Path, step: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    d = run_dir / "checkpoints" / f"step_{step:08d}"
    return load_file(str(d / "student.safetensors")), load_file(str(d / "teacher.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
