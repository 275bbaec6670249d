"""The pretraining data pipeline at corpus scale (issue 14) and VoCo crops (issue 15): the store gives exactly the
crops of the old float32 `.npy` cache (and stays within its recorded error in the compact modes), parts prepared
separately form the store one preparation of the whole forms, a SIGKILLed `data prepare` resumes without redoing
finished scans, ranks prepare their parts in parallel and wait by polling, a resumed run over a store equals an
uninterrupted one, and VoCo items are deterministic with targets that match their windows."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, CliChild, ckpt_tensors, cli, job_env, max_abs_diff, nan_scan, tiny_raw
from sslkit.config import DataConfig, ViewConfig, config_from_dict
from sslkit.data.datalist import load_datalist
from sslkit.data.multicrop import overlap_targets, voco_region
from sslkit.data.prepare import (SKIPPED_NAME, part_indices, prepare_store, prepare_with_ranks,
                                 wait_for_parts)
from sslkit.data.pretrain import PretrainDataset
from sslkit.data.store import VolumeStore
from sslkit.data.views import make_view
from sslkit.errors import DataError, UserError


def _data(**kw) -> DataConfig:
    base = dict(modality="ct", roi=[32, 32, 32], spacing=[3.0, 3.0, 3.0], crops_per_volume=2,
                views=ViewConfig(shift=0.25))
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def labelled(demo_dir) -> list[dict]:
    """The demo head CT and MNI152 T1, each with its label map."""
    items = load_datalist(demo_dir / "datalist.json", "labelled")
    return [it for it in items if "colin27" not in it["image"]]


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# ------------------------------------------------------------------------------------------ the old .npy cache


class NpyCacheReference:
    """The pipeline before the store, as it was: the preprocessed float32 volume saved with np.save, memory-mapped,
    each window sliced out and zero-padded; the same generator streams (crop 0, views 1 and 2, shift 4) and the
    same window rules."""

    def __init__(self, image: np.ndarray, label: np.ndarray, folder: Path, cfg: DataConfig, seed: int, dims: int):
        np.save(folder / "image.npy", image)
        np.save(folder / "label.npy", label)
        self.image = np.load(folder / "image.npy", mmap_mode="r")
        self.label = np.load(folder / "label.npy", mmap_mode="r")
        self.cfg, self.seed, self.dims, self.roi = cfg, seed, dims, tuple(cfg.roi)

    def window(self, rng, center=False):
        shape, z = self.image.shape, None
        sizes = shape[1:]
        if self.dims == 2:
            nz = shape[3]
            z = int(rng.integers(nz // 4, max(nz // 4, 3 * nz // 4) + 1)) if center else int(rng.integers(0, nz))
            z, sizes = min(z, nz - 1), shape[1:3]
        starts = []
        for s, r in zip(sizes, self.roi):
            hi = max(0, s - r)
            if center:
                jitter = max(0, min(hi // 2, r // 8))
                starts.append(hi // 2 + int(rng.integers(-jitter, jitter + 1)))
            else:
                starts.append(int(rng.integers(0, hi + 1)))
        return z, starts

    def shifted(self, window, rng):
        z, starts = window
        sizes = self.image.shape[1:3] if z is not None else self.image.shape[1:]
        return z, [int(np.clip(a + rng.integers(-round(self.cfg.views.shift * r), round(self.cfg.views.shift * r) + 1),
                               0, max(0, s - r))) for a, s, r in zip(starts, sizes, self.roi)]

    def cut(self, arr, window, dtype=np.float32):
        z, starts = window
        if z is not None:
            arr = arr[..., z]
        patch = np.array(arr[(slice(None),) + tuple(slice(a, a + r) for a, r in zip(starts, self.roi))], dtype=dtype)
        out = np.zeros((patch.shape[0],) + self.roi, dtype=dtype)
        out[(slice(None),) + tuple(slice(0, s) for s in patch.shape[1:])] = patch
        return out

    def item(self, index, epoch):
        rng = lambda stream: np.random.default_rng([self.seed, epoch, index, stream])  # noqa: E731
        w = self.window(rng(0))
        crop, crop2 = self.cut(self.image, w), self.cut(self.image, self.shifted(w, rng(4)))
        return {"image": crop, "view1": make_view(crop, self.cfg.views, (self.seed, epoch, index, 1)),
                "view2": make_view(crop2, self.cfg.views, (self.seed, epoch, index, 2)),
                "label": self.cut(self.label, w, np.int64)}


def preprocessed(entry: dict, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from sslkit.data.preprocess import entry_modality, preprocess_transforms

    out = preprocess_transforms(cfg, entry_modality(entry, cfg.modality), "label")(
        {"image": entry["image"], "label": entry["label"]})
    return (np.ascontiguousarray(out["image"].numpy(), dtype=np.float32),
            np.ascontiguousarray(out["label"].numpy(), dtype=np.int32))


@pytest.mark.parametrize("dims", [3, 2])
def test_float32_store_gives_exactly_the_npy_cache_items(labelled, tmp_path, dims):
    roi = [32, 32, 32] if dims == 3 else [40, 40]
    cfg = _data(roi=roi, with_labels=True, store_dtype="float32")
    ds = PretrainDataset(labelled, cfg, tmp_path / "store", seed=7, spatial_dims=dims).prepare(progress=False)
    assert ds.n_preprocessed == 2 and not list((tmp_path / "store").glob("*.npy"))
    refs = []
    for v, entry in enumerate(labelled):
        (tmp_path / f"npy{v}").mkdir()
        refs.append(NpyCacheReference(*preprocessed(entry, cfg), tmp_path / f"npy{v}", cfg, seed=7, dims=dims))
        assert tuple(ds.volumes[v]["shape"]) == refs[v].image.shape
        for index, epoch in [(2 * v, 0), (2 * v + 1, 0), (2 * v, 3), (2 * v + 1, 11)]:
            got, want = ds[(index, epoch)], refs[v].item(index, epoch)
            for k in ("image", "view1", "view2", "label"):
                assert got[k].shape == (1, *roi)
                np.testing.assert_array_equal(got[k].numpy(), want[k], err_msg=f"{k} of item {index}")
    probe = ds.probe_crops(4)
    for i in range(4):
        ref = refs[i % 2]
        want = ref.cut(ref.image, ref.window(np.random.default_rng([7, 3, i]), center=True))
        np.testing.assert_array_equal(probe[i].numpy(), want)


@pytest.mark.parametrize("dtype", ["float16", "int16"])
def test_compact_stores_stay_within_their_recorded_error(labelled, tmp_path, dtype):
    exact = PretrainDataset(labelled, _data(with_labels=True, store_dtype="float32"), tmp_path / "s", seed=1)
    compact = PretrainDataset(labelled, _data(with_labels=True, store_dtype=dtype), tmp_path / "s", seed=1)
    exact.prepare(progress=False), compact.prepare(progress=False)
    assert compact.n_preprocessed == 2  # the dtype is part of the key: one folder holds both
    worst = 0.0
    for v in range(2):
        info = compact.store.info(compact.volumes[v]["key"])
        assert info["stored_dtype"] == dtype
        bound = info["quant_max_abs_error"]
        assert 0 < bound <= (2.0**-11 if dtype == "float16" else 1.0 / 65534)  # values in [0, 1]
        for index, epoch in [(2 * v, 0), (2 * v + 1, 5)]:
            a, b = exact[(index, epoch)], compact[(index, epoch)]
            err = float((a["image"] - b["image"]).abs().max())
            assert err <= bound
            worst = max(worst, err)
            assert torch.equal(a["label"], b["label"])  # labels are stored exactly in every mode
    assert worst > 0  # the compact store is really lossy, and the bound is the one it recorded


# ------------------------------------------------------------------------------------------ prepare_store


def _recipe(datalist: Path, **data) -> dict:
    return {"data": {"datalist": str(datalist), "roi": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], **data},
            "model": {"name": "swin_unetr", "args": {"feature_size": 12}}}


def _datalist(folder: Path, entries: list[dict]) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(demo_dir, tmp_path_factory) -> Path:
    """The demo's three training scans, a missing file and a NaN scan (two bad entries)."""
    folder = tmp_path_factory.mktemp("corpus")
    entries = load_datalist(demo_dir / "datalist.json")
    entries = entries[:2] + [{"image": str(folder / "missing.nii.gz")}, entries[2], {"image": str(nan_scan(folder))}]
    return _datalist(folder, entries)


