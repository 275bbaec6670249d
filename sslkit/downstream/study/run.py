"""Running a study: each cell fine-tuned (or continued) and evaluated, in this process or in shard workers, with a
stop signal honoured in every phase (preparation, fine-tuning, evaluation, report)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sslkit import run as R
from sslkit.downstream.study.grid import (
    SCRATCH,
    Arm,
    Cell,
    cell_recipe,
    cell_state,
    check_manifest,
    check_name,
    check_not_stale,
    resolve_arms,
    set_key,
    study_grid,
    training_case_count,
)
from sslkit.downstream.study.report import TIMINGS_FILE, StudyInfo, encoder_facts, write_reports
from sslkit.downstream.study.stats import PairedDifference, paired_differences
from sslkit.errors import ConfigError, UserError
from sslkit.run import StopSignals  # bound at import: the study's own handlers, whatever a cell's run patches


class _Clock:
    """Wall and CPU seconds of one phase, with the 1-minute load average at its end."""

    def __enter__(self) -> "_Clock":
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.load = os.getloadavg()[0]


def _log_time(out: Path, cell: Cell, phase: str, clock: _Clock) -> None:
    w = R.JsonlWriter(out / TIMINGS_FILE)
    w.write({"cell": cell.name, "phase": phase, "wall_s": round(clock.wall, 2), "cpu_s": round(clock.cpu, 2),
             "load1": round(clock.load, 2)})
    w.close()


def run_cell(arm: Arm, cell: Cell, out: Path, n_train: int, recipe_path, progress: bool,
             keep_checkpoints: bool = False, stop: StopSignals | None = None) -> str | None:
    """Train (or continue) and evaluate one cell; returns the signal name when a signal stopped it (during its
    fine-tuning, or received by `stop` during its evaluation: the evaluation ends, its reports are written, the
    study stops). An evaluated cell's checkpoints/ are removed unless `keep_checkpoints`; its best model stays."""
    from sslkit.downstream import evaluate as E
    from sslkit.downstream import train as T

    run_dir = out / cell.name
    expected = cell_recipe(arm.config, cell, n_train)
    state = cell_state(run_dir)
    if state != "todo":
        check_not_stale(run_dir, expected)
    if state == "done":
        _drop_checkpoints(run_dir, keep_checkpoints)
        return None
    if state == "todo":
        print(f"study: {cell.name}: fine-tuning", flush=True)
        with _Clock() as clock:
            res = T.finetune(expected, run_dir, encoder_path=arm.encoder_path, resume="auto", progress=progress,
                             recipe_path=recipe_path, scratch=arm.scratch)
        _log_time(out, cell, "finetune", clock)
        if res.get("stopped_by_signal"):
            return res["stopped_by_signal"]
    with _Clock() as clock:
        E.evaluate(run_dir, device=expected["train"]["device"])
    _log_time(out, cell, "evaluate", clock)
    _drop_checkpoints(run_dir, keep_checkpoints)
    return stop.requested if stop is not None else None


