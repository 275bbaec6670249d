"""The pretraining data pipeline at corpus scale, measured in one run (issue 14, point 4 and 5).

Builds a synthetic corpus of N scans from the demo scans (random boxes of 60-100 % per axis, random flips, a random
intensity scale and shift; written as .nii.gz into a temporary folder, never into the repository), prepares it into
the store with the recipe's preprocessing, and prints:

  1. store bytes / float32 .npy bytes over the corpus                                   (goal <= 0.35)
  2. random-crop reads per second: store vs .npy memmap vs loading the NIfTI and cropping, page-cached, and store vs
     memmap with the files evicted from the page cache (a corpus larger than RAM)
                                                                        (goals store >= 0.8x memmap, >= 10x NIfTI)
  3. preparation time with 1 vs 2 workers on the first --prep-scans scans               (goal >= 1.7x on 2 cores)
  4. steps per second of the recipe's training step (model, objectives, optimizer; no DeepSpeed) with real data
     loading (DataLoader over the store, strong views) vs the same steps on batches already in memory
                                                                                         (goal >= 0.95)
  5. resident memory of a `sslkit pretrain` run over the corpus (the process and its DataLoader workers) at steps
     10-19 and up to --steps, medians of one sample per step                             (goal: growth < 10 %)

    .venv/bin/python benchmarks/data_pipeline.py                       # 500 scans, 200 steps (~30 min on 2 cores)
    .venv/bin/python benchmarks/data_pipeline.py --scans 6 --steps 4 --reads 20 --prep-scans 4 --timing-steps 1 \
        --rounds 1 --set data.roi=[32,32,32] --set train.micro_batch_size=2          # smoke version

Timings on a shared machine move with its load: the load average is printed before and after each timed part.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "pretrain_configs" / "demo_ct_byol.yaml"
SOURCES = (("ct_head.nii.gz", "ct"), ("mri_colin27_t1.nii.gz", "mri"), ("mri_mni152_t1.nii.gz", "mri"))


def load_avg() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def say(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------------------------ corpus


def demo_folder(given: str | None) -> Path:
    from sslkit.data.demo import build_demo_corpus

    folder = Path(given) if given else (REPO / "demo_data" if (REPO / "demo_data" / "datalist.json").exists()
                                        else Path("/tmp/sslkit-test-demo"))
    build_demo_corpus(folder)
    return folder


def synthetic_corpus(demo: Path, out: Path, n: int, seed: int = 0) -> Path:
    """n .nii.gz scans made from the demo scans; returns a datalist JSON listing them with their modality."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = []
    for name, modality in SOURCES:
        img = nib.load(str(demo / name))
        sources.append((np.asarray(img.dataobj, dtype=np.float32), img.affine, modality))
    entries = []
    for i in range(n):
        arr, affine, modality = sources[i % len(sources)]
        size = [int(s * rng.uniform(0.6, 1.0)) for s in arr.shape[:3]]
        start = [int(rng.integers(0, s - z + 1)) for s, z in zip(arr.shape[:3], size)]
        box = arr[tuple(slice(a, a + z) for a, z in zip(start, size))]
        for axis in range(3):
            if rng.random() < 0.5:
                box = np.flip(box, axis)
        scale = rng.uniform(0.95, 1.05) if modality == "ct" else rng.uniform(0.8, 1.2)
        shift = rng.uniform(-30, 30) if modality == "ct" else 0.0
        box = np.round(box * scale + shift).astype(np.int16)
        moved = affine.copy()
        moved[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
        path = out / f"scan{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(box), moved), str(path))
        entries.append({"image": str(path), "modality": modality})
    datalist = out / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}), encoding="utf-8")
    return datalist


def recipe_sets(datalist: Path, store: Path, extra: list[str]) -> list[str]:
    """--set overrides of every run here: the synthetic corpus, its store, strong views, no probes; then `extra`."""
    return [f"data.datalist={datalist}", f"data.cache_dir={store}", "data.views.strength=strong",
            "monitor.probe_every=0", "monitor.task_probe.datalist=null", *extra]


def recipe(datalist: Path, store: Path, extra: list[str], **train) -> "object":
    from sslkit.config import load_config

    return load_config(RECIPE, recipe_sets(datalist, store, extra) + [f"train.{k}={v}" for k, v in train.items()])


# ------------------------------------------------------------------------------------------------ 1 + 3


