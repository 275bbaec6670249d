"""The run layer both training loops share: atomic writes, JSON-lines logs, device choice, run directories.

Sits below everything but config/errors/plan. Everything a run writes goes through `atomic_path` (temporary name,
then one rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from sslkit.errors import ConfigError


# ------------------------------------------------------------------------------------------ atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False, tmp: Path | None = None):
    """Yield a temporary path beside `path` (or `tmp`); on success it replaces `path` in one rename, on failure it
    is removed. The file gets the mode any new file gets here (0644 under the usual umask), whatever the writer
    used (safetensors creates its files 0600); `fsync` flushes it to disk before the rename.

        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
            if fsync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
        raise


def _umask() -> int:
    """This process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, fsync: bool = False, tmp: Path | None = None) -> Path:
    with atomic_path(path, fsync=fsync, tmp=tmp) as t:
        t.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1, sort_keys: bool = False, fsync: bool = False,
                      allow_nan: bool = True, tmp: Path | None = None) -> Path:
    """The one JSON writer of anything a reader may look at while it is written (temporary file, one rename)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text, fsync=fsync, tmp=tmp)


# ------------------------------------------------------------------------------------------ JSON lines


class JsonlWriter:
    """Append-only JSON lines, one object per line, flushed per line (a killed run loses at most one line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete JSON object of a JSON-lines file ([] when missing); a torn last line is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep the rows of a per-step log up to `step`: a resumed run writes the later ones again (0: a fresh start)."""
    p = Path(path)
    if p.is_file():
        keep = [r for r in read_jsonl(p) if r.get("step", 0) <= step]
        atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in keep))


# ------------------------------------------------------------------------------------------ device


def pick_device(pref: str, local_rank: int = 0):
    """torch.device for `auto | cpu | cuda`: auto takes CUDA when present. cuda without CUDA is a one-line
    ConfigError (not a traceback from deep inside torch)."""
    import torch

    if pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: '{pref}' is not one of auto, cpu, cuda")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda asked for, but torch sees no CUDA device here "
                          "(use --set train.device=cpu or auto)")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ the lock


