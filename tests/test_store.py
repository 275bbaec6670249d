"""The compressed volume store: exact float32 crops, bounded and truthfully recorded quantisation error, exact
labels, crash-safe writes, deterministic indexes across separately prepared halves, compression of a real CT
and crops that decode only the blosc2 blocks they intersect."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import sslkit.data.store as store_mod
from sslkit.data.store import (BLOCK_BYTES, CHUNK_BYTES, INDEX_NAME, VolumeStore, build_index, choose_partition,
                               summary, touched_blocks)
from sslkit.errors import DataError, UserError


# ------------------------------------------------------------------------------------------- helpers

def smooth_volume(shape: tuple, seed: int) -> np.ndarray:
    """A compressible float32 volume (C, *spatial): per-channel sums of sines plus a little noise."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0.0, 3.0, n) for n in shape[1:]], indexing="ij")
    base = sum(np.sin(g * (i + 1) + seed) for i, g in enumerate(axes))
    vol = np.stack([base * (c + 1) for c in range(shape[0])]) + 0.05 * rng.standard_normal(shape)
    return vol.astype(np.float32)


def padded_reference(arr: np.ndarray, starts, sizes) -> np.ndarray:
    """The window by numpy fancy indexing: indices clipped into the array, then zeroed where they were outside."""
    idx = [np.arange(s, s + z) for s, z in zip(starts, sizes)]
    clipped = [np.clip(i, 0, n - 1) for i, n in zip(idx, arr.shape[1:])]
    inside = np.ix_(*[((i >= 0) & (i < n)).astype(np.uint8) for i, n in zip(idx, arr.shape[1:])])
    mask = np.prod(np.broadcast_arrays(*inside), axis=0).astype(bool)
    return np.where(mask[None], arr[np.ix_(np.arange(arr.shape[0]), *clipped)], 0).astype(arr.dtype)


