"""Preparation of a recipe's corpus into a store of preprocessed volumes, in parallel, in parts, resumable.

    sslkit data prepare --cfg RECIPE [--set KEY=VALUE ...] --out STORE [--workers N] [--part I --parts N]

`prepare_store` preprocesses every datalist entry of the recipe with `sslkit.data.pretrain.try_prepare_entry`, the
function pretraining itself uses (same chain, same parameters, same cache key), into `VolumeStore(out)`; pretraining
then reads it with `data.cache_dir: STORE`. Entry i belongs to part i % parts, so machines (or ranks) that prepare
parts 0..N-1 of one datalist into one folder write disjoint volumes, and the folder is byte-identical to one
preparation of the whole (the store writes deterministic files; `store.json` is rebuilt from the sidecars).
Entries already in the store are skipped (a killed preparation resumes where it stopped: volumes are complete only
once their sidecar lands). Preparations into one store at once (twice the same command, or parts of different
counts) lock each entry while they prepare it (`entry_lock`): the later one waits, then finds it stored. Bad scans
are skipped and listed in `<out>/skipped.jsonl` with the rows pretraining writes, kept sorted by (path, label) so
parts give the same file; a row disappears once its entry is prepared.

Workers are processes (fork where available, else spawn) with one torch and one blosc2 thread each.

Pretraining without a prepared store prepares with every rank at once (`prepare_with_ranks`): rank r of w prepares
the entries with i % w == r, writes `<run_dir>/.prepare/<token>/<r>.json` (its bad entries, or its error), then polls
the folder for the other ranks' markers (no collective is held while scans are preprocessed); only then do the ranks
meet at a barrier and each opens the complete store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sslkit.errors import DataError, UserError
from sslkit.run import atomic_write_json, atomic_write_text

SKIPPED_NAME = "skipped.jsonl"
MARKERS = ".prepare"
WAIT_ENV = "SSLKIT_PREPARE_TIMEOUT"     # seconds a rank waits for the other ranks' parts (default below)
MIN_WAIT_S = 3600.0                     # ... at least this long, and at least 3x its own part's duration
POLL_S = 1.0


def part_indices(n: int, part: int, parts: int) -> list[int]:
    """Datalist indices of part `part` of `parts`: i % parts == part (disjoint, together all of range(n))."""
    check_part(part, parts)
    return list(range(part, n, parts))


def check_part(part: int, parts: int, where: str = "--part/--parts") -> None:
    if parts < 1 or not 0 <= part < parts:
        raise UserError(f"{where}: need parts >= 1 and 0 <= part < parts, got part {part} of {parts}")


@dataclass
class PrepareReport:
    """What one `prepare_store` call did: entries of its part, volumes already stored, prepared now, skipped."""
    store: str
    part: int
    parts: int
    entries: int
    already: int
    prepared: int
    skipped: int
    seconds: float

    def line(self) -> str:
        skipped = f", {self.skipped} skipped (see {Path(self.store) / SKIPPED_NAME})" if self.skipped else ""
        part = f" part {self.part + 1}/{self.parts}:" if self.parts > 1 else ""
        return (f"{self.store}:{part} prepared {self.prepared} scans, {self.already} already in the store"
                f"{skipped}, {self.seconds:.1f} s; index {Path(self.store) / 'store.json'}")


# ------------------------------------------------------------------------------------------------ workers

_WORKER: dict = {}
LOCK_NAME = ".prepare.lock"  # one empty file per store: entries are locked as byte ranges of it


def _init_worker(data_cfg, out: str, crop_size: list[int]) -> None:
    """Each worker: one torch and one blosc2 thread (the workers are the parallelism), its own store and chains."""
    import blosc2
    import torch

    torch.set_num_threads(1)
    blosc2.set_nthreads(1)
    from sslkit.data.store import VolumeStore

    lock = os.open(Path(out) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    _WORKER.update(cfg=data_cfg, store=VolumeStore(out), crop_size=crop_size, transforms={}, lock=lock)


@contextlib.contextmanager
def entry_lock(fd: int, item: dict):
    """Hold the store's lock of one datalist entry (a one-byte record lock of the store's lock file at an offset
    hashed from its paths): another process preparing the same entry into the same store (a second `sslkit data
    prepare`, another part count) waits here, then finds it stored, instead of replacing the files being written
    (which made the first one log a false skip). Released by the OS if the process dies."""
    import fcntl
    import hashlib

    ident = f"{Path(str(item['image'])).resolve()}\0{item.get('label') or ''}".encode()
    offset = int.from_bytes(hashlib.blake2b(ident, digest_size=4).digest(), "big")
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


def _work(task: tuple[int, dict]) -> tuple[int, dict | None, dict | None, bool]:
    from sslkit.data.pretrain import try_prepare_entry

    i, item = task
    w = _WORKER
    with entry_lock(w["lock"], item):  # the store is asked again under the lock: another process may have made it
        volume, row, made = try_prepare_entry(item, w["cfg"], w["store"], w["crop_size"], w["transforms"])
    return i, volume, row, made


def _context():
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _run_tasks(tasks: list[tuple[int, dict]], data_cfg, out: Path, crop_size: list[int], workers: int, bar):
    """Yield (index, volume, row, made) for every task, in completion order."""
    if workers == 1 or len(tasks) <= 1:
        saved = None
        try:
            import torch

            saved = torch.get_num_threads()
            _init_worker(data_cfg, str(out), crop_size)
            for task in tasks:
                yield _work(task)
                bar.update(1)
        finally:
            if "lock" in _WORKER:
                os.close(_WORKER["lock"])
            _WORKER.clear()  # this process is no worker: drop its store, chains and lock
            if saved is not None:
                torch.set_num_threads(saved)
        return
    with _context().Pool(min(workers, len(tasks)), initializer=_init_worker,
                         initargs=(data_cfg, str(out), crop_size)) as pool:
        for result in pool.imap_unordered(_work, tasks, chunksize=1):
            yield result
            bar.update(1)


# ------------------------------------------------------------------------------------------------ skip log


def merge_skip_rows(log: Path, new_rows: list[dict], prepared: set[tuple]) -> int:
    """Rewrite `log` with its rows plus `new_rows`, one per (path, label), sorted, minus the entries in `prepared`
    ((path, label) prepared since). Under an exclusive lock (parts of one store may finish at once). Rows left."""
    import fcntl

    log.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(log.parent, os.O_RDONLY)  # the lock is the folder's own: no lock file left in the store
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        rows: dict[tuple, dict] = {}
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    rows[(row["path"], row.get("label"))] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        for row in new_rows:
            rows[(row["path"], row.get("label"))] = row
        kept = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] or "")) if k not in prepared]
        if kept or log.exists():
            atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
        return len(kept)
    finally:
        os.close(folder)  # releases the lock


# ------------------------------------------------------------------------------------------------ preparing


def prepare_store(cfg, out: str | Path, workers: int = 1, part: int = 0, parts: int = 1,
                  progress: bool = True) -> PrepareReport:
    """Preprocess part `part` of `parts` of the recipe's datalist (`cfg`: a pretraining Config) into the store
    `out` with `workers` processes; skip entries already stored; list bad scans in `<out>/skipped.jsonl`; rebuild
    `<out>/store.json`. Returns a PrepareReport."""
    from tqdm.auto import tqdm

    from sslkit.data.datalist import load_datalist
    from sslkit.data.pretrain import check_store_dtype, store_crop_size, try_prepare_entry
    from sslkit.data.store import VolumeStore, build_index

    check_part(part, parts)
    check_store_dtype(cfg.data.store_dtype)
    if workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    start = time.perf_counter()
    out = Path(out)
    items = load_datalist(cfg.data.datalist, key=cfg.data.datalist_key)
    crop_size = store_crop_size(cfg.data.roi, cfg.model.spatial_dims)
    store = VolumeStore(out)
    out.mkdir(parents=True, exist_ok=True)
    stored = store.infos()
    mine = part_indices(len(items), part, parts)
    # entries already stored (or failing before any preprocessing: missing files) are settled here, cheaply
    tasks, rows, prepared, already = [], [], set(), 0
    for i in mine:
        volume, row, made = try_prepare_entry(items[i], cfg.data, store, crop_size, {}, stored) \
            if _is_settled(items[i], cfg.data, stored) else (None, None, False)
        if volume is not None:
            already += 1
        elif row is not None:
            rows.append(row)
        else:
            tasks.append((i, items[i]))
    n_made = 0
    bar = tqdm(total=len(tasks), desc=f"preparing {out.name}" + (f" part {part + 1}/{parts}" if parts > 1 else ""),
               unit="scan", disable=not progress, dynamic_ncols=True)
    try:
        for _, volume, row, made in _run_tasks(tasks, cfg.data, out, crop_size, workers, bar):
            n_made += made
            if row is not None:
                rows.append(row)
            else:
                prepared.add((volume["path"], volume.get("label")))
                already += not made  # another preparation of this store made it while this one waited
    finally:
        bar.close()
    n_skipped = len(rows)
    merge_skip_rows(out / SKIPPED_NAME, rows, prepared)
    build_index(out)
    return PrepareReport(str(out), part, parts, len(mine), already, n_made, n_skipped,
                         round(time.perf_counter() - start, 3))


def _is_settled(item: dict, data_cfg, stored: dict) -> bool:
    """True when an entry needs no preprocessing: its volume is stored, or it fails before preprocessing (missing
    image or label). Then `try_prepare_entry` answers without running the chain."""
    from sslkit.data.preprocess import entry_modality, preprocessing_params
    from sslkit.data.pretrain import cache_key, entry_label

    try:
        label = entry_label(item, data_cfg.with_labels)
        modality = entry_modality(item, data_cfg.modality)
        key = cache_key(str(item["image"]), preprocessing_params(data_cfg, modality), label, data_cfg.store_dtype)
    except (OSError, UserError):
        return True
    return key in stored


# ------------------------------------------------------------------------------------------------ ranks


def _wait_limit(own_seconds: float) -> float:
    env = os.environ.get(WAIT_ENV)
    if env:
        try:
            return float(env)
        except ValueError:
            raise UserError(f"{WAIT_ENV}={env!r}: not a number of seconds") from None
    return max(MIN_WAIT_S, 3.0 * own_seconds)


def _write_marker(folder: Path, rank: int, content: dict) -> None:
    atomic_write_json(folder / f"{rank}.json", content, indent=None)


def wait_for_parts(folder: Path, world: int, timeout_s: float, poll_s: float = POLL_S) -> dict[int, dict]:
    """Poll `folder` until every rank's marker `<r>.json` is there; {rank: marker}. DataError naming the missing
    ranks after `timeout_s`, or at once when a rank reports an error."""
    deadline = time.monotonic() + timeout_s
    while True:
        markers = {}
        for r in range(world):
            try:
                markers[r] = json.loads((folder / f"{r}.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
        failed = {r: m["error"] for r, m in markers.items() if m.get("error")}
        if failed:
            r, err = sorted(failed.items())[0]
            raise DataError(f"rank {r} failed while preparing its part of the store: {err}")
        if len(markers) == world:
            return markers
        if time.monotonic() > deadline:
            missing = [r for r in range(world) if r not in markers]
            raise DataError(f"{folder}: ranks {missing} did not finish preparing their parts of the store within "
                            f"{timeout_s:.0f} s (set {WAIT_ENV} to wait longer, or prepare the store first with "
                            f"`sslkit data prepare`)")
        time.sleep(poll_s)


def prepare_with_ranks(ds, rank: int, world: int, markers: Path, barrier, progress: bool = True,
                       timeout_s: float | None = None, poll_s: float = POLL_S):
    """Prepare `ds` (a PretrainDataset) with `world` ranks at once: this rank preprocesses part `rank` of `world`,
    writes its marker in `markers` (a folder unique to this start, shared by the ranks), waits for the others' by
    polling, then calls `barrier()` once (all ranks arrive within seconds) and opens the complete store. Bad
    entries are logged by rank 0 only, in datalist order; rank 0 removes the markers (and their parent folder when
    it is left empty). Returns ds."""
    t0 = time.perf_counter()
    try:
        failures = ds.prepare_part(rank, world, progress=progress)
    except BaseException as e:
        _write_marker(markers, rank, {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        raise
    _write_marker(markers, rank, {"failures": {str(i): row for i, row in failures.items()}})
    limit = timeout_s if timeout_s is not None else _wait_limit(time.perf_counter() - t0)
    found = wait_for_parts(markers, world, limit, poll_s)
    merged = {int(i): row for m in found.values() for i, row in m["failures"].items()}
    barrier()  # every marker has been read by every rank past this point
    if rank == 0:
        shutil.rmtree(markers, ignore_errors=True)
        with contextlib.suppress(OSError):
            markers.parent.rmdir()  # the folder of markers of every start, once empty
    return ds.prepare(progress=False, failures=merged, log_skips=rank == 0)


# ------------------------------------------------------------------------------------------------ command line