def test_part_rule_is_disjoint_and_complete():
    for n, parts in [(0, 3), (1, 1), (7, 3), (10, 4), (5, 8)]:
        got = [part_indices(n, p, parts) for p in range(parts)]
        assert sorted(i for g in got for i in g) == list(range(n))
        assert all(i % parts == p for p, g in enumerate(got) for i in g)
    with pytest.raises(UserError, match="part"):
        part_indices(5, 3, 3)


def test_parts_form_the_same_store_as_one_preparation(corpus, tmp_path):
    cfg = config_from_dict(_recipe(corpus))
    whole = prepare_store(cfg, tmp_path / "whole", workers=2, progress=False)
    assert (whole.entries, whole.prepared, whole.already, whole.skipped) == (5, 3, 0, 2)
    first = prepare_store(cfg, tmp_path / "parts", part=1, parts=2, progress=False)   # entries 1, 3
    second = prepare_store(cfg, tmp_path / "parts", part=0, parts=2, progress=False)  # entries 0, 2, 4
    assert (first.entries, first.prepared, second.entries, second.prepared) == (2, 2, 3, 1)
    assert folder_bytes(tmp_path / "whole") == folder_bytes(tmp_path / "parts")  # store.json, arrays, skip list
    index = json.loads((tmp_path / "whole" / "store.json").read_text())
    assert index["summary"]["volumes"] == 3 and index["summary"]["ratio"] < 0.35
    good = [e for i, e in enumerate(load_datalist(corpus)) if i in (0, 1, 3)]
    assert sorted(v["source"] for v in index["volumes"]) == sorted(str(Path(e["image"]).resolve()) for e in good)
    assert all(v["spacing"] == [4.0, 4.0, 4.0] and v["stored_dtype"] == "float16" for v in index["volumes"])

    again = prepare_store(cfg, tmp_path / "whole", workers=2, progress=False)  # resumable: nothing to do
    assert (again.prepared, again.already, again.skipped) == (0, 3, 2)

    # pretraining over the prepared store preprocesses nothing and logs the same rows pretraining writes
    ds = PretrainDataset(load_datalist(corpus), cfg.data, tmp_path / "whole", seed=0,
                         skipped_log=tmp_path / "run_skipped.jsonl").prepare(progress=False)
    assert ds.n_preprocessed == 0 and len(ds.volumes) == 3
    store_rows = (tmp_path / "whole" / SKIPPED_NAME).read_text().splitlines()
    run_rows = (tmp_path / "run_skipped.jsonl").read_text().splitlines()
    assert sorted(store_rows) == sorted(run_rows) and len(run_rows) == 2
    assert any("NaN" in json.loads(r)["error"] for r in run_rows)
    assert any("no such file" in json.loads(r)["error"] for r in run_rows)


