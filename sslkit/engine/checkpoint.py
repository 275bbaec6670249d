"""Atomic, resumable checkpoints that never unpickle arbitrary objects.

Layout of one checkpoint, `checkpoints/step_00000040/`:
  ds/                 DeepSpeed model + optimizer + scheduler states (per-rank partitions under ZeRO)
  student.safetensors full fp32 student (encoder.* and objective heads), gathered under ZeRO-3
  teacher.safetensors EMA teachers
  rank{r}.safetensors RNG states of rank r (torch, CUDA) and monitor tensors
  rank{r}.json        numpy / python RNG states of rank r
  trainer.json        step counters, elapsed time, health
  COMPLETE            written last; a directory without it is never resumed from
Every rank writes into `.tmp-step_XXXXXXXX/`, then rank 0 renames it into place (one atomic rename).
"""

from __future__ import annotations

import copyreg
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sslkit.engine import distributed as D

COMPLETE = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


class SafeTorchCheckpointEngine:
    """DeepSpeed checkpoint engine whose loads use torch.load(weights_only=True).

    DeepSpeed's own engine loads with weights_only=False, i.e. it would unpickle anything in the file.
    The few DeepSpeed types its checkpoints hold are allow-listed explicitly.
    """

    def __init__(self, inner):
        self.inner = inner
        _allow_deepspeed_globals()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


def _allow_deepspeed_globals() -> None:
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, fragment_address]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    torch.serialization.add_safe_globals(allowed)
    # Python 3.11.0-3.11.3 pickle Enum members as getattr(cls, name), which weights_only loading refuses (and
    # allowing getattr would open it up); pickle them as cls(value) on every Python instead.
    copyreg.pickle(ZeroStageEnum, _enum_by_value)


def _enum_by_value(member):
    return type(member), (member.value,)


def write_checkpoint(ckpt_root: Path, step: int, engine, student_state: dict, teacher_state: dict,
                     rank_tensors: dict[str, torch.Tensor], rank_plain: dict, trainer_state: dict,
                     keep_last: int, protect: set[str] = frozenset()) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    r = D.rank()
    if r == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    _allow_deepspeed_globals()  # also makes the saved file loadable with weights_only on every Python
    engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
    save_tensors(rank_tensors, tmp / f"rank{r}.safetensors")
    (tmp / f"rank{r}.json").write_text(json.dumps(rank_plain), encoding="utf-8")
    if r == 0:
        save_tensors(student_state, tmp / "student.safetensors")
        if teacher_state:
            save_tensors(teacher_state, tmp / "teacher.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    D.barrier()
    if r == 0:
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text(str(step), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(ckpt_root, keep_last, protect | {final.name})
    D.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _prune(ckpt_root: Path, keep_last: int, protect: set[str]) -> None:
    found = list_checkpoints(ckpt_root)
    for old in found[:-keep_last] if keep_last > 0 else []:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, engine) -> dict:
    """Restore the DeepSpeed engine from `path` and return the sslkit-side state (collective)."""
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint")
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine.checkpoint_engine)
    load_path, _ = engine.load_checkpoint(str(path / "ds"), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed state missing")
    r = D.rank()
    teacher_file = path / "teacher.safetensors"
    return {
        "teacher": load_file(str(teacher_file)) if teacher_file.is_file() else {},
        "rank_tensors": load_file(str(path / f"rank{r}.safetensors")),
        "rank_plain": json.loads((path / f"rank{r}.json").read_text(encoding="utf-8")),
        "trainer": read_trainer_state(path),
    }


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the lines of a per-step log past `step`: a resumed run writes them again (0: a fresh start)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def read_trainer_state(path: Path) -> dict:
    """Step counters of a checkpoint (trainer.json)."""
    return json.loads((path / "trainer.json").read_text(encoding="utf-8"))


def load_student_state(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 student weights of a checkpoint (no DeepSpeed needed)."""
    f = path / "student.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing")
    return load_file(str(f))