def random_windows(rng, spatial: tuple, n: int) -> list[tuple[list[int], list[int]]]:
    """Windows of random sizes inside, across and past the volume's borders (some starts negative)."""
    out = []
    for _ in range(n):
        sizes = [int(rng.integers(1, s + 6)) for s in spatial]
        starts = [int(rng.integers(-z // 2, s - z // 2 + 1)) for s, z in zip(spatial, sizes)]
        out.append((starts, sizes))
    return out


def ct_volume(demo_dir: Path, step: int) -> np.ndarray:
    """The demo head CT as a preprocessed volume: sslkit's default CT window [-175, 250] HU -> [0, 1] clipped,
    every `step`-th voxel, (1, X, Y, Z) float32."""
    import nibabel as nib

    hu = np.asarray(nib.load(str(demo_dir / "ct_head.nii.gz")).dataobj, dtype=np.float32)
    img = np.clip((hu + 175.0) / 425.0, 0.0, 1.0)[::step, ::step, ::step]
    return np.ascontiguousarray(img[None], dtype=np.float32)


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# ------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("shape", [(2, 37, 29), (1, 33, 20, 27), (2, 18, 25, 22)])
def test_float32_crops_equal_numpy_slicing(tmp_path, shape):
    img = smooth_volume(shape, seed=len(shape))
    store = VolumeStore(tmp_path)
    info = store.write("vol", img, {"source": "synthetic"}, dtype="float32", crop_size=8)
    assert info["quant_max_abs_error"] == 0.0 and store.shape("vol") == shape
    assert math.prod(info["chunks"]) < img.size  # several chunks, several blocks each: the slicing is exercised
    rng = np.random.default_rng(0)
    for starts, sizes in random_windows(rng, shape[1:], 40):
        crop = store.read_crop("vol", starts, sizes)
        assert crop.dtype == np.float32 and crop.shape == (shape[0], *sizes)
        np.testing.assert_array_equal(crop, padded_reference(img, starts, sizes))
    inside = (slice(None), *[slice(3, n - 2) for n in shape[1:]])
    np.testing.assert_array_equal(store.read_crop("vol", [3] * (len(shape) - 1), [n - 5 for n in shape[1:]]),
                                  img[inside])
    np.testing.assert_array_equal(store.read_volume("vol"), img)


@pytest.mark.parametrize("dtype", ["float16", "int16"])
def test_lossy_modes_stay_within_the_recorded_error(tmp_path, dtype):
    img = smooth_volume((2, 30, 26, 21), seed=5) * 40.0 - 7.0  # range ~[-250, 240]
    store = VolumeStore(tmp_path)
    info = store.write("vol", img, {}, dtype=dtype, crop_size=16)
    full = store.read_volume("vol")
    recomputed = float(np.abs(full - img).max())
    assert info["quant_max_abs_error"] == recomputed > 0
    lo, hi = float(img.min()), float(img.max())
    assert info["value_min"] == lo and info["value_max"] == hi
    assert info["quant_max_rel_error"] == pytest.approx(recomputed / (hi - lo), rel=1e-12)
    float32_ulp = float(np.spacing(np.float32(max(abs(lo), abs(hi)))))
    if dtype == "int16":  # half a quantisation step, plus float32 rounding of q·scale + offset
        assert info["scale"] == pytest.approx((hi - lo) / 65534, rel=1e-6)
        assert recomputed <= info["scale"] / 2 + 2 * float32_ulp
    else:  # round to nearest float16: half an ulp, 2^-11 of the magnitude
        assert recomputed <= max(abs(lo), abs(hi)) * 2.0 ** -11
    rng = np.random.default_rng(1)
    for starts, sizes in random_windows(rng, img.shape[1:], 30):
        crop = store.read_crop("vol", starts, sizes)
        assert np.abs(crop - padded_reference(img, starts, sizes)).max() <= info["quant_max_abs_error"]
        np.testing.assert_array_equal(crop, padded_reference(full, starts, sizes))  # crops agree with full reads


@pytest.mark.parametrize("values,stored", [((0, 3), "uint8"), ((0, 300), "uint16"), ((-1, 4), "int16")])
def test_labels_round_trip_exactly(tmp_path, values, stored):
    rng = np.random.default_rng(2)
    img = smooth_volume((1, 21, 17, 19), seed=2)
    lab = rng.integers(values[0], values[1] + 1, size=(1, 21, 17, 19)).astype(np.int32)
    store = VolumeStore(tmp_path)
    info = store.write("vol", img, {}, dtype="int16", label=lab.astype(np.float64), crop_size=8)  # float, integral
    assert info["label"]["stored_dtype"] == stored
    assert info["label"]["values"] == np.unique(lab).tolist()
    for starts, sizes in random_windows(rng, lab.shape[1:], 30):
        got = store.read_label_crop("vol", starts, sizes)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, padded_reference(lab, starts, sizes))
    with pytest.raises(DataError, match="non-integer"):
        store.write("bad", img, {}, label=lab + 0.5)
    with pytest.raises(DataError, match="expected"):
        store.write("bad", img, {}, label=lab[:, :-1])
    store.write("nolabel", img, {})
    with pytest.raises(DataError, match="has no label"):
        store.read_label_crop("nolabel", (0, 0, 0), (4, 4, 4))


def test_bad_input_is_refused_before_anything_is_touched(tmp_path):
    store = VolumeStore(tmp_path)
    img = smooth_volume((1, 8, 8, 8), seed=0)
    store.write("a", img, {}, dtype="float32")
    before = folder_bytes(tmp_path)
    with pytest.raises(UserError, match="volume key"):
        store.write("../escape", img, {})
    with pytest.raises(UserError, match="volume key"):
        store.write("store", img, {})  # would collide with store.json
    with pytest.raises(UserError, match="store dtype"):
        store.write("a", img, {}, dtype="bfloat16")
    with pytest.raises(DataError, match="NaN"):
        store.write("a", np.where(img > 0, np.nan, img), {})
    with pytest.raises(DataError, match="beyond float16"):
        store.write("a", img * 1e6, {}, dtype="float16")
    with pytest.raises(UserError, match="not JSON"):
        store.write("a", img, {"when": object()})
    with pytest.raises(UserError, match="crop_size"):
        store.write("a", img, {}, crop_size=(64, 64))
    assert folder_bytes(tmp_path) == before and store.has("a")  # the stored volume survived every refusal
    with pytest.raises(DataError, match="not in the store"):
        store.read_crop("missing", (0, 0, 0), (2, 2, 2))
    with pytest.raises(UserError, match="needs 3 starts"):
        store.read_crop("a", (0, 0), (2, 2))


# ------------------------------------------------------------------------------------------- crash safety

def test_incomplete_volumes_are_absent_and_rewritten_cleanly(tmp_path, monkeypatch):
    img = smooth_volume((1, 20, 18, 16), seed=3)
    lab = (img > 0).astype(np.int32)
    store = VolumeStore(tmp_path)
    store.write("a", img, {"source": "a.nii"}, dtype="int16", label=lab)
    assert store.has("a") and store.keys() == ["a"]

    store.sidecar_path("a").unlink()  # killed before the sidecar: image and label are there, the volume is not
    assert not store.has("a") and store.keys() == []
    with pytest.raises(DataError, match="not in the store"):
        store.read_crop("a", (0, 0, 0), (4, 4, 4))
    store.write("a", img, {"source": "a.nii"}, dtype="int16", label=lab)
    assert store.has("a")

    stale = tmp_path / "a.b2nd.tmp-99999-deadbeef"  # a writer killed while writing a temp file
    stale.write_bytes(b"half an array")
    assert not store.has("a") and store.keys() == []
    store.write("a", img, {"source": "a.nii"}, dtype="int16", label=lab)
    assert store.has("a") and not stale.exists()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("writer killed before its sidecar")

    new = img[:, ::-1].copy()  # a rewrite with new content dies after renaming its arrays
    monkeypatch.setattr(store_mod, "_write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write("a", new, {"source": "a.nii"}, dtype="float32")
    monkeypatch.undo()
    assert not store.has("a") and not VolumeStore(tmp_path).has("a") and VolumeStore(tmp_path).keys() == []
    store.write("a", new, {"source": "a.nii"}, dtype="float32")
    np.testing.assert_array_equal(VolumeStore(tmp_path).read_volume("a"), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.b2nd", "a.json"]  # no temp, old label removed

    with open(store.image_path("a"), "r+b") as f:  # a truncated array does not pass for complete either
        f.truncate(store.image_path("a").stat().st_size - 10)
    assert not store.has("a")


# ------------------------------------------------------------------------------------------- determinism

CORPUS = [  # (key, shape, dtype, with label)
    ("case-00", (1, 22, 19, 17), "int16", True),
    ("case-01", (2, 16, 21, 18), "float16", False),
    ("case-02", (1, 25, 23), "float32", True),
    ("case-03", (1, 17, 20, 24), "int16", False),
    ("case-04", (1, 19, 16, 21), "float16", True),
]


def write_corpus(root: str, items: list, nthreads: int) -> None:
    """One preparation job: its own VolumeStore (and blosc2 thread setting) writing `items` of CORPUS."""
    import blosc2

    blosc2.set_nthreads(nthreads)
    store = VolumeStore(root)
    for key, shape, dtype, with_label in items:
        img = smooth_volume(shape, seed=int(key[-2:]))
        lab = (img[:1] > 0.5).astype(np.int16) if with_label else None
        meta = {"source": f"/data/{key}.nii.gz", "spacing": [1.5, 1.5, 2.0][: len(shape) - 1],
                "affine": np.eye(4)}
        store.write(key, img, meta, dtype=dtype, label=lab, crop_size=8)


def test_two_halves_give_the_same_store_as_one_preparation(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    write_corpus(str(whole), CORPUS, nthreads=1)
    child = mp.get_context("fork").Process(target=write_corpus, args=(str(halves), CORPUS[:2], 2))
    child.start()
    write_corpus(str(halves), CORPUS[2:], nthreads=1)  # meanwhile, in this process with another store object
    child.join(60)
    assert child.exitcode == 0
    a, b = build_index(whole), build_index(halves)
    assert a.name == b.name == INDEX_NAME and a.read_bytes() == b.read_bytes()
    assert folder_bytes(whole) == folder_bytes(halves)  # every array and sidecar byte-identical
    index = json.loads(a.read_text())
    assert [v["key"] for v in index["volumes"]] == [c[0] for c in CORPUS]
    assert index["volumes"][2]["spacing"] == [1.5, 1.5] and index["volumes"][0]["source"] == "/data/case-00.nii.gz"
    sw, sh = VolumeStore(whole), VolumeStore(halves)
    rng = np.random.default_rng(4)
    for key, shape, _, with_label in CORPUS:
        for starts, sizes in random_windows(rng, shape[1:], 5):
            np.testing.assert_array_equal(sw.read_crop(key, starts, sizes), sh.read_crop(key, starts, sizes))
            if with_label:
                np.testing.assert_array_equal(sw.read_label_crop(key, starts, sizes),
                                              sh.read_label_crop(key, starts, sizes))
    totals = summary(whole)
    infos = [sw.info(k) for k in sw.keys()]
    assert totals == index["summary"] and totals["volumes"] == 5 and totals["labels"] == 3
    assert totals["bytes_on_disk"] == sum(p.stat().st_size for p in whole.glob("*.b2nd"))
    assert totals["float32_bytes"] == sum(4 * math.prod(c[1]) for c in CORPUS)
    assert totals["worst_abs_error"] == max(i["quant_max_abs_error"] for i in infos)
    assert totals["worst_rel_error"] == max(i["quant_max_rel_error"] for i in infos)


def _child_reads(store: VolumeStore, conn) -> None:
    crop = store.read_crop("v", (2, 3, 4), (5, 6, 7))
    conn.send((crop, store._pid == os.getpid(), sorted(store._handles)))
    conn.close()


def test_forked_workers_open_their_own_handles(tmp_path):
    img = smooth_volume((1, 12, 13, 14), seed=9)
    store = VolumeStore(tmp_path)
    store.write("v", img, {}, dtype="int16")
    store.read_crop("v", (0, 0, 0), (3, 3, 3))
    parent_handle = store._handles["v"]
    receive, send = mp.get_context("fork").Pipe(duplex=False)
    child = mp.get_context("fork").Process(target=_child_reads, args=(store, send))
    child.start()
    crop, own_cache, keys = receive.recv()
    child.join(30)
    assert child.exitcode == 0 and own_cache and keys == ["v"]
    np.testing.assert_array_equal(crop, store.read_crop("v", (2, 3, 4), (5, 6, 7)))
    assert store._handles["v"] is parent_handle  # the parent keeps its own
    copied = pickle.loads(pickle.dumps(store))  # spawned workers get a store without handles
    assert copied._handles == {} and copied.root == store.root
    np.testing.assert_array_equal(copied.read_crop("v", (2, 3, 4), (5, 6, 7)), crop)


# ------------------------------------------------------------------------------------------- a real scan

def test_real_ct_compresses_below_a_third_of_float32(tmp_path, demo_dir):
    img = ct_volume(demo_dir, step=2)  # (1, 128, 128, 54)
    np.save(tmp_path / "ct.npy", img)
    npy_bytes = (tmp_path / "ct.npy").stat().st_size
    store = VolumeStore(tmp_path / "store")
    ratios = {}
    for dtype in ("float32", "float16", "int16"):
        info = store.write(f"ct-{dtype}", img, {"source": "ct_head.nii.gz", "spacing": [1.9, 1.9, 3.0]},
                           dtype=dtype)
        ratios[dtype] = info["image_bytes"] / npy_bytes
        full = store.read_volume(f"ct-{dtype}")
        assert info["quant_max_abs_error"] == float(np.abs(full - img).max())
        rng = np.random.default_rng(7)
        for starts, sizes in random_windows(rng, img.shape[1:], 8):
            err = np.abs(store.read_crop(f"ct-{dtype}", starts, sizes) - padded_reference(img, starts, sizes)).max()
            assert err <= info["quant_max_abs_error"]
    print("real CT (1, 128, 128, 54) size / float32 .npy: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    assert ratios["float16"] < 0.35 and ratios["int16"] < 0.35 and ratios["float32"] < 1.0
    assert store.info("ct-int16")["quant_max_rel_error"] <= 1 / 65534  # well under a grey level of 8-bit data
    assert summary(store.root)["volumes"] == 3


# ------------------------------------------------------------------------------------------- geometry

def test_partition_rule(tmp_path):
    # the documented rule, worked by hand: 64^3 crops -> 16^3 blocks, crop-sized chunks, all within the budgets
    assert choose_partition((1, 256, 256, 108), 4) == ((1, 64, 64, 64), (1, 16, 16, 16))
    assert choose_partition((1, 256, 256, 108), 1, 96) == ((1, 96, 96, 96), (1, 16, 16, 16))
    assert choose_partition((1, 256, 256, 108), 2, 96) == ((1, 48, 96, 96), (1, 16, 16, 16))  # > 1 MiB: halved
    assert choose_partition((8, 256, 256, 108), 4) == ((8, 16, 32, 64), (8, 8, 8, 16))  # 8 channels: halved
    assert choose_partition((1, 512, 512), 4, (64, 128)) == ((1, 64, 128), (1, 16, 32))
    assert choose_partition((1, 10, 300, 5), 4) == ((1, 10, 64, 5), (1, 10, 16, 5))   # clipped to the extent
    rng = np.random.default_rng(3)
    for _ in range(200):
        shape = (int(rng.integers(1, 5)), *[int(rng.integers(1, 300)) for _ in range(int(rng.integers(2, 4)))])
        itemsize = int(rng.choice([1, 2, 4]))
        chunks, blocks = choose_partition(shape, itemsize, int(rng.integers(1, 200)))
        assert all(1 <= b <= c <= max(n, b) for b, c, n in zip(blocks, chunks, shape))
        assert chunks[0] == blocks[0] == shape[0]
        assert math.prod(blocks) * itemsize <= max(BLOCK_BYTES, shape[0] * itemsize)
        assert math.prod(chunks) * itemsize <= max(CHUNK_BYTES, math.prod(blocks) * itemsize)
    # a random 64^3 crop of the real CT's grid decodes < 2x its voxels (whole chunks would be ~8x)
    shape, (chunks, blocks) = (1, 256, 256, 108), choose_partition((1, 256, 256, 108), 4)
    decoded, whole_chunks = [], []
    for _ in range(300):
        starts = [int(rng.integers(0, n - 64 + 1)) for n in shape[1:]]
        cells = touched_blocks(shape, chunks, blocks, starts, (64, 64, 64))
        decoded.append(len(cells) * math.prod(blocks) / 64 ** 3)
        whole_chunks.append(len({c for c, _ in cells}) * math.prod(chunks) / 64 ** 3)
    print(f"64^3 crops of a 256x256x108 grid decode {np.mean(decoded):.2f}x their voxels "
          f"(whole chunks: {np.mean(whole_chunks):.2f}x)")
    assert np.mean(decoded) < 2.0 and np.mean(decoded) < np.mean(whole_chunks) / 3


def brute_force_blocks(shape, chunks, blocks, starts, sizes) -> set[tuple[int, int]]:
    """(nchunk, nblock) of every voxel of the window, computed voxel by voxel."""
    lo = [0] + [max(0, s) for s in starts]
    hi = [shape[0]] + [min(n, s + z) for n, s, z in zip(shape[1:], starts, sizes)]
    if any(h <= l for l, h in zip(lo, hi)):
        return set()
    idx = np.stack(np.meshgrid(*[np.arange(l, h) for l, h in zip(lo, hi)], indexing="ij")).reshape(len(shape), -1)
    chunk_grid = [math.ceil(n / c) for n, c in zip(shape, chunks)]
    block_grid = [math.ceil(c / b) for c, b in zip(chunks, blocks)]
    c = np.asarray(chunks)[:, None]
    nchunk = np.ravel_multi_index(tuple(idx // c), chunk_grid)
    nblock = np.ravel_multi_index(tuple((idx % c) // np.asarray(blocks)[:, None]), block_grid)
    return set(zip(nchunk.tolist(), nblock.tolist()))


def test_touched_blocks_match_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(150):
        nd = int(rng.integers(2, 4))
        shape = (int(rng.integers(1, 3)), *[int(rng.integers(1, 30)) for _ in range(nd)])
        chunks = (shape[0], *[int(rng.integers(1, n + 3)) for n in shape[1:]])
        blocks = (shape[0], *[int(rng.integers(1, c + 1)) for c in chunks[1:]])
        for starts, sizes in random_windows(rng, shape[1:], 4):
            got = touched_blocks(shape, chunks, blocks, starts, sizes)
            assert got == sorted(brute_force_blocks(shape, chunks, blocks, starts, sizes))


def corrupt_blocks(path: Path, bad: dict[int, set[int]]) -> None:
    """Make the listed blocks undecodable: set the first stream size of each to 2^31 - 1 (blosc2 chunk layout:
    32-byte header with nbytes and blocksize, then one int32 start offset per block)."""
    import blosc2

    arr = blosc2.open(str(path), mode="a")
    for nchunk, blocks in bad.items():
        chunk = bytearray(arr.schunk.get_chunk(nchunk))
        nbytes, blocksize = struct.unpack_from("<ii", chunk, 4)
        nblocks = -(-nbytes // blocksize)
        starts = struct.unpack_from(f"<{nblocks}i", chunk, 32)
        assert starts[0] == 32 + 4 * nblocks, "not a chunk of compressed blocks (layout assumption broken)"
        for j in blocks:
            struct.pack_into("<i", chunk, starts[j], 2 ** 31 - 1)
        arr.schunk.update_chunk(nchunk, bytes(chunk))


def test_crop_decodes_only_the_blocks_it_intersects(tmp_path):
    """Every block a crop does not intersect is made undecodable: the crop still reads exactly (so none of them
    was decoded) while a full read fails; breaking any one intersected block makes the crop fail."""
    img = smooth_volume((1, 40, 36, 44), seed=1)
    src = VolumeStore(tmp_path / "src")
    info = src.write("v", img, {}, dtype="float32", crop_size=32)
    shape, chunks, blocks = tuple(info["shape"]), info["chunks"], info["blocks"]
    assert blocks == [1, 8, 8, 8] and chunks == [1, 32, 32, 32]
    n_chunks = math.prod(math.ceil(n / c) for n, c in zip(shape, chunks))
    n_blocks = math.prod(math.ceil(c / b) for c, b in zip(chunks, blocks))
    rng = np.random.default_rng(5)

    def broken_copy(name: str, bad: dict[int, set[int]]) -> VolumeStore:
        root = tmp_path / name
        shutil.copytree(src.root, root)
        corrupt_blocks(root / "v.b2nd", bad)
        sidecar = json.loads((root / "v.json").read_text())  # the file changed size: keep it "complete"
        sidecar["image_bytes"] = sidecar["bytes_on_disk"] = (root / "v.b2nd").stat().st_size
        (root / "v.json").write_text(json.dumps(sidecar))
        return VolumeStore(root)

    for w, (starts, sizes) in enumerate([((3, 30, 9), (20, 6, 17)), ((-4, 10, 30), (12, 12, 20)),
                                         ((17, 5, 2), (1, 1, 1))]):
        touched = touched_blocks(shape, chunks, blocks, starts, sizes)
        untouched = {c: {b for b in range(n_blocks) if (c, b) not in touched} for c in range(n_chunks)}
        store = broken_copy(f"rest{w}", untouched)
        np.testing.assert_array_equal(store.read_crop("v", starts, sizes), padded_reference(img, starts, sizes))
        with pytest.raises(DataError, match="corrupt"):
            store.read_volume("v")
        c, b = touched[int(rng.integers(len(touched)))]
        with pytest.raises(DataError, match="corrupt"):
            broken_copy(f"one{w}", {c: {b}}).read_crop("v", starts, sizes)