def preparation(cfg, work: Path, prep_scans: int, repeats: int = 2) -> tuple[dict, Path]:
    """Prepare the whole corpus with 2 workers; then time 1 vs 2 workers on the first prep_scans entries, alternating
    (1, 2, 1, 2, ...) into fresh stores. Times: sums over the repeats. The whole corpus goes first so that the timed
    runs do not share the disk with the writeback of the corpus just written (timed first, 2 workers came out
    1.65-1.74x one in three runs; timed after it, 1.99x and 2.00x)."""
    from sslkit.data.prepare import prepare_store
    from sslkit.data.preprocess import preprocess_transforms

    preprocess_transforms(cfg.data, "ct")  # imports MONAI's transforms before any clock starts
    sub = copy.deepcopy(cfg)
    items = json.loads(Path(cfg.data.datalist).read_text())["training"]
    part = work / "datalist_prep.json"
    part.write_text(json.dumps({"training": items[:prep_scans]}))
    sub.data.datalist = str(part)
    os.sync()
    full = prepare_store(cfg, work / "store_w2", workers=2, progress=False)
    os.sync()
    before = load_avg()
    seconds = {1: 0.0, 2: 0.0}
    for r in range(repeats):
        for workers in (1, 2):
            folder = work / f"store_timing_{workers}"
            shutil.rmtree(folder, ignore_errors=True)
            seconds[workers] += prepare_store(sub, folder, workers=workers, progress=False).seconds
    timing = {"scans": prep_scans, "one": seconds[1], "two": seconds[2], "repeats": repeats,
              "load": f"{before} -> {load_avg()}", "all": full.seconds}
    return timing, work / "store_w2"


def sizes(store: Path, npy_dir: Path) -> dict:
    """Store bytes (.b2nd files) vs the float32 .npy files of the same volumes (written here, as the old cache)."""
    from sslkit.data.store import VolumeStore

    vs = VolumeStore(store)
    npy_dir.mkdir(parents=True, exist_ok=True)
    store_bytes = npy_bytes = 0
    for key in vs.keys():
        store_bytes += vs.image_path(key).stat().st_size
        np.save(npy_dir / f"{key}.npy", vs.read_volume(key))
        npy_bytes += (npy_dir / f"{key}.npy").stat().st_size
    return {"store": store_bytes, "npy": npy_bytes, "volumes": len(vs.keys())}


# ------------------------------------------------------------------------------------------------ 2


def window(arr, starts: list[int], roi: list[int]) -> np.ndarray:
    """float32 copy of the roi window of a (C, *spatial) array at `starts`."""
    return np.array(arr[(slice(None),) + tuple(slice(a, a + r) for a, r in zip(starts, roi))], dtype=np.float32)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED: clean, unmapped pages; no root needed),
    as for a corpus larger than RAM, where a random crop's volume is rarely cached."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_crop_reads(store: Path, npy_dir: Path, picks: list, roi: list[int]) -> dict:
    """Reads per second (best of 3 passes) of the store and of .npy memmaps opened per read, with every file of
    the reader evicted from the page cache before each pass."""
    from sslkit.data.store import VolumeStore

    def npy_read(k, st):
        return window(np.load(npy_dir / f"{k}.npy", mmap_mode="r"), st, roi)

    rates = {}
    for name, files in (("store, page cache evicted", sorted(store.glob("*.b2nd"))),
                        (".npy memmap, page cache evicted", sorted(npy_dir.glob("*.npy")))):
        best = 0.0
        for _ in range(3):
            vs = VolumeStore(store)
            read = (lambda k, st: vs.read_crop(k, st, roi)) if name.startswith("store") else npy_read
            evict(files)
            t = time.perf_counter()
            for k, st in picks:
                read(k, st)
            best = max(best, len(picks) / (time.perf_counter() - t))
            vs.close()
        rates[name] = best
    return rates