def test_a_fixed_scan_leaves_the_skip_list(demo_dir, tmp_path):
    fixable = tmp_path / "later.nii.gz"
    cfg = config_from_dict(_recipe(_datalist(tmp_path, [{"image": str(fixable)}, {"image": str(
        demo_dir / "mri_colin27_t1.nii.gz"), "modality": "mri"}])))
    assert prepare_store(cfg, tmp_path / "s", progress=False).skipped == 1
    assert len((tmp_path / "s" / SKIPPED_NAME).read_text().splitlines()) == 1
    shutil.copy(demo_dir / "mri_mni152_t1.nii.gz", fixable)
    report = prepare_store(cfg, tmp_path / "s", progress=False)
    assert (report.prepared, report.already, report.skipped) == (1, 1, 0)
    assert (tmp_path / "s" / SKIPPED_NAME).read_text() == ""


def test_a_bad_store_dtype_is_one_config_error_before_any_scan_is_read(corpus, tmp_path):
    from sslkit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.store_dtype: 'bfloat16'"):
        PretrainDataset(load_datalist(corpus), _data(store_dtype="bfloat16"), tmp_path / "s", seed=0)
    with pytest.raises(ConfigError, match="data.store_dtype"):
        prepare_store(config_from_dict(_recipe(corpus, store_dtype="int8")), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_parser_documents_every_option_and_refuses_bad_parts(tmp_path):
    from sslkit.cli import build_parser

    p = build_parser()
    data = p._subparsers._group_actions[0].choices["data"]
    sub = data._subparsers._group_actions[0].choices["prepare"]
    actions = [a for a in sub._actions if a.dest != "help"]
    assert {a.dest for a in actions} == {"cfg", "overrides", "out", "workers", "part", "parts", "no_progress"}
    assert all(a.help for a in actions)
    a = p.parse_args(["data", "prepare", "--cfg", "r.yaml", "--out", "s", "--part", "2", "--parts", "2"])
    with pytest.raises(UserError, match="part 2 of 2"):
        a.func(a)


@pytest.mark.slow
def test_killed_prepare_resumes_without_redoing_finished_scans(demo_dir, tmp_path):
    scans = []
    for i in range(6):  # copies have their own paths, so their own keys
        scans.append(tmp_path / f"scan{i}.nii.gz")
        shutil.copy(demo_dir / ("ct_head.nii.gz" if i % 2 == 0 else "mri_mni152_t1.nii.gz"), scans[-1])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(_datalist(tmp_path, [{"image": str(s)} for s in scans]))))
    out = tmp_path / "store"
    args = ("data", "prepare", "--cfg", str(recipe), "--out", str(out), "--no-progress")
    proc = CliChild(*args)
    deadline = time.time() + 300
    while not list(out.glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the preparation ended before it could be killed"
    store = VolumeStore(out)
    done = {k: (store.image_path(k).stat().st_mtime_ns, store.sidecar_path(k).stat().st_mtime_ns)
            for k in store.keys()}
    assert 1 <= len(done) < 6 and not (out / "store.json").exists()

    res = cli(*args)  # the same command, continued in this process
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"prepared {6 - len(done)} scans, {len(done)} already in the store" in res.stdout
    assert len(store.keys()) == 6 and not [p for p in out.iterdir() if ".tmp-" in p.name]
    for k, stamps in done.items():  # finished volumes were not written again
        assert (store.image_path(k).stat().st_mtime_ns, store.sidecar_path(k).stat().st_mtime_ns) == stamps
    assert json.loads((out / "store.json").read_text())["summary"]["volumes"] == 6


# ------------------------------------------------------------------------------------------ ranks


def _rank_job(rank: int, world: int, datalist: str, store: str, markers: str, barrier, results) -> None:
    torch.set_num_threads(1)
    ds = PretrainDataset(load_datalist(datalist), _data(spacing=[4.0, 4.0, 4.0]), Path(store), seed=0,
                         skipped_log=Path(store).parent / "skipped.jsonl")
    prepare_with_ranks(ds, rank, world, Path(markers), barrier.wait, progress=False, poll_s=0.05)
    results.put((rank, ds.n_preprocessed, [v["key"] for v in ds.volumes]))


def test_ranks_prepare_their_own_parts_then_open_the_whole_store(corpus, tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2, timeout=120), ctx.Queue()
    jobs = [ctx.Process(target=_rank_job, args=(r, 2, str(corpus), str(tmp_path / "store"),
                                                str(tmp_path / "run" / "markers"), barrier, results))
            for r in range(2)]
    for j in jobs:
        j.start()
    got = dict((r, (n, keys)) for r, n, keys in (results.get(timeout=300) for _ in jobs))
    for j in jobs:
        j.join(60)
        assert j.exitcode == 0
    # rank 0 had entries 0, 2 (missing), 4 (NaN): one scan; rank 1 had entries 1 and 3: two scans
    assert got[0][0] == 1 and got[1][0] == 2
    assert got[0][1] == got[1][1] and len(got[0][1]) == 3
    rows = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    items = load_datalist(corpus)
    assert [r["path"] for r in rows] == [items[2]["image"], items[4]["image"]]  # once, in datalist order
    assert not (tmp_path / "run" / "markers").exists()


def test_waiting_for_parts_names_the_missing_ranks(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "0.json").write_text(json.dumps({"failures": {}}))
    t = time.monotonic()
    with pytest.raises(DataError, match=r"ranks \[1, 2\] did not finish .* SSLKIT_PREPARE_TIMEOUT"):
        wait_for_parts(tmp_path / "m", 3, timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - t < 5
    (tmp_path / "m" / "2.json").write_text(json.dumps({"error": "OSError: disk full"}))
    with pytest.raises(DataError, match="rank 2 failed .* disk full"):
        wait_for_parts(tmp_path / "m", 3, timeout_s=60, poll_s=0.05)


# Two ranks preparing a fresh store under torchrun (bad entries recorded once, markers cleaned up, then the same
# weights as one process): tests/test_multinode.py, in its two-node ZeRO-3 run.


# ------------------------------------------------------------------------------------------ resume over a store


@pytest.mark.slow
def test_resumed_run_over_a_prepared_store_equals_an_uninterrupted_one(demo_dir, tmp_path):
    from sslkit.engine.trainer import pretrain

    # bf16 under ZeRO-1 as test_byol's resume test: there resuming is bit-exact (fp32 under ZeRO-0 differed by
    # ~2e-9 after the resumed step, with identical batches: an engine matter, not the data's)
    raw = tiny_raw(demo_dir, tmp_path / "store", data={"views": {"strength": "strong", "shift": 0.25}},
                   train={"max_steps": 3, "num_workers": 1, "precision": "bf16", "zero_stage": 1})
    cfg = config_from_dict(raw)
    report = prepare_store(cfg, tmp_path / "store", progress=False)
    assert report.prepared == 3
    full = pretrain(config_from_dict(raw), tmp_path / "full", progress=False)
    assert full.steps == 3
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step_00000002", part / "checkpoints" / "step_00000002")
    resumed = pretrain(config_from_dict(raw), part, resume="auto", progress=False)
    assert resumed.steps == 3
    s_full, t_full = ckpt_tensors(full.run_dir, 3)
    s_res, t_res = ckpt_tensors(part, 3)
    assert max_abs_diff(s_full, s_res) == 0.0 and max_abs_diff(t_full, t_res) == 0.0
    assert len(VolumeStore(tmp_path / "store").keys()) == 3  # the runs only read the prepared store


# ------------------------------------------------------------------------------------------ VoCo items


def padded_window(volume: np.ndarray, start, size) -> np.ndarray:
    """volume[:, start:start+size] per axis, zeros outside (brute force over voxel indices)."""
    idx = [np.arange(s, s + z) for s, z in zip(start, size)]
    clipped = [np.clip(i, 0, n - 1) for i, n in zip(idx, volume.shape[1:])]
    inside = np.ix_(*[((i >= 0) & (i < n)).astype(np.uint8) for i, n in zip(idx, volume.shape[1:])])
    mask = np.prod(np.broadcast_arrays(*inside), axis=0).astype(bool)
    return np.where(mask[None], volume[np.ix_(np.arange(volume.shape[0]), *clipped)], 0)


def test_voco_items_are_deterministic_and_their_targets_match_their_windows(demo_dir, tmp_path):
    items = load_datalist(demo_dir / "datalist.json")
    cfg = _data(roi=[16, 16, 16], spacing=[4.0, 4.0, 4.0], crops_per_volume=2)
    voco = {"voco": {"grid": 3, "n_random": 4}}
    ds = PretrainDataset(items, cfg, tmp_path / "s", seed=2, requests=voco).prepare(progress=False)
    item = ds[(3, 1)]
    assert set(item) == {"index", "voco_base", "voco_random", "voco_targets", "voco_base_starts",
                         "voco_random_starts"}  # no views were asked for, none were drawn
    assert item["voco_base"].shape == (9, 1, 16, 16, 16) and item["voco_random"].shape == (4, 1, 16, 16, 16)
    assert item["voco_targets"].shape == (4, 9)
    fresh = PretrainDataset(items, cfg, tmp_path / "s", seed=2, requests=voco).prepare(progress=False)
    for k in item:
        if k != "index":
            assert torch.equal(item[k], ds[(3, 1)][k]) and torch.equal(item[k], fresh[(3, 1)][k])
    assert not torch.equal(item["voco_random"], ds[(3, 2)]["voco_random"])  # another epoch, another sample
    for index, epoch in [(0, 0), (3, 1), (4, 9), (5, 2)]:
        it = ds[(index, epoch)]
        base, rand = it["voco_base_starts"].numpy(), it["voco_random_starts"].numpy()
        np.testing.assert_array_equal(it["voco_targets"].numpy(), overlap_targets(rand, base, 16))
        np.testing.assert_allclose(it["voco_targets"].sum(1).numpy(), 1.0, atol=1e-6)  # inside the region
        volume = ds.stored_volume(index // 2)
        region = voco_region(volume.shape[1:], 16, 3)
        assert (rand >= base.min(0)).all() and (rand + 16 <= base.min(0) + region).all()
        for crops, starts in ((it["voco_base"], base), (it["voco_random"], rand)):
            for crop, start in zip(crops.numpy(), starts):
                np.testing.assert_array_equal(crop, padded_window(volume, start, (16, 16, 16)))
    both = PretrainDataset(items, cfg, tmp_path / "s", seed=2, requests={**voco, "views": {}}).prepare(progress=False)
    mixed = both[(3, 1)]
    assert torch.equal(mixed["voco_base"], item["voco_base"]) and mixed["view1"].shape == (1, 16, 16, 16)


def test_voco_items_of_a_2d_run_come_from_one_axial_slice(demo_dir, tmp_path):
    items = load_datalist(demo_dir / "datalist.json")[:1]
    ds = PretrainDataset(items, _data(roi=[20, 24], spacing=[4.0, 4.0, 4.0]), tmp_path / "s", seed=0, spatial_dims=2,
                         requests={"voco": {"grid": 2, "n_random": 3}}).prepare(progress=False)
    it = ds[(1, 4)]
    assert it["voco_base"].shape == (4, 1, 20, 24) and it["voco_targets"].shape == (3, 4)
    volume = ds.stored_volume(0)
    matches = [z for z in range(volume.shape[3])
               if all(np.array_equal(c, padded_window(volume[..., z], s, (20, 24)))
                      for c, s in zip(it["voco_random"].numpy(), it["voco_random_starts"].numpy()))]
    assert matches and all(np.array_equal(c, padded_window(volume[..., matches[0]], s, (20, 24)))
                           for c, s in zip(it["voco_base"].numpy(), it["voco_base_starts"].numpy()))


def test_objectives_declare_their_data_and_the_composite_merges_it():
    from sslkit.models import build_encoder
    from sslkit.objectives.composite import Composite

    enc = build_encoder("swin_unetr", spatial_dims=3, in_channels=1, feature_size=12, depths=(1, 1, 1, 1))
    specs = [{"name": "voco", "grid": 4, "n_random": 2, "hidden_dim": 32, "out_dim": 16},
             {"name": "byol", "hidden_dim": 32, "out_dim": 16}]
    assert Composite.from_specs(specs, enc).data_requests() == {"voco": {"grid": 4, "n_random": 2}, "views": {}}
    assert Composite.from_specs(specs[1:], enc).data_requests() == {"views": {}}
    clash = Composite.from_specs([specs[0], {**specs[0], "grid": 3}], enc)
    with pytest.raises(ValueError, match="different settings"):
        clash.data_requests()


# ------------------------------------------------------------------------------------------ benchmark smoke


@pytest.mark.slow
def test_data_pipeline_benchmark_smoke(tmp_path, demo_dir, capsys, monkeypatch):
    """benchmarks/data_pipeline.py's smoke version, in this process (its memory run is a `sslkit pretrain` child)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_pipeline_benchmark", REPO / "benchmarks" / "data_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # its child's environment, as job_env makes it: one thread, no launcher variables an earlier run in this
    # process left (its MASTER_PORT is this process's, in use); SSLKIT_QUIET, which the benchmark sets, undone after
    env = job_env(SSLKIT_QUIET="1")
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # --demo: the tests' corpus (by default the benchmark takes a user's demo_data/ where there is one)
    code = bench.main(["--demo", str(demo_dir), "--scans", "6", "--steps", "4", "--reads", "20", "--prep-scans", "4",
                       "--timing-steps", "1", "--rounds", "1", "--set", "data.roi=[32,32,32]",
                       "--set", "train.micro_batch_size=2", "--work", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    for needle in ("store bytes / float32 .npy bytes", "crop reads per second", "preparation 2 vs 1 workers",
                   "steps per second", "resident memory"):
        assert needle in out, out
    ratio = float(out.split("store bytes / float32 .npy bytes: ")[1].split()[0])
    assert 0 < ratio <= 0.35  # the compression goal holds on any corpus of demo-like scans
    assert len(list((tmp_path / "bench-corpus").glob("*.nii.gz"))) == 6
    assert not list(REPO.glob("**/bench-corpus*"))  # the synthetic corpus never lands in the repository
