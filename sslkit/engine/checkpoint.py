"""Pretraining checkpoints (DeepSpeed state + sslkit state) that never unpickle arbitrary objects.

Layout of one checkpoint, `checkpoints/step_00000040/` (folder mechanics, markers and pruning: sslkit.run):
  ds/                 DeepSpeed model + optimizer + scheduler states (per-rank partitions under ZeRO)
  student.safetensors full fp32 student (encoder.* and objective heads), gathered under ZeRO-3; the plan in
                      its metadata
  teacher.safetensors EMA teachers
  rank{r}.safetensors RNG states of rank r (torch, CUDA, objective generators) and monitor tensors
  rank{r}.json        numpy / python RNG states of rank r
  trainer.json        step counters, elapsed time, health
  COMPLETE            written last: every file's size and checksum; a folder without it is never resumed from
Every rank writes into `.tmp-step_XXXXXXXX/`, then rank 0 renames it into place (one atomic rename).
"""

from __future__ import annotations

import copyreg
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sslkit import run as R
from sslkit.engine import distributed as D
from sslkit.plan import write_weights


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
                     keep_last: int, protect: set[str] = frozenset(), plan: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. A failed write (disk full, ...) removes the
    temporary folder and raises on every rank; the previous checkpoints stay as they were."""
    import shutil

    def _free_bytes(folder: Path) -> int | None:
        try:
            return shutil.disk_usage(folder if folder.exists() else folder.parent).free
        except OSError:
            return None

    r = D.rank()
    tmp = ckpt_root / f".tmp-{R.step_dir_name(step)}"
    error = None
    if r == 0:
        try:
            R.begin_checkpoint(ckpt_root, step)
        except BaseException as e:  # noqa: BLE001 - shared with the other ranks below
            error = e
    if D.any_flag(error is not None):
        _raise_write_error(error, tmp)
    _allow_deepspeed_globals()  # also makes the saved file loadable with weights_only on every Python
    try:
        engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
        save_tensors(rank_tensors, tmp / f"rank{r}.safetensors")
        R.atomic_write_json(tmp / f"rank{r}.json", rank_plain, indent=None)
        if r == 0:
            write_weights(tmp / "student.safetensors", student_state, plan)
            if teacher_state:
                save_tensors(teacher_state, tmp / "teacher.safetensors")
            R.atomic_write_json(tmp / "trainer.json", trainer_state)
    except BaseException as e:  # noqa: BLE001
        error = e
    free_at_failure = _free_bytes(tmp) if error is not None else None  # before the partial files are removed
    if D.any_flag(error is not None):
        if r == 0:
            R.abandon_checkpoint(tmp)
        _raise_write_error(error, tmp, free_at_failure)
    final = tmp.parent / R.step_dir_name(step)
    if r == 0:
        try:  # the COMPLETE marker can meet a full disk too
            R.finish_checkpoint(tmp, step, keep_last, set(protect))
        except BaseException as e:  # noqa: BLE001
            error = e
            free_at_failure = _free_bytes(tmp)
    if D.any_flag(error is not None):  # collective: also the barrier every rank waits at
        if r == 0:
            R.abandon_checkpoint(tmp)
        _raise_write_error(error, tmp, free_at_failure)
    return final



def _raise_write_error(error: BaseException | None, tmp: Path, free_at_failure: int | None = None) -> None:
    """A failed checkpoint write as one line (disk full gets its own); ranks that only learnt of another rank's
    failure stop with a line saying so.

    Disk full is recognised however the writer reports it: OSError(ENOSPC); safetensors' "No space left on device
    (os error 28)"; torch.save's stream errors ("unexpected pos", "file write failed") that carry no errno, taken
    as disk full when under 64 MiB were free as the write failed."""
    import shutil

    from sslkit.errors import UserError, disk_full_in

    nearly_full = 64 << 20
    full = disk_full_in(error) is not None
    full = full or (isinstance(error, Exception) and not isinstance(error, UserError) and free_at_failure is not None
                    and free_at_failure < nearly_full)
    if full:
        found = R.list_checkpoints(tmp.parent)
        free = shutil.disk_usage(tmp.parent).free  # measured after the partial folder was removed
        needed = f"a checkpoint needs about {R.checkpoint_bytes(found[-1]):,} bytes, " if found else ""
        kept = f"{found[-1].name} is intact" if found else "no checkpoint was written yet"
        raise UserError(f"{tmp.parent}: disk full while writing the checkpoint of step "
                        f"{tmp.name.rsplit('_', 1)[-1].lstrip('0') or 0} ({needed}{free:,} bytes are free); "
                        f"{kept}, no partial folder is left") from None
    if error is not None:
        raise error
    raise UserError("another rank failed to write its part of the checkpoint; the previous checkpoint is intact")


def read_checkpoint(path: Path, engine) -> dict:
    """Restore the DeepSpeed engine from `path` and return the sslkit-side state (collective)."""
    R.require_valid_checkpoint(path)
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


def read_trainer_state(path: Path) -> dict:
    """Step counters of a checkpoint (trainer.json)."""
    return json.loads((path / "trainer.json").read_text(encoding="utf-8"))


def load_student_state(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 student weights of a checkpoint (no DeepSpeed needed)."""
    f = path / "student.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing")
    return load_file(str(f))