class RunLock:
    """One process owns a run directory: an exclusive `fcntl.flock` on `<run_dir>/.lock`, held for the life of
    the run and released by the OS when the process dies (a killed run never blocks `--resume auto`). The file
    names the holder (PID, host, start time) for the refusal message; it is never deleted (deleting a locked file
    would let a third process lock a new one)."""

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            from sslkit.errors import UserError

            raise UserError(f"{self.path.parent}: in use by another sslkit process ({holder}); wait for it to end or "
                            "choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
    except (OSError, ValueError):
        return "holder unknown"


# ------------------------------------------------------------------------------------------ checkpoints

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"   # written last into a checkpoint: {"step": n, "files": {relative path: {bytes, blake2b}}}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def file_digest(path: Path) -> str:
    """blake2b (16 bytes, hex) of a file's content, read 1 MiB at a time."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "blake2b": file_digest(p)} for p in files}


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used (None when it is complete and every file matches its marker)."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return "its COMPLETE marker is unreadable"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, {want['bytes']} were written"
        if file_digest(p) != want["blake2b"]:
            return f"{rel} does not match its checksum"
    return None


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def step_folders(ckpt_root: Path) -> list[Path]:
    """Every `step_*` checkpoint folder, oldest first, with or without its COMPLETE marker (what a run directory
    holds, verified or not)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=checkpoint_step)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Step checkpoint folders that carry a COMPLETE marker, oldest first (not verified: see checkpoint_problem)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def newest_valid_checkpoint(ckpt_root: Path, warn=None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `warn(line)`."""
    for folder in reversed(list_checkpoints(ckpt_root)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if warn is not None:
            warn(f"{folder}: {problem}; falling back to an older checkpoint")
    return None


def require_valid_checkpoint(folder: str | Path) -> Path:
    """A checkpoint folder a user named (--resume PATH, export --checkpoint): UserError (one line) unless valid."""
    from sslkit.errors import UserError

    p = Path(folder)
    if not p.is_dir():
        raise UserError(f"{p}: no such checkpoint directory")
    problem = checkpoint_problem(p)
    if problem is not None:
        raise UserError(f"{p}: not a usable checkpoint: {problem}")
    return p


def remove_stale_temporaries(ckpt_root: Path) -> list[Path]:
    """Delete `.tmp-*` folders left by interrupted checkpoint writes (call while holding the run lock)."""
    import shutil

    root = Path(ckpt_root)
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def check_free_space(ckpt_root: Path, needed: int) -> None:
    """UserError naming the folder, the bytes needed and free, when the disk cannot take another checkpoint."""
    import shutil

    from sslkit.errors import UserError

    free = shutil.disk_usage(ckpt_root).free
    if needed and free < needed:
        raise UserError(f"{ckpt_root}: disk full: a checkpoint needs about {needed:,} bytes, {free:,} are free; "
                        "the previous checkpoint is intact")


def checkpoint_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (rank 0 calls it; others write into it after a
    barrier). Refuses (UserError) when the disk cannot take another checkpoint of the newest one's size."""
    import shutil

    ckpt_root.mkdir(parents=True, exist_ok=True)
    found = list_checkpoints(ckpt_root)
    check_free_space(ckpt_root, checkpoint_bytes(found[-1] if found else None))
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(tmp: Path, step: int, keep_last: int, protect: set[str] = frozenset()) -> Path:
    """fsync the files, write the COMPLETE marker (sizes and checksums), rename into place, prune old ones."""
    import shutil

    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    atomic_write_json(tmp / COMPLETE, {"step": step, "files": _manifest(tmp)})
    final = tmp.parent / step_dir_name(step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune_checkpoints(tmp.parent, keep_last, protect | {final.name})
    return final


def abandon_checkpoint(tmp: Path) -> None:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def prune_checkpoints(ckpt_root: Path, keep_last: int, protect: set[str] = frozenset()) -> None:
    """Keep the `keep_last` newest valid checkpoints and the protected ones (the healthy one, the one just
    written); delete the other valid ones. Invalid ones are never counted as kept."""
    import shutil

    valid = [p for p in list_checkpoints(ckpt_root) if checkpoint_problem(p) is None]
    keep = {p.name for p in valid[-max(keep_last, 1):]} | set(protect)
    for p in valid:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ nested state


def save_state(folder: Path, name: str, obj) -> None:
    """Write a nested state (dicts, lists, tuples, numbers, strings, tensors; e.g. an optimizer's state_dict) as
    `<name>.safetensors` (the tensors) + `<name>.json` (the structure): no pickle anywhere."""
    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = _encode(obj, tensors)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    atomic_write_json(folder / f"{name}.json", skeleton, indent=None)


def load_state(folder: Path, name: str):
    """The object `save_state` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _decode(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")), tensors)


def _encode(x, tensors: dict):
    import torch

    if torch.is_tensor(x):
        key = f"t{len(tensors)}"
        tensors[key] = x
        return {"__tensor__": key}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {"__dict__": {k: _encode(v, tensors) for k, v in x.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot save a {type(x).__name__} in a checkpoint")


def _decode(x, tensors: dict):
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if isinstance(x, dict):
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__dict__" in x:
            return {k: _decode(v, tensors) for k, v in x["__dict__"].items()}
        if "__items__" in x:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in x["__items__"]}
        if "__tuple__" in x:
            return tuple(_decode(v, tensors) for v in x["__tuple__"])
    return x


# ------------------------------------------------------------------------------------------ run directories

# Keys a resumed run may change: how long and how it runs, not what it computes.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_epochs", "train.ckpt_every", "train.keep_last",
                     "train.num_workers", "train.worker_nice", "train.threads", "train.device", "train.val_every",
                     "train.val_cases", "logging", "monitor.probe_every", "monitor.alarms", "data.cache_dir")


def resolve_resume(run_dir: Path, resume: str | None, warn=None) -> Path | None:
    """The checkpoint a run starts from: None for a fresh run (refused when the directory already holds
    checkpoints), the newest valid one for "auto" (None when there is none yet), or the folder a user named."""
    from sslkit.errors import UserError

    ckpts = Path(run_dir) / CHECKPOINTS
    if not resume:
        if step_folders(ckpts):
            raise UserError(f"{run_dir}: already holds a run with checkpoints; continue it with --resume auto or "
                            "choose another --run-dir")
        return None
    if resume == "auto":
        return _newest_verified(run_dir, warn)
    return require_valid_checkpoint(resume)


def _newest_verified(run_dir: Path, warn=None) -> Path | None:
    """--resume auto: the newest checkpoint that verifies (each newer one that does not is one `warn` line); None
    when the run has none yet. Checkpoints that all fail to verify are a UserError listing them: starting again
    from step 1 would overwrite the run's logs and step folders, so that is only done on purpose."""
    from sslkit.errors import UserError

    ckpts = Path(run_dir) / CHECKPOINTS
    found = step_folders(ckpts)
    bad: list[tuple[Path, str]] = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            for b, why in bad:
                if warn is not None:
                    warn(f"{b}: {why}; falling back to an older checkpoint")
            return folder
        bad.append((folder, problem))
    if not bad:
        return None
    listed = "; ".join(f"{b.name}: {why}" for b, why in bad[:4]) + (f"; {len(bad) - 4} more" if len(bad) > 4 else "")
    raise UserError(f"{run_dir}: --resume auto found {len(bad)} checkpoint(s) and none verifies ({listed}); nothing "
                    f"was changed. To start over on purpose, move {ckpts} aside (or delete it) and run again, or "
                    "choose another --run-dir")


def flat_items(d: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} of a nested mapping (lists kept whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_items(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose value differs between two resolved configs, except those under `ignore` (by default the
    keys a resumed run may change)."""
    a, b = flat_items(old), flat_items(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == p or k.startswith(p + ".") for p in ignore)]


def changes_text(changed: list[str], shown: int = 6) -> str:
    """The first `shown` changed keys, comma-separated, ' ...' when there are more."""
    return ", ".join(changed[:shown]) + (" ..." if len(changed) > shown else "")


class RunDir:
    """An open run directory (rank 0 owns the files): lock held, stale temporaries removed, config written,
    per-step logs cut back to the step the run starts from. A run that fails before writing a checkpoint removes
    the directory it created. Used by both training loops:

        run = RunDir.open(path, resume, cfg_dict)          # refuses / resumes with the same rules everywhere
        try: ... run.start_step ... run.resume_from ...
        finally: run.close(ok)
    """

    LOGS = ("metrics.jsonl", "alarms.jsonl")

    def __init__(self, root: Path, resume_from: Path | None, created: bool, lock: RunLock | None):
        self.root = root
        self.resume_from = resume_from
        self.created = created
        self.lock = lock

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @classmethod
    def open(cls, root: str | Path, resume: str | None, config: dict, owner: bool = True,
             resume_from: Path | None = None, warn=None) -> "RunDir":
        """owner: this process writes the files (rank 0); other ranks pass the `resume_from` rank 0 chose."""
        import yaml

        root = Path(root)
        if not owner:
            return cls(root, resume_from, False, None)
        resume_from = resolve_resume(root, resume, warn)  # before anything is written: a refusal changes nothing
        created = not root.exists()
        lock = RunLock(root).acquire()
        try:
            remove_stale_temporaries(root / CHECKPOINTS)
            if resume_from is not None and (root / "config.yaml").is_file():
                old = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")) or {}
                changed = config_changes(old, config)
                if changed:
                    from sslkit.errors import UserError

                    raise UserError(f"{root}: --resume with another recipe: {changes_text(changed)} differ from "
                                    "config.yaml; resume with the same recipe or use a new --run-dir")
            _set_aside_newer(root / CHECKPOINTS, resume_from, warn)
            atomic_write_text(root / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            start = checkpoint_step(resume_from) if resume_from is not None else 0
            for name in cls.LOGS:
                truncate_jsonl(root / name, start)
        except BaseException:
            lock.release()
            raise
        return cls(root, resume_from, created, lock)

    @property
    def start_step(self) -> int:
        return checkpoint_step(self.resume_from) if self.resume_from is not None else 0

    KEPT_ON_FAILURE = ("skipped.jsonl",)  # what a failed run's error line may point at

    def close(self, ok: bool) -> None:
        """Release the lock; a failed run that created the directory and wrote no checkpoint leaves nothing, unless
        it wrote a file its error points at (the list of scans it could not read): then it is kept."""
        import shutil

        if self.lock is None:
            return
        self.lock.release()
        self.lock = None
        keep = step_folders(self.checkpoints) or any((self.root / n).is_file() for n in self.KEPT_ON_FAILURE)
        if not ok and self.created and not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _set_aside_newer(ckpt_root: Path, resume_from: Path | None, warn=None) -> None:
    """Resuming from an older checkpoint abandons the newer ones of this run: move them into
    `checkpoints/abandoned/` (kept, never resumed from by `--resume auto`), one warning line."""
    if resume_from is None or Path(resume_from).resolve().parent != Path(ckpt_root).resolve():
        return
    newer = [p for p in step_folders(ckpt_root) if checkpoint_step(p) > checkpoint_step(resume_from)]
    if not newer:
        return
    (ckpt_root / "abandoned").mkdir(exist_ok=True)
    for p in newer:
        dst = ckpt_root / "abandoned" / p.name
        while dst.exists():  # abandoned twice: keep both
            dst = dst.with_name(dst.name + "-again")
        os.replace(p, dst)
    if warn is not None:
        warn(f"resuming from {resume_from.name}: the {len(newer)} newer checkpoint(s) moved to "
             f"{ckpt_root / 'abandoned'}")


# ------------------------------------------------------------------------------------------ stopping

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; run again with --resume auto
MAX_SKIPPED_IN_A_ROW = 20  # train.nonfinite: skip gives up (stops) after this many non-finite steps in a row


class StopSignals:
    """SIGTERM and SIGUSR1 (what schedulers send before the wall time) and SIGINT ask the loop to stop after the
    current optimizer step, once a checkpoint is written; a second SIGINT stops at once (KeyboardInterrupt).

        with StopSignals() as stop:
            for step ...:
                ...
                if stop.requested: save; break
    Handlers can only be installed in the main thread; elsewhere this does nothing.
    """

    NAMES = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, say=None):
        self.requested: str | None = None
        self._say = say or (lambda text: print(text, file=__import__("sys").stderr, flush=True))
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if name == "SIGINT" and self.requested == "SIGINT":
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = name
            again = " (Ctrl-C again to stop at once)" if name == "SIGINT" else ""
            self._say(f"sslkit: {name} received: stopping after this step, once a checkpoint is written{again}")
