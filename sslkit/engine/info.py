"""`sslkit info`: versions, devices and the accelerator DeepSpeed would use, without importing DeepSpeed (whose
import alone takes tens of seconds and prints its own accelerator line)."""

from __future__ import annotations

import os
import platform

PACKAGES = ("torch", "torchvision", "monai", "lightly", "timm", "deepspeed", "nibabel", "SimpleITK", "safetensors")


def _version(dist: str) -> str:
    """The installed version of a distribution, read from its metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def deepspeed_accelerator(cuda: bool) -> str:
    """The accelerator DeepSpeed picks on this machine for sslkit's runs: DS_ACCELERATOR when set, else cuda where
    torch sees a CUDA device, else cpu."""
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if cuda else "cpu")


def environment_report() -> str:
    import torch

    from sslkit import __version__

    lines = [f"sslkit      {__version__}", f"python      {platform.python_version()} ({platform.machine()})"]
    lines += [f"{dist:<11} {_version(dist)}" for dist in PACKAGES]
    lines.append(f"cpu threads {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 "
                         f"{torch.cuda.is_bf16_supported()}")
    else:
        lines.append("cuda        not available (CPU runs use the gloo backend)")
    lines.append(f"deepspeed accelerator: {deepspeed_accelerator(cuda)}")
    return "\n".join(lines)
