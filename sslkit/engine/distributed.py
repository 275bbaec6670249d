"""One code path for one process without a launcher, `torchrun` on CPU (gloo) and CUDA (nccl)."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """DeepSpeed needs the launcher's variables even for one process; set them when no launcher did."""
    if all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def pick_device(pref: str) -> torch.device:
    """The run layer's device choice (one-line error for cuda without CUDA), on this process's local rank."""
    from sslkit.run import pick_device as pick

    return pick(pref, int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> None:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on CUDA) once."""
    ensure_launcher_env()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/sslkit/torch_extensions"))
    if device.type == "cpu":
        # DeepSpeed picks its accelerator from this; CPU runs must not look for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if os.environ.get("SSLKIT_QUIET"):
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    _skip_shm_comm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl",
                                   verbose=False)


def _skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce (about 30 s on a fresh machine) when it starts its CPU
    backend; it serves only inference_all_reduce, which training never calls, so mark it unavailable."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except Exception:  # noqa: BLE001 - an older / newer DeepSpeed without it: nothing to skip
        pass


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool, device: torch.device | None = None) -> bool:
    """Rank 0's decision, on every rank (a no-op for one process)."""
    return bool(broadcast_int(int(flag)))


def broadcast_int(value: int) -> int:
    """Rank 0's integer, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def read_scalars(values: dict) -> dict:
    """Tensor values to floats with one device-to-host transfer; other values as they are (None dropped)."""
    tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
    out = {k: v for k, v in values.items() if v is not None and not torch.is_tensor(v)}
    if tensors:
        packed = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).cpu().tolist()
        out.update(zip(tensors, packed))
    return out


def mean_across_ranks(values: dict) -> dict[str, float]:
    """The mean over every rank of each value (a number or a one-element tensor), as floats: one all-reduce and
    one device-to-host transfer; for one process, `read_scalars`. None values are dropped."""
    values = {k: v for k, v in values.items() if v is not None}
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return read_scalars(values)
    keys, dev = sorted(values), _collective_device()
    t = torch.stack([torch.as_tensor(values[k]).detach().to(dev, torch.float64).reshape(()) for k in keys])
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def any_flag(flag: bool) -> bool:
    """True on every rank when it is true on any rank (a barrier too)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def zero3_gather(params):
    """Context that all-gathers ZeRO-3 partitioned parameters (a no-op for plain ones)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