def _drop_checkpoints(run_dir: Path, keep: bool) -> None:
    import shutil

    if not keep:
        shutil.rmtree(run_dir / R.CHECKPOINTS, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the study


@dataclass
class StudyResult:
    out: Path
    rows: list[dict]
    differences: list[PairedDifference]
    stopped_by_signal: str | None
    cells: int                   # cells in the grid
    finished_now: int            # cells this call finished (trained and / or evaluated)


@dataclass
class _Plan:
    arms: list[Arm]
    cells: list[Cell]
    n_train: int
    info: StudyInfo
    encoders: dict[str, str]     # name -> absolute path


def _prepare(recipe_path, encoders: dict[str, str], scratch: bool, budgets: list[int], seeds: list[int],
             overrides, schedules: dict[str, list[str]] | None) -> tuple[dict, _Plan]:
    """Check the arguments, resolve every arm's config and count the training cases (nothing is written)."""
    from sslkit.downstream.config import downstream_config_from_dict, read_downstream_recipe
    from sslkit.downstream.data import list_cases
    from sslkit.downstream.evaluate import class_names

    for name in encoders:
        check_name(name)
    if not encoders and not scratch:
        raise ConfigError("study: nothing to compare; give --encoder NAME=PATH (and --scratch)")
    if not budgets or not seeds or min(budgets) < 1 or min(seeds) < 0:
        raise ConfigError("study: --budgets needs integers >= 1 and --seeds integers >= 0")
    if schedules and not encoders:
        raise ConfigError("--schedule: transfer schedules apply to pretrained encoders; give --encoder NAME=PATH")
    budgets, seeds = sorted(set(budgets)), list(dict.fromkeys(seeds))
    # absolute paths: a cell's config (model.init_from, data.root) means the same from any working directory
    encoders = {n: _absolute(p) for n, p in encoders.items()}
    raw = read_downstream_recipe(recipe_path, list(overrides))
    root = raw.get("data", {}).get("root")
    if root:
        set_key(raw, "data.root", str(Path(root).expanduser().resolve()))
    arms = resolve_arms(raw, encoders, scratch, schedules)
    n_train = training_case_count(arms[0].config)
    if max(budgets) > n_train:
        raise ConfigError(f"--budgets: {max(budgets)} labelled cases asked for, the recipe's training set "
                          f"({raw.get('data', {}).get('root')}) has {n_train}")
    base = downstream_config_from_dict(arms[0].config)
    facts = {a.encoder: encoder_facts(a.weights) for a in arms if a.weights is not None}
    info = StudyInfo(str(recipe_path), list(overrides), dict(encoders), scratch, budgets, seeds,
                     base.data.task or base.data.layout, n_train, len(list_cases(base.data)[1]), class_names(base),
                     dict(schedules or {}), facts)
    cells = study_grid([a.name for a in arms if a.name != SCRATCH], scratch, budgets, seeds)
    return raw, _Plan(arms, cells, n_train, info, encoders)


def _absolute(path: str) -> str:
    """An encoder path made absolute (RUN@best-probe keeps its selection)."""
    run, sep, select = path.rpartition("@")
    if sep and select in ("last", "healthy", "best-probe"):
        return f"{Path(run).expanduser().resolve()}@{select}"
    return str(Path(path).expanduser().resolve())


def _run_cells(plan: _Plan, cells: list[Cell], out: Path, recipe_path, progress: bool, keep_checkpoints: bool,
               stop: StopSignals) -> str | None:
    """Run `cells` one after the other (finished ones are only checked); the signal that stopped one, or None."""
    by_name = {a.name: a for a in plan.arms}
    for cell in cells:
        if stop.requested:
            return stop.requested
        if cell_state(out / cell.name) != "done":
            print(f"study: cell {plan.cells.index(cell) + 1}/{len(plan.cells)}", flush=True)
        stopped = run_cell(by_name[cell.encoder], cell, out, plan.n_train, recipe_path, progress, keep_checkpoints,
                           stop)
        if stopped:
            return stopped
    return None


def _done(out: Path, cells: list[Cell]) -> set[str]:
    return {c.name for c in cells if cell_state(out / c.name) == "done"}


def run_study(recipe_path: str | Path, encoders: dict[str, str], scratch: bool, budgets: list[int],
              seeds: list[int], out: str | Path, overrides=(), progress: bool = True, jobs: int = 1,
              keep_checkpoints: bool = False, shard: tuple[int, int] | None = None,
              schedules: dict[str, list[str]] | None = None) -> StudyResult:
    """Fine-tune and evaluate every (arm, budget, seed) cell under `out`, skipping finished cells, then write
    study.csv / study.md / study.png / study.svg. `encoders`: {name: encoder path (run directory, RUN@best-probe,
    checkpoint or .safetensors)}; `scratch`: add the from-scratch baseline (the first encoder's plan, random weights);
    `schedules`: {name: [--set assignments]}: every encoder is fine-tuned under each transfer schedule.

    `jobs` > 1 runs the cells in that many worker processes (`python -m sslkit study ... --shard i/jobs`, cell k in
    worker k mod jobs), each with train.threads = max(1, threads // jobs). SIGINT / SIGTERM / SIGUSR1 reach every
    worker and stop the study in any phase: a cell fine-tuning stops after its step with a checkpoint, a cell
    evaluating finishes its evaluation, and the report of the finished cells is written. `shard` = (i, n): run only
    cells k with k mod n == i and write no report (what a worker does)."""
    out = Path(out)
    with StopSignals() as stop:
        raw, plan = _prepare(recipe_path, encoders, scratch, budgets, seeds, overrides, schedules)
        before = _done(out, plan.cells)
        if shard is not None:
            i, n = shard
            stopped = stop.requested or _run_cells(plan, plan.cells[i::n], out, recipe_path, progress,
                                                   keep_checkpoints, stop)
            return StudyResult(out, [], [], stopped, len(plan.cells), len(_done(out, plan.cells) - before))
        out.mkdir(parents=True, exist_ok=True)
        check_manifest(out, recipe_path, overrides, plan.arms)
        if stop.requested:
            stopped = stop.requested
        elif jobs > 1:
            threads = raw.get("train", {}).get("threads") or os.cpu_count() or 1
            cmd = _worker_command(recipe_path, plan.encoders, scratch, plan.info.budgets, plan.info.seeds, out,
                                  list(overrides) + [f"train.threads={max(1, threads // jobs)}"], schedules)
            stopped = _run_workers(cmd + (["--keep-checkpoints"] if keep_checkpoints else []), jobs)
        else:
            stopped = _run_cells(plan, plan.cells, out, recipe_path, progress, keep_checkpoints, stop)
        rows = write_reports(out, plan.cells, [a.name for a in plan.arms], plan.info)
        return StudyResult(out, rows, paired_differences(rows), stopped or stop.requested, len(plan.cells),
                           len(_done(out, plan.cells) - before))


def _worker_command(recipe_path, encoders, scratch, budgets, seeds, out, overrides, schedules) -> list[str]:
    cmd = [sys.executable, "-m", "sslkit", "study", "--cfg", str(recipe_path), "--out", str(out),
           "--budgets", ",".join(map(str, budgets)), "--seeds", ",".join(map(str, seeds)), "--no-progress"]
    for name, path in encoders.items():
        cmd += ["--encoder", f"{name}={path}"]
    for name, sets in (schedules or {}).items():
        cmd += ["--schedule", f"{name}={','.join(sets)}"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--scratch"] if scratch else [])


def _run_workers(cmd: list[str], jobs: int) -> str | None:
    """Start `jobs` shard workers, pass stop signals on to them, wait; the signal that stopped them, or None.
    Workers get their own process group, so a terminal's Ctrl-C reaches them once (through this process), as
    the first SIGINT of a single-process run does."""
    import signal

    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{jobs}"], env=env, start_new_session=True)
             for i in range(jobs)]
    received: list[str] = []

    def forward(signum, frame):
        received.append(signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    names = ("SIGTERM", "SIGUSR1", "SIGINT")
    previous = {getattr(signal, n): signal.signal(getattr(signal, n), forward) for n in names}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if 130 in codes and received.count("SIGINT") > 1:
        raise KeyboardInterrupt  # a second Ctrl-C stopped the workers at once, as it stops a single process
    failed = [c for c in codes if c not in (0, R.EXIT_PREEMPTED)]
    if failed:
        raise UserError(f"study: {len(failed)} of {jobs} workers failed (exit codes {failed}); their errors are "
                        "above; fix the cause and run the same command again to continue")
    return received[0] if received else ("SIGTERM" if R.EXIT_PREEMPTED in codes else None)