def crop_reads(store: Path, npy_dir: Path, corpus: list[dict], roi: list[int], reads: int) -> dict:
    """Random roi windows over random volumes: reads per second (best of 3 passes for the fast readers), with the
    files page-cached and, for the store and the memmap opened per read, with their pages evicted before each pass."""
    import nibabel as nib

    from sslkit.data.store import VolumeStore

    vs = VolumeStore(store)
    keys = vs.keys()
    shapes = {k: vs.info(k)["shape"] for k in keys}
    rng = np.random.default_rng(1)
    picks = []
    for _ in range(reads):
        k = keys[int(rng.integers(len(keys)))]
        starts = [int(rng.integers(0, max(0, s - r) + 1)) for s, r in zip(shapes[k][1:], roi)]
        picks.append((k, starts))
    blocks = {k: vs.info(k)["blocks"][1:] for k in keys}
    aligned = [(k, [s - s % b for s, b in zip(st, blocks[k])]) for k, st in picks]
    mmaps = {k: np.load(npy_dir / f"{k}.npy", mmap_mode="r") for k in keys}

    readers = {
        "store (float16, blosc2)": lambda k, st: vs.read_crop(k, st, roi),
        "store, block-aligned windows": None,
        ".npy memmap, opened per read (the old cache)": lambda k, st: window(np.load(npy_dir / f"{k}.npy",
                                                                                     mmap_mode="r"), st, roi),
        ".npy memmap, kept open": lambda k, st: window(mmaps[k], st, roi),
    }
    rates = {}
    for name, read in readers.items():
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            if read is None:
                for k, st in aligned:
                    vs.read_crop(k, st, roi)
            else:
                for k, st in picks:
                    read(k, st)
            best = max(best, reads / (time.perf_counter() - t))
        rates[name] = best
    vs.close()
    mmaps.clear()  # mapped pages stay resident while mapped: close every map before evicting
    rates.update(cold_crop_reads(store, npy_dir, picks, roi))
    n_nifti = max(3, reads // 20)
    t = time.perf_counter()
    for i in range(n_nifti):
        entry = corpus[int(rng.integers(len(corpus)))]
        proxy = nib.load(entry["image"]).dataobj
        st = [int(rng.integers(0, max(0, s - r) + 1)) for s, r in zip(proxy.shape, roi)]
        np.asarray(proxy[tuple(slice(a, a + r) for a, r in zip(st, roi))], dtype=np.float32)
    rates["NIfTI (.nii.gz) load + crop"] = n_nifti / (time.perf_counter() - t)
    return rates


# ------------------------------------------------------------------------------------------------ 4


def step_rates(cfg, timing_steps: int, rounds: int) -> dict:
    """Training steps per second with the DataLoader (cfg.train.num_workers workers over the store, strong views) vs
    on batches already in memory (`timing_steps` of them, reused): one loaded step, then one in-memory step, and so
    on for rounds x timing_steps pairs, so a change of the machine's load hits both alike."""
    import torch

    from sslkit.data.datalist import load_datalist
    from sslkit.data.pretrain import PretrainDataset
    from sslkit.engine.sampler import EpochSampler, worker_init
    from sslkit.engine.optim import make_optimizer
    from sslkit.engine.trainer import build_model

    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg)
    ds = PretrainDataset(load_datalist(cfg.data.datalist), cfg.data, Path(cfg.data.cache_dir), seed=t.seed,
                         requests=model.objectives.data_requests()).prepare(progress=False)
    optimizer = make_optimizer(model, cfg.optim)

    def step(batch: dict, k: int) -> None:
        out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.objectives.on_optimizer_step(k, t.max_steps)

    sampler = EpochSampler(len(ds), t.micro_batch_size, t.seed, 0, 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=t.micro_batch_size, sampler=sampler, drop_last=True,
                                         worker_init_fn=worker_init(t.worker_nice),
                                         num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
    it = iter(loader)
    for k in range(2):  # warm-up: workers started, first allocations made
        step(next(it), k)
    in_memory = [next(it) for _ in range(timing_steps)]
    loaded_s = memory_s = 0.0
    before = load_avg()
    n = rounds * timing_steps
    for k in range(n):
        t0 = time.perf_counter()
        step(next(it), k)
        t1 = time.perf_counter()
        step(in_memory[k % timing_steps], k)
        loaded_s, memory_s = loaded_s + t1 - t0, memory_s + time.perf_counter() - t1
    return {"loaded": n / loaded_s, "memory": n / memory_s, "threads": torch.get_num_threads(),
            "workers": t.num_workers, "nice": t.worker_nice, "steps": n, "load": f"{before} -> {load_avg()}"}


# ------------------------------------------------------------------------------------------------ 5


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def _memory(pid: int) -> dict:
    """RSS and PSS (MB; PSS splits shared pages among their users) of a process ("main") and of its descendants
    ("workers": the DataLoader workers)."""
    out = {"main_rss": 0.0, "main_pss": 0.0, "workers_rss": 0.0, "workers_pss": 0.0, "processes": 0}
    for p in _tree(pid):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:])
        except OSError:
            continue
        who = "main" if p == pid else "workers"
        out[f"{who}_rss"] += int(fields["Rss"].split()[0]) / 1024
        out[f"{who}_pss"] += int(fields["Pss"].split()[0]) / 1024
        out["processes"] += 1
    out["rss_mb"], out["pss_mb"] = out["main_rss"] + out["workers_rss"], out["main_pss"] + out["workers_pss"]
    return out


