"""`sslkit info`: versions, devices and the DeepSpeed accelerator."""

from __future__ import annotations

import importlib
import platform


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:  # report, never fail: this is a diagnostic
        return f"not available ({type(e).__name__})"


def environment_report() -> str:
    import torch

    from sslkit import __version__

    lines = [f"sslkit      {__version__}", f"python      {platform.python_version()} ({platform.machine()})"]
    for mod in ("torch", "torchvision", "monai", "lightly", "timm", "deepspeed", "nibabel", "SimpleITK",
                "safetensors"):
        lines.append(f"{mod:<11} {_version(mod)}")
    lines.append(f"cpu threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 "
                         f"{torch.cuda.is_bf16_supported()}")
    else:
        lines.append("cuda        not available (CPU runs use the gloo backend)")
    try:
        from deepspeed.accelerator import get_accelerator

        lines.append(f"deepspeed accelerator: {get_accelerator().device_name()}")
    except Exception as e:
        lines.append(f"deepspeed accelerator: not available ({type(e).__name__})")
    return "\n".join(lines)
