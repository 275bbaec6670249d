"""Compressed, crop-addressable store of preprocessed volumes (one blosc2 `.b2nd` file per scan).

Layout of a store folder, per volume `key` (letters, digits, `_`, `-`; chosen by the caller):

    <key>.b2nd        image (C, X, Y, Z) or (C, X, Y), stored as float32 | float16 | int16
    <key>.label.b2nd  optional integer label map (1, X, Y[, Z]), stored exactly in the smallest integer dtype
    <key>.json        sidecar, written LAST: shape, dtypes, scale/offset, chunks/blocks, bytes, the quantisation
                      error measured at write time on the written file (max |x̂ − x|, and that divided by the
                      volume's value range max − min, or by max |x| for a constant volume) and the caller's `meta`
    store.json        index of every complete volume (`build_index`)

Every file is written under a temporary name (`<name>.tmp-<pid>-<random>`) and renamed with `os.replace`; a
rewrite deletes the old sidecar first. A volume is complete only when its sidecar exists, its files have the
sizes the sidecar records and no temporary file of the key is left, so a killed writer never leaves a volume
that looks complete, and the next `write` of that key starts clean.

Dtype modes (`write(..., dtype=)`; reads always return float32):
    float32  exact.
    float16  x̂ = float16(x) (round to nearest); |x̂ − x| ≤ 2⁻¹¹·|x| for normal values.
    int16    per-volume linear quantisation: offset = (max + min)/2, scale = (max − min)/65534 (1 for a constant
             volume), both rounded to float32; q = clip(rint((x − offset)/scale), −32767, 32767);
             x̂ = q·scale + offset in float32, so |x̂ − x| ≲ scale/2 = (max − min)/131068.

Partition (`choose_partition`): a random crop decompresses only the blosc2 blocks it intersects (C-Blosc2 masks
the others out of each chunk it reads), so blocks are sized to the crop and to a core's L1 cache, as in
nnU-Net v2 / nnssl's `comp_blosc2_params`, and chunks to about one crop:
    blocks: every spatial edge starts at the largest power of two ≤ crop/4 (≥ 1, ≤ the array's extent), all
            channels in one block; while C·Πblock·itemsize > BLOCK_BYTES (32 KiB, an L1d cache), halve the edge
            with the largest edge/crop ratio (first such axis). A window of r voxels then decodes about
            r + b − 1 voxels per axis (≈ 1.23 r for b = r/4): ≈ 1.9× the crop in 3-D, instead of the ≈ 8× of
            decoding whole crop-sized chunks.
    chunks: the crop rounded up to whole blocks (≤ the extent); while C·Πchunk·itemsize > CHUNK_BYTES (1 MiB,
            an L2 cache), halve the edge with the largest chunk/block ratio (first such axis; whole blocks).
The cache sizes are constants, not probed, so two machines preparing halves of a corpus write identical files.

Codec: LZ4HC level 5 with byte shuffle, one thread per compression (blosc2's frame records the thread count, so
this also makes files byte-identical whatever `blosc2.set_nthreads` says). Measured on the demo head CT
(256×256×108, window [-175, 250] HU → [0, 1], 1 core, random 64³ crops): LZ4HC decodes as fast as LZ4 (its
output is LZ4's format with longer matches) and is 7–16 % smaller; ZSTD level 1 is ~25 % smaller still but
decodes 3–4× slower; BLOSCLZ is larger and no faster; bit-shuffle is larger and slower. Sizes / float32:
0.24 (float32), 0.11 (float16), 0.15 (int16). Speed: decoding runs at ~1–2 GB/s per core and blosc2 pays ~4 µs per
block: a random 48³ float16 window takes ~240 µs (LZ4HC), and still ~130 µs with compression off (clevel 0), against
~75 µs for the same float32 window copied from a page-cached `.npy` memmap. So a page-cached memmap reads crops
faster, and no blosc2 setting reaches 0.8× of it: `benchmarks/data_pipeline.py` (500 synthetic scans, 48³ crops, 1
core) reads 0.10–0.15× as many crops per second from the store as from memmaps kept open, 0.4–0.7× as from memmaps
opened per read, and 0.26–0.39× with both files evicted from the guest's page cache before each pass (this VM's disk
is itself cached by its host, so reading 5× fewer bytes did not pay there; on storage slower than decoding it
would). What the store buys is size (0.19× the float32 bytes); a crop costs ~0.6 ms against ~8 ms for one strong
view of it, so training steps do not wait for data (0.94–0.99× the in-memory step rate on 2 shared cores).

Reading: arrays are opened lazily with one blosc2 thread and read through the page cache with plain file reads
(not memory-mapped: the pages a map touches count in a DataLoader worker's resident memory until it is unmapped),
and cached per process (the cache is dropped when `os.getpid()` changes, so DataLoader workers forked after a read
reopen their own). At most `max_open` (default MAX_OPEN = 32) volumes stay open per process, least recently used
closed first: an open volume holds ~0.2 MB of blosc2 state. Measured on 500 volumes, random 48³ crops, 1 core:
plain reads with 32 open read as fast as memory maps with 128 open (~1700 crops/s, both ±20 %) while the process
grew by ~10 MB instead of ~200 MB. The first open of a key in a process checks its sidecar and file sizes (no
directory listing); the sidecar is kept, so reopening a closed volume costs only blosc2's open (~0.15 ms).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sslkit.errors import DataError, UserError

VOLUME_FORMAT = "sslkit.volume/1"
INDEX_FORMAT = "sslkit.store/1"
INDEX_NAME = "store.json"
DTYPES = ("float32", "float16", "int16")
DEFAULT_CROP = 64
BLOCK_BYTES = 32 * 1024       # an L1d cache: blosc decodes and unshuffles one block at a time
CHUNK_BYTES = 1024 * 1024     # an L2 cache: the buffer one chunk is decoded into
CODEC, CLEVEL, FILTER = "LZ4HC", 5, "SHUFFLE"
_INT16_STEPS = 65534          # q in [-32767, 32767]
_TMP = ".tmp-"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
_SLAB = 8                     # rows (axis 1) per slab when quantising / measuring error, to bound memory
MAX_OPEN = 32                 # open volumes kept per process


# ------------------------------------------------------------------------------------------- geometry

def _crop_sizes(crop_size, n_spatial: int) -> list[int]:
    if crop_size is None:
        crop_size = DEFAULT_CROP
    sizes = [int(crop_size)] * n_spatial if np.isscalar(crop_size) else [int(c) for c in crop_size]
    if len(sizes) != n_spatial or min(sizes) < 1:
        raise UserError(f"crop_size: {crop_size!r} needs {n_spatial} positive sizes")
    return sizes


def _halve_until(edges: list[int], limit_bytes: int, unit_bytes: int, weight: Sequence[float],
                 floor: Sequence[int], step: Sequence[int]) -> list[int]:
    """Halve (in multiples of `step`, not below `floor`) the edge with the largest edge/weight ratio until
    unit_bytes·Πedges ≤ limit_bytes or nothing can shrink."""
    edges = list(edges)
    while unit_bytes * math.prod(edges) > limit_bytes:
        movable = [i for i in range(len(edges)) if edges[i] > floor[i]]
        if not movable:
            break
        i = max(movable, key=lambda a: (edges[a] / weight[a], -a))
        edges[i] = max(floor[i], step[i] * math.ceil(edges[i] / 2 / step[i]))
    return edges


def choose_partition(shape: Sequence[int], itemsize: int, crop_size=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for an array (C, *spatial) of `itemsize`-byte items read in crops of `crop_size` (int or
    one size per spatial axis; default 64). Rule in the module docstring. Channels stay whole in both."""
    shape = [int(s) for s in shape]
    channels, extent = shape[0], shape[1:]
    crop = _crop_sizes(crop_size, len(extent))
    ones = [1] * len(extent)
    blocks = [min(e, 2 ** int(math.floor(math.log2(max(1, c // 4))))) for e, c in zip(extent, crop)]
    blocks = _halve_until(blocks, BLOCK_BYTES, channels * itemsize, crop, ones, ones)
    chunks = [min(e, b * math.ceil(c / b)) for e, b, c in zip(extent, blocks, crop)]
    chunks = _halve_until(chunks, CHUNK_BYTES, channels * itemsize, blocks, blocks, blocks)
    chunks = [max(c, b) for c, b in zip(chunks, blocks)]
    return (channels, *chunks), (channels, *blocks)


def _axis_cells(lo: int, hi: int, chunk: int, block: int) -> list[tuple[int, int]]:
    """(chunk index, block index inside the chunk) along one axis for the voxels [lo, hi)."""
    cells = []
    for c in range(lo // chunk, (hi - 1) // chunk + 1):
        first, last = max(lo, c * chunk) - c * chunk, min(hi, (c + 1) * chunk) - c * chunk
        cells.extend((c, k) for k in range(first // block, (last - 1) // block + 1))
    return cells


def touched_blocks(shape: Sequence[int], chunks: Sequence[int], blocks: Sequence[int],
                   starts: Sequence[int], sizes: Sequence[int]) -> list[tuple[int, int]]:
    """The blosc2 (chunk, block) pairs a crop decodes: sorted (nchunk, nblock) flat indices, chunks in C order of
    the chunk grid ceil(shape/chunks), blocks in C order of the block grid ceil(chunks/blocks) inside a chunk
    (b2nd's numbering). The crop covers all channels and [start, start + size) per spatial axis, clipped to the
    array (a window past the border decodes nothing there)."""
    lo = [0] + [max(0, int(s)) for s in starts]
    hi = [int(shape[0])] + [min(int(n), int(s) + int(z)) for n, s, z in zip(shape[1:], starts, sizes)]
    if any(h <= l for l, h in zip(lo, hi)):
        return []
    per_axis = [_axis_cells(l, h, c, b) for l, h, c, b in zip(lo, hi, chunks, blocks)]
    chunk_grid = [math.ceil(n / c) for n, c in zip(shape, chunks)]
    block_grid = [math.ceil(c / b) for c, b in zip(chunks, blocks)]
    out = set()
    for cell in np.ndindex(*[len(p) for p in per_axis]):
        picks = [per_axis[a][i] for a, i in enumerate(cell)]
        nchunk = int(np.ravel_multi_index([p[0] for p in picks], chunk_grid))
        nblock = int(np.ravel_multi_index([p[1] for p in picks], block_grid))
        out.add((nchunk, nblock))
    return sorted(out)


# ------------------------------------------------------------------------------------------- quantisation

def _slabs(n: int, step: int = _SLAB):
    for a in range(0, n, step):
        yield slice(a, min(n, a + step))


def _int16_params(lo: float, hi: float) -> tuple[np.float32, np.float32]:
    """(scale, offset) as float32: q = rint((x − offset)/scale) spans [−32767, 32767] over [lo, hi]."""
    scale = np.float32((hi - lo) / _INT16_STEPS)
    if not (hi > lo and scale > 0):
        return np.float32(1.0), np.float32(lo)
    return scale, np.float32((hi + lo) / 2.0)


def _quantise(image: np.ndarray, dtype: str, scale: np.float32, offset: np.float32) -> np.ndarray:
    """float32 image -> stored array (same shape) of `dtype`."""
    if dtype == "float32":
        return image
    if dtype == "float16":
        return image.astype(np.float16)
    q = np.empty(image.shape, np.int16)
    for s in _slabs(image.shape[1]):
        x = (image[:, s].astype(np.float64) - float(offset)) / float(scale)
        q[:, s] = np.clip(np.rint(x), -32767, 32767)
    return q


def _dequantise(stored: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """Stored array -> float32: float32 as is, float16 widened, int16 q·scale + offset (float32 arithmetic)."""
    if stored.dtype == np.float32:
        return stored
    if stored.dtype == np.float16:
        return _widen_float16(stored)
    out = stored.astype(np.float32)
    out *= np.float32(scale)
    out += np.float32(offset)
    return out


_SERIAL_ELEMENTS = 32768  # torch's GRAIN_SIZE: smaller copies never start its intra-op thread pool


def _widen_float16(stored: np.ndarray) -> np.ndarray:
    """float16 -> float32 with torch's F16C copy (~15x numpy's astype), in pieces below torch's grain size: one
    copy of a whole crop would wake torch's thread pool, whose barrier costs ~10 ms per call on busy cores."""
    import torch

    src = torch.from_numpy(np.ascontiguousarray(stored).reshape(-1))
    out = torch.empty(src.shape, dtype=torch.float32)
    for a in range(0, src.numel(), _SERIAL_ELEMENTS):
        out[a:a + _SERIAL_ELEMENTS].copy_(src[a:a + _SERIAL_ELEMENTS])
    return out.numpy().reshape(stored.shape)


def _label_dtype(lo: int, hi: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.int16, np.int32, np.int64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise AssertionError("unreachable: int64 holds every integer label")


# ------------------------------------------------------------------------------------------- files

def _blosc2():
    import blosc2

    return blosc2


def _write_b2nd(arr: np.ndarray, path: Path, chunks, blocks) -> None:
    """Write `arr` to `path` (LZ4HC 5 + shuffle, one thread: deterministic bytes) and flush it to disk."""
    b2 = _blosc2()
    cparams = b2.CParams(codec=getattr(b2.Codec, CODEC), clevel=CLEVEL, filters=[getattr(b2.Filter, FILTER)],
                         nthreads=1)
    written = b2.asarray(np.ascontiguousarray(arr), urlpath=str(path), mode="w", chunks=tuple(chunks),
                         blocks=tuple(blocks), cparams=cparams, dparams=b2.DParams(nthreads=1))
    del written
    _fsync(path)


def _open_b2nd(path: Path):
    b2 = _blosc2()
    try:
        return b2.open(str(path), mode="r", dparams=b2.DParams(nthreads=1))
    except Exception as e:  # noqa: BLE001 - blosc2 raises several types for a bad file
        raise DataError(f"{path}: not a readable blosc2 array ({type(e).__name__}: {e})".splitlines()[0]) from e


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict, tag: str) -> None:
    """Deterministic JSON (sorted keys, no timestamps, no NaN), flushed to disk, via the store's temp name `tag`."""
    from sslkit.run import atomic_write_json

    atomic_write_json(path, obj, indent=1, sort_keys=True, fsync=True, allow_nan=False,
                      tmp=path.with_name(path.name + tag))


def _jsonable(value, where: str):
    """Caller meta -> plain JSON types (numpy arrays/scalars, tuples, Paths converted); UserError otherwise."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: meta holds a non-finite number ({value})")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"{where}: meta value of type {type(value).__name__} is not JSON-serialisable")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key) or key == Path(INDEX_NAME).stem:
        raise UserError(f"volume key {key!r}: use letters, digits, '_' and '-' (not 'store')")
    return key


# ------------------------------------------------------------------------------------------- the store

@dataclass
class _Open:
    info: dict
    image: object               # blosc2.NDArray
    label: object = None        # opened on the first label read


class VolumeStore:
    """A folder of compressed volumes addressed by key; reads return float32 crops (int64 for labels).

    >>> store = VolumeStore("prepared/")
    >>> store.write("case001", image, {"source": "/data/case001.nii.gz", "spacing": [1.5, 1.5, 2.0]}, dtype="int16")
    >>> store.read_crop("case001", starts=(10, 20, 0), sizes=(64, 64, 64)).shape   # (C, 64, 64, 64)
    """

    def __init__(self, root: str | Path, max_open: int = MAX_OPEN):
        self.root = Path(root)
        self.max_open = max(1, int(max_open))
        self._pid = os.getpid()
        self._handles: OrderedDict[str, _Open] = OrderedDict()  # least recently used first
        self._checked: dict[str, dict] = {}  # sidecars of volumes this process found complete (kept when closed)

    def __getstate__(self) -> dict:  # open handles never travel to another process
        return {"root": self.root, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state.get("max_open", MAX_OPEN))

    # ---------------------------------------------------------------- paths and completeness

    def image_path(self, key: str) -> Path:
        return self.root / f"{key}.b2nd"

    def label_path(self, key: str) -> Path:
        return self.root / f"{key}.label.b2nd"

    def sidecar_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def _temp_files(self, key: str) -> list[Path]:
        return sorted(self.root.glob(f"{key}.*{_TMP}*"))

    def _read_sidecar(self, key: str) -> dict | None:
        try:
            info = json.loads(self.sidecar_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and info.get("format") == VOLUME_FORMAT else None

    def _files_match(self, info: dict) -> bool:
        """The image (and label) files exist with the byte sizes the sidecar records."""
        key = info["key"]
        expected = [(self.image_path(key), info["image_bytes"])]
        if info.get("label"):
            expected.append((self.label_path(key), info["label"]["bytes"]))
        try:
            return all(p.stat().st_size == n for p, n in expected)
        except OSError:
            return False

    def _complete_info(self, key: str, temp_keys: set[str] | None = None) -> dict | None:
        info = self._read_sidecar(key)
        if info is None or info.get("key") != key or not self._files_match(info):
            return None
        has_temp = key in temp_keys if temp_keys is not None else bool(self._temp_files(key))
        return None if has_temp else info

    def has(self, key: str) -> bool:
        """True when `key` is complete: sidecar present and valid, files of the recorded sizes, no temp file."""
        return _KEY.match(str(key)) is not None and self._complete_info(key) is not None

    def keys(self) -> list[str]:
        """Sorted keys of the complete volumes (one directory listing)."""
        return list(self.infos())

    def infos(self) -> dict[str, dict]:
        """{key: sidecar} of every complete volume, sorted by key, from one directory listing (a corpus-sized
        folder is listed once, not once per key as `has` / `info` would)."""
        if not self.root.is_dir():
            return {}
        names = [p.name for p in self.root.iterdir()]
        temp_keys = {n.split(".", 1)[0] for n in names if _TMP in n}
        candidates = sorted(n[:-5] for n in names if n.endswith(".json") and _KEY.match(n[:-5]) and n != INDEX_NAME)
        found = {k: self._complete_info(k, temp_keys) for k in candidates}
        return {k: info for k, info in found.items() if info is not None}

    def info(self, key: str) -> dict:
        """The sidecar of a complete volume (a copy). DataError if the volume is absent or incomplete."""
        info = self._complete_info(_check_key(key))
        if info is None:
            raise DataError(f"{self.sidecar_path(key)}: volume {key!r} is not in the store (missing or incomplete)")
        return info

    def shape(self, key: str) -> tuple[int, ...]:
        """(C, X, Y[, Z]) of the image."""
        return tuple(self._open(key).info["shape"])

    # ---------------------------------------------------------------- writing

    def write(self, key: str, image: np.ndarray, meta: dict | None = None, dtype: str = "float16",
              label: np.ndarray | None = None, crop_size=None) -> dict:
        """Store `image` (C, X, Y[, Z]) float (and `label` (1, X, Y[, Z]) integer-valued) under `key`; returns the
        sidecar. Replaces any previous (complete or partial) volume of that key. `meta` (JSON-able: e.g. "source",
        "spacing", "affine") is kept verbatim under the sidecar's "meta"; `crop_size` (int or per spatial axis,
        default 64) sizes chunks and blocks."""
        key = _check_key(key)
        if dtype not in DTYPES:
            raise UserError(f"store dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        image = self._check_image(image, key)
        lo, hi = float(image.min()), float(image.max())
        if dtype == "float16" and max(abs(lo), abs(hi)) > float(np.finfo(np.float16).max):
            raise DataError(f"{key}: values reach {max(abs(lo), abs(hi)):g}, beyond float16; use int16 or float32")
        labels = self._check_label(label, image.shape, key) if label is not None else None
        meta = _jsonable(meta or {}, f"{key}: meta")
        crop = _crop_sizes(crop_size, image.ndim - 1)

        self.root.mkdir(parents=True, exist_ok=True)
        self._discard(key)  # from here on the key reads as absent until its new sidecar lands
        tag = f"{_TMP}{os.getpid()}-{os.urandom(4).hex()}"
        scale, offset = _int16_params(lo, hi) if dtype == "int16" else (np.float32(1.0), np.float32(0.0))
        chunks, blocks, max_err = self._write_image(image, dtype, scale, offset, crop, key, tag)
        label_info = self._write_label(labels, key, tag, crop) if labels is not None else None
        os.replace(self._temp(self.image_path(key), tag), self.image_path(key))
        if label_info is not None:
            os.replace(self._temp(self.label_path(key), tag), self.label_path(key))

        image_bytes = self.image_path(key).stat().st_size
        value_range = hi - lo if hi > lo else max(abs(lo), abs(hi))
        info = {
            "format": VOLUME_FORMAT, "key": key, "shape": list(image.shape), "dtype": "float32",
            "stored_dtype": dtype, "scale": float(scale), "offset": float(offset),
            "value_min": lo, "value_max": hi,
            "quant_max_abs_error": max_err,
            "quant_max_rel_error": max_err / value_range if value_range > 0 else 0.0,
            "chunks": list(chunks), "blocks": list(blocks), "crop_size": crop,
            "codec": CODEC, "clevel": CLEVEL, "filter": FILTER,
            "image_bytes": image_bytes, "float32_bytes": int(image.size) * 4,
            "bytes_on_disk": image_bytes + (label_info["bytes"] if label_info else 0),
            "label": label_info, "meta": meta,
        }
        _write_json_atomic(self.sidecar_path(key), info, tag)  # last: marks the volume complete
        return copy.deepcopy(info)

    @staticmethod
    def _temp(path: Path, tag: str) -> Path:
        return path.with_name(path.name + tag)

    def _write_image(self, image: np.ndarray, dtype: str, scale, offset, crop: list[int], key: str,
                     tag: str) -> tuple[tuple, tuple, float]:
        """Quantise and write the image's temp file; (chunks, blocks, max abs error measured on the file)."""
        stored = _quantise(image, dtype, scale, offset)
        chunks, blocks = choose_partition(image.shape, stored.itemsize, crop)
        tmp = self._temp(self.image_path(key), tag)
        _write_b2nd(stored, tmp, chunks, blocks)
        del stored
        return chunks, blocks, self._max_error(tmp, image, scale, offset, chunks[1])

    def _discard(self, key: str) -> None:
        """Before a rewrite: drop the sidecar (the volume turns incomplete), stale temp files, an old label file
        and this process's open handle."""
        self._handles.pop(key, None)
        self._checked.pop(key, None)
        for p in [self.sidecar_path(key), *self._temp_files(key), self.label_path(key)]:
            p.unlink(missing_ok=True)

    @staticmethod
    def _check_image(image, key: str) -> np.ndarray:
        arr = np.asarray(image)
        if arr.ndim not in (3, 4) or arr.size == 0:
            raise DataError(f"{key}: image must be (C, X, Y) or (C, X, Y, Z) and non-empty, got {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{key}: image dtype {arr.dtype} is not numeric")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise DataError(f"{key}: image holds NaN or infinite voxels")
        return arr

    @staticmethod
    def _check_label(label, image_shape: tuple, key: str) -> np.ndarray:
        lab = np.asarray(label)
        want = (1,) + tuple(image_shape[1:])
        if lab.shape != want:
            raise DataError(f"{key}: label is {lab.shape}, expected {want} (one channel, the image's grid)")
        if not np.issubdtype(lab.dtype, np.integer):
            if not np.issubdtype(lab.dtype, np.floating) or not np.isfinite(lab).all() \
                    or not np.array_equal(lab, np.round(lab)):
                raise DataError(f"{key}: label holds non-integer values (class indices expected)")
        lo, hi = int(lab.min()), int(lab.max())
        return np.ascontiguousarray(lab, dtype=_label_dtype(lo, hi))

    def _write_label(self, labels: np.ndarray, key: str, tag: str, crop: list[int]) -> dict:
        chunks, blocks = choose_partition(labels.shape, labels.itemsize, crop)
        tmp = self._temp(self.label_path(key), tag)
        _write_b2nd(labels, tmp, chunks, blocks)
        if not np.array_equal(_open_b2nd(tmp)[...], labels):
            raise DataError(f"{tmp}: label did not read back identically")
        return {"file": self.label_path(key).name, "stored_dtype": str(labels.dtype), "chunks": list(chunks),
                "blocks": list(blocks), "bytes": tmp.stat().st_size,
                "values": [int(v) for v in np.unique(labels)]}

    @staticmethod
    def _max_error(path: Path, image: np.ndarray, scale, offset, rows: int) -> float:
        """max |dequantise(file) − image| over the whole volume, read back one chunk row at a time (float32
        arithmetic, the same as every read)."""
        arr = _open_b2nd(path)
        err = 0.0
        for s in _slabs(image.shape[1], rows):
            restored = _dequantise(arr[:, s], scale, offset)
            err = max(err, float(np.abs(restored - image[:, s]).max()))
        return err

    # ---------------------------------------------------------------- reading

    def _open(self, key: str) -> _Open:
        """This process's handle of `key` (reopened after a fork; one blosc2 thread)."""
        if os.getpid() != self._pid:
            self._pid, self._handles, self._checked = os.getpid(), OrderedDict(), {}
        handle = self._handles.get(key)
        if handle is not None:
            self._handles.move_to_end(key)
            return handle
        _blosc2().set_nthreads(1)  # DataLoader workers already parallelise over crops
        info = self._checked.get(key)
        if info is None:  # first open in this process: sidecar + file sizes (no listing); reopens skip it
            info = self._complete_info(_check_key(key), temp_keys=set())
            if info is None:
                raise DataError(f"{self.sidecar_path(key)}: volume {key!r} is not in the store (missing or "
                                f"incomplete)")
            self._checked[key] = info
        image = _open_b2nd(self.image_path(key))
        if list(image.shape) != info["shape"]:
            raise DataError(f"{self.image_path(key)}: shape {image.shape} differs from its sidecar {info['shape']}")
        while len(self._handles) >= self.max_open:
            self._handles.popitem(last=False)
        handle = self._handles[key] = _Open(info, image)
        return handle

    def close(self) -> None:
        """Drop this process's open handles and what it checked."""
        self._handles, self._checked = OrderedDict(), {}

    @staticmethod
    def _window(shape: tuple, starts, sizes, key: str) -> tuple[list[int], list[int]]:
        starts, sizes = [int(s) for s in starts], [int(z) for z in sizes]
        n = len(shape) - 1
        if len(starts) != n or len(sizes) != n or min(sizes) < 1:
            raise UserError(f"{key}: a crop of this {n}-D volume needs {n} starts and {n} positive sizes, "
                            f"got starts={starts} sizes={sizes}")
        return starts, sizes

    @staticmethod
    def _cut(array, shape: tuple, starts: list[int], sizes: list[int], convert, dtype, path: Path) -> np.ndarray:
        """(C, *sizes) window of `array` at `starts`, converted by `convert`; zeros where it leaves the volume."""
        lo = [max(0, s) for s in starts]
        hi = [min(n, s + z) for n, s, z in zip(shape[1:], starts, sizes)]
        out_shape = (shape[0], *sizes)
        if any(h <= l for l, h in zip(lo, hi)):
            return np.zeros(out_shape, dtype)
        part = np.empty((shape[0], *[h - l for l, h in zip(lo, hi)]), array.dtype)
        try:  # straight into `part`: NDArray.__getitem__'s key parsing costs ~40 us a call
            array.get_slice_numpy(part, ((0, *lo), (shape[0], *hi)))
        except RuntimeError as e:  # blosc2 could not decode a block
            raise DataError(f"{path}: corrupt data in [{lo}, {hi}) ({e})") from e
        part = convert(part)
        if part.shape == out_shape:
            return part
        out = np.zeros(out_shape, dtype)
        out[(slice(None),) + tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, starts))] = part
        return out

    def read_crop(self, key: str, starts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
        """float32 (C, *sizes) window [start, start + size) per spatial axis (all channels), zero-padded where
        it reaches past the volume (starts may be negative). Decodes only the blocks it intersects."""
        h = self._open(key)
        shape = tuple(h.info["shape"])
        starts, sizes = self._window(shape, starts, sizes, key)
        scale, offset = h.info["scale"], h.info["offset"]
        return self._cut(h.image, shape, starts, sizes, lambda a: _dequantise(a, scale, offset), np.float32,
                         self.image_path(key))

    def read_label_crop(self, key: str, starts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
        """int64 (1, *sizes) label window, the same addressing as `read_crop`; 0 where it leaves the volume."""
        h = self._open(key)
        if not h.info.get("label"):
            raise DataError(f"{self.sidecar_path(key)}: volume {key!r} has no label")
        if h.label is None:
            h.label = _open_b2nd(self.label_path(key))
        shape = (1, *h.info["shape"][1:])
        starts, sizes = self._window(shape, starts, sizes, key)
        return self._cut(h.label, shape, starts, sizes, lambda a: a.astype(np.int64), np.int64,
                         self.label_path(key))

    def read_volume(self, key: str) -> np.ndarray:
        """The whole image, float32 (C, X, Y[, Z])."""
        shape = self.shape(key)
        return self.read_crop(key, [0] * (len(shape) - 1), shape[1:])


# ------------------------------------------------------------------------------------------- index

def _index_entry(info: dict) -> dict:
    meta = info.get("meta") or {}
    return {
        "key": info["key"], "shape": info["shape"], "spacing": meta.get("spacing"),
        "source": meta.get("source", meta.get("path")), "dtype": info["dtype"],
        "stored_dtype": info["stored_dtype"], "image_bytes": info["image_bytes"],
        "label_bytes": info["label"]["bytes"] if info.get("label") else 0,
        "bytes_on_disk": info["bytes_on_disk"], "float32_bytes": info["float32_bytes"],
        "quant_max_abs_error": info["quant_max_abs_error"], "quant_max_rel_error": info["quant_max_rel_error"],
    }


def _totals(entries: list[dict]) -> dict:
    image = sum(e["image_bytes"] for e in entries)
    f32 = sum(e["float32_bytes"] for e in entries)
    worst = max(entries, key=lambda e: (e["quant_max_rel_error"], e["key"]), default=None)
    return {
        "volumes": len(entries), "labels": sum(1 for e in entries if e["label_bytes"]),
        "bytes_on_disk": sum(e["bytes_on_disk"] for e in entries), "image_bytes": image, "float32_bytes": f32,
        "ratio": image / f32 if f32 else 0.0,
        "worst_abs_error": max((e["quant_max_abs_error"] for e in entries), default=0.0),
        "worst_rel_error": worst["quant_max_rel_error"] if worst else 0.0,
        "worst_key": worst["key"] if worst else None,
    }


def summary(root: str | Path) -> dict:
    """Totals over the complete volumes of a store: volumes, labels, bytes_on_disk (images + labels),
    image_bytes, float32_bytes, ratio = image_bytes / float32_bytes, worst quantisation error (absolute; relative
    to a volume's value range, with its key)."""
    store = VolumeStore(root)
    return _totals([_index_entry(store.info(k)) for k in store.keys()])


def build_index(root: str | Path) -> Path:
    """Write `<root>/store.json` listing every complete volume, sorted by key, with its totals. Deterministic:
    built only from the sidecars (no timestamps, no absolute root), so parts prepared separately into one folder
    give the same bytes as one preparation of the whole. Returns its path."""
    store = VolumeStore(root)
    entries = [_index_entry(store.info(k)) for k in store.keys()]
    path = Path(root) / INDEX_NAME
    Path(root).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, {"format": INDEX_FORMAT, "volumes": entries, "summary": _totals(entries)},
                       f"{_TMP}{os.getpid()}-{os.urandom(4).hex()}")
    return path