def _median_sample(samples: list[dict]) -> dict:
    """Per-field medians of memory samples (a training step's transient buffers come and go: one sample of the
    main process moves by ~10 %)."""
    return {k: float(np.median([s[k] for s in samples])) for k in samples[0]}


def memory_run(datalist: Path, store: Path, run_dir: Path, steps: int, workers: int, extra: list[str],
               span: int = 10) -> dict:
    """`sslkit pretrain` over the store; memory sampled once per new step (as metrics.jsonl shows it) over the
    `span` steps from step 10 (or steps // 2) and over the `span` steps up to `steps`, reported as medians (the
    run goes 5 steps further, so the process is still training then)."""
    early = min(10, max(1, steps // 2))
    late = max(early + 1, steps - span + 1)
    spans = {"early": (early, min(early + span, late)), "late": (late, steps + 1)}  # [first, stop) steps
    sets = recipe_sets(datalist, store, extra) + [f"train.max_steps={steps + 5}", f"train.num_workers={workers}",
                                                  "train.ckpt_every=0"]
    cmd = [sys.executable, "-m", "sslkit", "pretrain", "--cfg", str(RECIPE), "--run-dir", str(run_dir),
           "--no-progress", *[x for kv in sets for x in ("--set", kv)]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / "rss_run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: dict[str, dict[int, dict]] = {"early": {}, "late": {}}
    metrics = run_dir / "metrics.jsonl"
    try:
        while proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            step = json.loads(lines[-1])["step"] if lines else 0
            for name, (first, stop) in spans.items():  # a span the polling skipped gets its next step
                if first <= step and (step < stop or not samples[name]) and step not in samples[name]:
                    samples[name][step] = _memory(proc.pid)
            if step >= steps and samples["late"]:
                break
            time.sleep(0.1)
        proc.wait(timeout=3600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    if proc.returncode != 0 or not all(samples.values()):
        tail = (run_dir.parent / "rss_run.log").read_text()[-2000:]
        raise SystemExit(f"the memory run failed (exit {proc.returncode}): {tail}")
    out = {name: {**_median_sample(list(s.values())), "steps": f"{min(s)}-{max(s)}", "samples": len(s)}
           for name, s in samples.items()}
    return {**out, "workers": workers}


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=500, help="synthetic corpus size (default 500)")
    p.add_argument("--steps", type=int, default=200, help="steps of the memory run (default 200)")
    p.add_argument("--reads", type=int, default=300, help="random crops per reader (default 300)")
    p.add_argument("--prep-scans", type=int, default=60, help="scans timed with 1 and 2 workers (default 60)")
    p.add_argument("--timing-steps", type=int, default=10, help="steps per round of the step-rate comparison")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step-rate comparison")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the step-rate comparison")
    p.add_argument("--worker-nice", type=int, default=19, help="their niceness, train.worker_nice (default 19: "
                   "they share the cores with the training threads)")
    p.add_argument("--memory-workers", type=int, default=2, help="DataLoader workers of the memory run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the recipe in the step and memory runs (e.g. a smaller data.roi)")
    p.add_argument("--memory-set", dest="memory_overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="overrides of the memory run only, after --set (default: data.roi=[32,32,32] and "
                        "model.args.depths=[1,1,1,1], a lighter model: 200 steps of the full one take ~1 h on 2 "
                        "shared cores, and the data pipeline's memory does not depend on the model)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    p.add_argument("--demo", default=None, help="demo corpus folder (default demo_data/ or /tmp/sslkit-test-demo)")
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sslkit-bench-"))
    if REPO in work.resolve().parents or work.resolve() == REPO:
        raise SystemExit(f"--work {work}: the synthetic corpus must not be written inside the repository")
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(a, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def _run(a, work: Path) -> int:
    os.environ.setdefault("SSLKIT_QUIET", "1")
    t_start = time.time()
    say(f"sslkit data pipeline benchmark: {a.scans} synthetic scans, recipe {RECIPE.name} (strong views); "
        f"{os.cpu_count()} CPUs, {load_avg()}")
    t = time.perf_counter()
    datalist = synthetic_corpus(demo_folder(a.demo), work / "bench-corpus", a.scans)
    corpus = json.loads(datalist.read_text())["training"]
    raw_mb = sum(Path(e["image"]).stat().st_size for e in corpus) / 1e6
    say(f"corpus: {a.scans} .nii.gz scans, {raw_mb:.0f} MB, written in {time.perf_counter() - t:.0f} s")

    cfg = recipe(datalist, work / "store_w2", a.overrides, num_workers=a.workers)
    prep, store = preparation(cfg, work, min(a.prep_scans, a.scans))
    say(f"preparation 2 vs 1 workers: {prep['one'] / prep['two']:.2f}x  ({prep['scans']} scans x {prep['repeats']}, "
        f"alternating: 1 worker {prep['one']:.1f} s, 2 workers {prep['two']:.1f} s; {prep['load']})  [goal >= 1.7x]")
    say(f"  whole corpus prepared with 2 workers in {prep['all']:.0f} s in all")

    sz = sizes(store, work / "npy")
    say(f"store bytes / float32 .npy bytes: {sz['store'] / sz['npy']:.3f}  ({sz['store'] / 1e6:.0f} MB vs "
        f"{sz['npy'] / 1e6:.0f} MB, {sz['volumes']} volumes, float16)  [goal <= 0.35]")

    before = load_avg()
    rates = crop_reads(store, work / "npy", corpus, list(cfg.data.roi), a.reads)
    memmap = rates[".npy memmap, kept open"]
    nifti = rates["NIfTI (.nii.gz) load + crop"]
    store_rate = rates["store (float16, blosc2)"]
    say(f"crop reads per second ({'x'.join(map(str, cfg.data.roi))} windows, page-cached files; {before} -> "
        f"{load_avg()}):")
    for name, r in rates.items():
        say(f"  {name:48s} {r:9.1f} /s")
    say(f"  store / memmap kept open {store_rate / memmap:.2f}x  [goal >= 0.8x];  store / memmap opened per read "
        f"{store_rate / rates['.npy memmap, opened per read (the old cache)']:.2f}x;  store / NIfTI "
        f"{store_rate / nifti:.0f}x  [goal >= 10x]")
    say(f"  page cache evicted before each pass: store / memmap "
        f"{rates['store, page cache evicted'] / rates['.npy memmap, page cache evicted']:.2f}x")

    sr = step_rates(recipe(datalist, store, a.overrides, num_workers=a.workers, worker_nice=a.worker_nice),
                    a.timing_steps, a.rounds)
    say(f"steps per second, data loading / in memory: {sr['loaded'] / sr['memory']:.3f}  (loaded {sr['loaded']:.3f} "
        f"/s, in memory {sr['memory']:.3f} /s; {sr['steps']} steps each, {sr['workers']} DataLoader worker(s) at nice "
        f"{sr['nice']}, "
        f"{sr['threads']} torch threads; {sr['load']})  [goal >= 0.95]")

    light = ["data.roi=[32,32,32]", "model.args.depths=[1,1,1,1]"] if a.memory_overrides is None \
        else a.memory_overrides
    mem = memory_run(datalist, store, work / "rss_run", a.steps, a.memory_workers, a.overrides + light)
    e, late = mem["early"], mem["late"]

    def growth(key: str) -> str:
        return f"{100 * (late[key] / e[key] - 1):+.1f} %"

    say(f"resident memory (sslkit pretrain, {' '.join(light) or 'the recipe'}, strong views, {mem['workers']} "
        f"DataLoader worker(s), {int(e['processes'])} processes; medians of one sample per step): steps {e['steps']} "
        f"RSS {e['rss_mb']:.0f} MB / PSS {e['pss_mb']:.0f} MB; steps {late['steps']} RSS {late['rss_mb']:.0f} MB / "
        f"PSS {late['pss_mb']:.0f} MB; growth RSS {growth('rss_mb')}, PSS {growth('pss_mb')}  [goal < 10 %]; "
        f"workers alone: RSS {e['workers_rss']:.0f} -> {late['workers_rss']:.0f} MB ({growth('workers_rss')}), "
        f"main process RSS {e['main_rss']:.0f} -> {late['main_rss']:.0f} MB ({growth('main_rss')})")
    say(f"total {time.time() - t_start:.0f} s; {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
