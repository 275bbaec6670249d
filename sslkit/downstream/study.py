"""`sslkit study`: the label-efficiency experiment in one command.

How much does pretraining help when only a few volumes are labelled? A study fine-tunes every cell of the grid
(encoder, budget, seed) with one recipe:

    data.num_labelled = budget     the first `budget` cases of a seeded order of the training cases
    data.split_seed   = seed       so the subsets of one seed are nested across budgets (the 3-case subset holds
    train.seed        = seed       the 1-case subset) and identical across encoders; the seed also fixes the
                                   initial weights of the parts not loaded from an encoder, and the crops
and evaluates each cell on the recipe's validation set (`sslkit.downstream.evaluate`). `scratch` is the same
architecture and preprocessing as the first encoder's plan, from random weights (`finetune(scratch=True)`).

Layout of the output folder DIR:
  study.json                 the recipe, its overrides and each encoder's path and weights digest (a later run
                             into the same DIR must use the same weights per name; budgets and seeds may grow)
  <encoder>/b<budget>_s<seed>/  one fine-tuning run directory per cell (eval/metrics.json once evaluated; its
                             checkpoints/ are removed then, unless keep_checkpoints)
  timings.jsonl              one row per finished phase of a cell: wall and CPU seconds, load average
  study.csv                  one row per evaluated cell
  study.md, study.png, study.svg   the report: mean +- std over seeds, paired differences, the plot

Resumable: a cell with summary.json and eval/metrics.json is done and skipped (after checking that its resolved
config is the one this study would write); a cell stopped mid-run continues from its newest checkpoint
(resume="auto"); a cell trained but not evaluated is evaluated. A study stopped by SIGTERM / SIGUSR1 / SIGINT
writes its report of the finished cells and returns; run the same command again to continue.

Statistics. Over the seeds of one (encoder, budget): mean and sample standard deviation (ddof = 1). Paired
difference of a pretrained encoder to scratch at one budget: d_s = Dice(encoder, s) - Dice(scratch, s) over the
seeds s both finished (same subset, same crops' seed); its confidence interval is the percentile bootstrap of the
mean of d: `resamples` means of n values drawn with replacement from d (a seeded numpy Generator), and their
(1 - level)/2 and (1 + level)/2 quantiles. The difference is called within noise when that interval holds 0.
With n <= 3 seeds the 95 % interval is [min d, max d] (each extreme resample has probability >= 1/27 > 2.5 %), so
"beyond noise" then means every seed moved the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslkit import run as R
from sslkit.errors import ConfigError, UserError

SCRATCH = "scratch"
STUDY_FILE = "study.json"
TIMINGS_FILE = "timings.jsonl"
CELL_KEYS = ("data.num_labelled", "data.split_seed", "train.seed")
# keys a finished cell may differ in from the current recipe: where and how fast it ran, not what it computed
_RUN_ONLY_KEYS = ("train.threads", "train.device", "train.num_workers", "train.worker_nice", "logging")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Cell:
    """One fine-tune of the grid; `encoder` is an encoder name or SCRATCH."""
    encoder: str
    budget: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.encoder}/b{self.budget}_s{self.seed}"


def study_grid(encoders: list[str], scratch: bool, budgets: list[int], seeds: list[int]) -> list[Cell]:
    """Cells in run order: budget, then seed, then scratch and the encoders, so a study stopped early already
    holds complete seed-paired comparisons at the small budgets."""
    names = ([SCRATCH] if scratch else []) + list(encoders)
    return [Cell(e, b, s) for b in budgets for s in seeds for e in names]


def set_key(raw: dict, key: str, value) -> None:
    node = raw
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def cell_recipe(raw: dict, cell: Cell, n_train: int) -> dict:
    """The recipe of one cell: the study's recipe with the cell's budget and seed. A budget equal to the number of
    training cases means all of them (data.num_labelled = 0)."""
    out = json.loads(json.dumps(raw))
    values = (0 if cell.budget >= n_train else cell.budget, cell.seed, cell.seed)
    for key, value in zip(CELL_KEYS, values):
        set_key(out, key, value)
    return out


# ------------------------------------------------------------------------------------------------ inputs


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5]: distinct non-negative integers, in the order given."""
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, e.g. 1,3,5; got {text!r}") from None
    if not vals or len(set(vals)) != len(vals) or min(vals) < 0:
        raise ConfigError(f"{what}: expected distinct non-negative integers, got {text!r}")
    return vals


def parse_encoders(items: list[str]) -> dict[str, str]:
    """['byol=runs/a', 'mg=runs/b'] -> {'byol': 'runs/a', 'mg': 'runs/b'} (names become folder names)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--encoder {item!r}: expected NAME=PATH, e.g. byol=runs/demo_ct_byol")
        _check_name(name)
        if name in out:
            raise ConfigError(f"--encoder {name}: given twice")
        out[name] = path
    return out


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name == SCRATCH:
        raise ConfigError(f"--encoder {name!r}: a name is letters, digits, '_', '.', '-' and not '{SCRATCH}'")


@dataclass
class Arm:
    """One line of the study: an encoder (or scratch) with its resolved config and the weights file it loads."""
    name: str
    encoder_path: str | None     # what finetune gets as encoder_path (scratch: the plan it follows)
    scratch: bool
    config: dict                 # the resolved config (plan filled in) before the cell keys
    weights: Path | None = None  # the encoder's weights file (None for scratch)


def _resolve_arms(raw: dict, encoders: dict[str, str], scratch: bool) -> list[Arm]:
    """Each arm's resolved config; scratch follows the first encoder's plan with random weights (or, with no
    encoder, the model the recipe names)."""
    from sslkit.downstream.train import resolve_recipe

    arms = []
    first = next(iter(encoders.values()), None)
    if scratch:
        cfg, _, _ = resolve_recipe(raw, first)
        cfg.model.init_from = ""
        if not cfg.model.name:
            raise ConfigError("model.name: a scratch-only study needs a recipe that names the model "
                              "(or give --encoder NAME=PATH: scratch then follows its plan)")
        arms.append(Arm(SCRATCH, first, bool(first), cfg.to_dict()))
    for name, path in encoders.items():
        cfg, _, enc_file = resolve_recipe(raw, path)
        arms.append(Arm(name, path, False, cfg.to_dict(), Path(enc_file)))
    return arms


def _training_case_count(config: dict) -> int:
    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.downstream.data import list_cases

    base = json.loads(json.dumps(config))
    set_key(base, "data.num_labelled", 0)
    return len(list_cases(downstream_config_from_dict(base).data)[0])


def _check_manifest(out: Path, recipe_path, overrides, arms: list[Arm]) -> dict:
    """study.json of this study; a later run into the same folder must use the same encoder weights."""
    path = out / STUDY_FILE
    now = {"recipe": str(recipe_path), "overrides": list(overrides),
           "encoders": {a.name: {"path": str(a.weights), "blake2b": R.file_digest(a.weights)}
                        for a in arms if a.weights is not None}}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for name, rec in old.get("encoders", {}).items():
            if name in now["encoders"] and rec["blake2b"] != now["encoders"][name]["blake2b"]:
                raise UserError(f"{out}: encoder '{name}' ({now['encoders'][name]['path']}) has other weights than "
                                f"the ones this study used ({rec['path']}); use a new --out or another name")
        now["encoders"] = {**old.get("encoders", {}), **now["encoders"]}
    R.atomic_write_json(path, now)
    return now


# ------------------------------------------------------------------------------------------------ cells


def cell_config(arm: Arm, cell: Cell, n_train: int) -> dict:
    return cell_recipe(arm.config, cell, n_train)


def cell_state(run_dir: Path) -> str:
    """'done' (trained and evaluated), 'trained' (summary, no evaluation) or 'todo' (new, or stopped mid-run)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return "todo"
    if json.loads(summary.read_text(encoding="utf-8")).get("stopped_by_signal"):
        return "todo"
    return "done" if (run_dir / "eval" / "metrics.json").is_file() else "trained"


def _check_not_stale(run_dir: Path, expected: dict) -> None:
    import yaml

    used = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    changed = R.config_changes(used, expected, ignore=_RUN_ONLY_KEYS)
    if changed:
        raise UserError(f"{run_dir}: finished with another recipe ({R.changes_text(changed)} differ); use a new "
                        "--out, or delete that cell to train it again")


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
             keep_checkpoints: bool = False) -> str | None:
    """Train (or continue) and evaluate one cell; returns the signal name when a signal stopped it. An evaluated
    cell's checkpoints/ (only needed to resume it; ~45 MB for the demo's Swin-UNETR) are removed unless
    `keep_checkpoints`; its best model (model.safetensors) stays."""
    from sslkit.downstream.evaluate import evaluate
    from sslkit.downstream.train import finetune

    run_dir = out / cell.name
    expected = cell_config(arm, cell, n_train)
    state = cell_state(run_dir)
    if state != "todo":
        _check_not_stale(run_dir, expected)
    if state == "done":
        _drop_checkpoints(run_dir, keep_checkpoints)
        return None
    if state == "todo":
        print(f"study: {cell.name}: fine-tuning", flush=True)
        with _Clock() as clock:
            res = finetune(expected, run_dir, encoder_path=arm.encoder_path, resume="auto", progress=progress,
                           recipe_path=recipe_path, scratch=arm.scratch)
        _log_time(out, cell, "finetune", clock)
        if res.get("stopped_by_signal"):
            return res["stopped_by_signal"]
    with _Clock() as clock:
        evaluate(run_dir, device=expected["train"]["device"])
    _log_time(out, cell, "evaluate", clock)
    _drop_checkpoints(run_dir, keep_checkpoints)
    return None


def _drop_checkpoints(run_dir: Path, keep: bool) -> None:
    import shutil

    if not keep:
        shutil.rmtree(run_dir / R.CHECKPOINTS, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ results


def _number(v) -> float:
    """A metrics.json value as a float (jsonable wrote nan as null, inf as "inf")."""
    if v is None:
        return math.nan
    return float(v)


def cell_row(out: Path, cell: Cell, names: list[str], timings: dict) -> dict:
    """One study.csv row from an evaluated cell."""
    import yaml

    run_dir = out / cell.name
    m = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))["summary"]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    row = {"encoder": cell.encoder, "budget": cell.budget, "seed": cell.seed,
           "mean_dice": _number(m["mean_dice"])}
    row.update({f"dice_{n}": _number(m["per_class"].get(n, {}).get("dice")) for n in names})
    row["mean_hd95"] = _number(m["mean_hd95"])
    row.update({f"hd95_{n}": _number(m["per_class"].get(n, {}).get("hd95")) for n in names})
    t = timings.get(cell.name, {})
    row.update({"best_step": summary.get("best_step"), "steps": summary.get("steps"),
                "nonfinite_stop": bool(summary.get("stopped_by_nonfinite")),
                "train_cases": ";".join(training_case_names(cfg)),
                "train_wall_s": round(t.get("finetune", (0, 0))[0], 1),
                "eval_wall_s": round(t.get("evaluate", (0, 0))[0], 1),
                "cpu_s": round(sum(c for _, c in t.values()), 1),
                "run_dir": cell.name})
    return row


def training_case_names(config: dict) -> list[str]:
    """File names of the training images a cell's resolved config selects (its labelled subset)."""
    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.downstream.data import list_cases

    train, _ = list_cases(downstream_config_from_dict(config).data)
    return [Path(c["image"][0] if isinstance(c["image"], list) else c["image"]).name for c in train]


def read_timings(out: Path) -> dict:
    """{cell name: {phase: (wall s, cpu s)}}, summed over the runs of a phase (a resumed cell has several)."""
    acc: dict = {}
    for r in R.read_jsonl(out / TIMINGS_FILE):
        w, c = acc.setdefault(r["cell"], {}).get(r["phase"], (0.0, 0.0))
        acc[r["cell"]][r["phase"]] = (w + r["wall_s"], c + r["cpu_s"])
    return acc


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (nan for one value), n) over the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def bootstrap_ci(values, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (n of them): `resamples` rows of n indices drawn
    uniformly with replacement by np.random.default_rng(seed), each row's mean, then the (1 - level)/2 and
    (1 + level)/2 quantiles of those means (numpy's linear interpolation). (nan, nan) for no values."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    means = v[idx].mean(axis=1)                                       # (resamples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class PairedDifference:
    encoder: str
    budget: int
    seeds: list[int]
    diffs: list[float]           # Dice(encoder, s) - Dice(scratch, s), per seed
    mean: float
    ci: tuple[float, float]
    level: float

    @property
    def within_noise(self) -> bool:
        return len(self.diffs) < 2 or self.ci[0] <= 0.0 <= self.ci[1]

    def sentence(self, unit: str) -> str:
        n = len(self.diffs)
        head = (f"{self.budget} {unit}: {self.encoder} - scratch = {self.mean:+.4f} mean Dice over {n} seed"
                f"{'s' if n != 1 else ''}")
        if n < 2:
            return head + "; one seed gives no estimate of the noise."
        ci = f"{self.level:.0%} interval [{self.ci[0]:+.4f}, {self.ci[1]:+.4f}]"
        if self.within_noise:
            return f"{head} ({ci}): within noise, the interval holds 0."
        better = "better" if self.mean > 0 else "worse"
        return f"{head} ({ci}): beyond noise, the pretrained encoder is {better} than scratch."


def paired_differences(rows: list[dict], level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> list[PairedDifference]:
    """Per pretrained encoder and budget: the seed-paired differences of mean Dice to scratch."""
    by = {(r["encoder"], r["budget"], r["seed"]): r["mean_dice"] for r in rows}
    out = []
    encoders = sorted({r["encoder"] for r in rows} - {SCRATCH}, key=[r["encoder"] for r in rows].index)
    for enc in encoders:
        for b in sorted({r["budget"] for r in rows}):
            seeds = sorted(s for (e, bb, s) in by if e == enc and bb == b and (SCRATCH, b, s) in by)
            d = [by[(enc, b, s)] - by[(SCRATCH, b, s)] for s in seeds]
            d_ok = [x for x in d if np.isfinite(x)]
            if not d_ok:
                continue
            out.append(PairedDifference(enc, b, seeds, d, float(np.mean(d_ok)),
                                        bootstrap_ci(d_ok, level, resamples, seed), level))
    return out


# ------------------------------------------------------------------------------------------------ reports


def _fmt(v: float, digits: int = 4) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _pm(values, digits: int = 4) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with R.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (_fmt(v) if isinstance(v, float) and k not in ("train_wall_s", "eval_wall_s", "cpu_s")
                                else v) for k, v in r.items()})


@dataclass
class StudyInfo:
    """What the report says about how the study was made."""
    recipe: str
    overrides: list[str]
    encoders: dict[str, str]
    scratch: bool
    budgets: list[int]
    seeds: list[int]
    task: str
    n_train: int
    n_val: int
    class_names: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    load: list[float] = field(default_factory=list)


def summary_table(rows: list[dict], names: list[str], arms: list[str]) -> list[str]:
    """Markdown table: per budget and arm, mean ± std over seeds of mean Dice, each class's Dice, mean HD95."""
    head = ["budget", "encoder", "seeds", "mean Dice"] + [f"{n} Dice" for n in names] + ["mean HD95 (mm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in sorted({r["budget"] for r in rows}):
        for a in arms:
            rs = [r for r in rows if r["budget"] == b and r["encoder"] == a]
            if not rs:
                continue
            cells = [str(b), a, str(len(rs)), _pm([r["mean_dice"] for r in rs])]
            cells += [_pm([r[f"dice_{n}"] for r in rs]) for n in names]
            cells.append(_pm([r["mean_hd95"] for r in rs], 2))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def differences_section(diffs: list[PairedDifference], unit: str) -> list[str]:
    if not diffs:
        return ["No paired differences yet: they need finished scratch and encoder cells of the same budget and "
                "seed."]
    lv = f"{diffs[0].level:.0%}"
    lines = [f"| budget | encoder | seeds | mean difference | {lv} bootstrap interval | per seed | verdict |",
             "|---|---|---|---|---|---|---|"]
    for d in diffs:
        per = ", ".join(f"s{s}: {x:+.4f}" for s, x in zip(d.seeds, d.diffs))
        verdict = "one seed" if len(d.diffs) < 2 else ("within noise" if d.within_noise else "beyond noise")
        lines.append(f"| {d.budget} | {d.encoder} | {len(d.diffs)} | {d.mean:+.4f} | "
                     f"[{d.ci[0]:+.4f}, {d.ci[1]:+.4f}] | {per} | {verdict} |")
    return lines + [""] + [f"- {d.sentence(unit)}" for d in diffs]


def write_markdown(rows: list[dict], diffs: list[PairedDifference], info: StudyInfo, arms: list[str],
                   path: Path, plot_name: str | None) -> None:
    enc = ", ".join(f"`{n}` = `{p}`" for n, p in info.encoders.items()) or "none"
    sets = " ".join(f"`--set {o}`" for o in info.overrides)
    scratch = (f"`{SCRATCH}`: the architecture and preprocessing of `{next(iter(info.encoders), '')}`'s plan "
               "from random weights" if info.scratch and info.encoders else
               f"`{SCRATCH}`: the recipe's model from random weights" if info.scratch else "no scratch baseline")
    lines = [f"# Label-efficiency study: {info.task}", "",
             f"Recipe `{info.recipe}`{(' with ' + sets) if sets else ''}; encoders {enc}; {scratch}.",
             f"Budgets (labelled training cases) {', '.join(map(str, info.budgets))} of {info.n_train}; seeds "
             f"{', '.join(map(str, info.seeds))}. Each cell sets data.num_labelled = budget, data.split_seed = "
             "train.seed = seed: the cases of one seed are nested across budgets and the same for every encoder. "
             f"Every cell is evaluated on the same {info.n_val} validation case{'s' if info.n_val != 1 else ''}.",
             "", "## Dice and HD95 on the validation set (mean ± sample std over seeds)", ""]
    lines += summary_table(rows, info.class_names, arms)
    lines += ["", "HD95 is averaged over the classes found (a missed class has no finite distance).", "",
              "## Paired difference to scratch (mean Dice; same seed, same labelled cases)", "",
              "Percentile bootstrap of the mean seed-paired difference (10,000 resamples, seeded). With 3 or fewer "
              "seeds the 95 % interval is the range of the per-seed differences, so 'beyond noise' means every "
              "seed moved the same way.", ""]
    lines += differences_section(diffs, "labelled")
    if plot_name:
        lines += ["", "## Plot", "", f"![Dice against labelled volumes]({plot_name})"]
    n_cells = len(rows)
    lines += ["", "## Time", "",
              f"{n_cells} evaluated cells; fine-tuning + evaluation of all cells: {info.wall_s:.0f} s wall, "
              f"{info.cpu_s:.0f} s CPU (summed over the cells' logged phases; load average at the end of this run "
              f"{', '.join(f'{x:.2f}' for x in info.load)})."]
    R.atomic_write_text(path, "\n".join(lines) + "\n")


def plot_study(rows: list[dict], arms: list[str], stem: Path, title: str) -> list[Path]:
    """study.png + study.svg: mean Dice (mean over seeds, shaded mean ± std, one dot per seed) against labelled
    volumes, one line per encoder. matplotlib with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    budgets = sorted({r["budget"] for r in rows})
    for i, a in enumerate(arms):
        pts = [(b, mean_std([r["mean_dice"] for r in rows if r["encoder"] == a and r["budget"] == b])) for b in budgets]
        pts = [(b, m, s) for b, (m, s, n) in pts if n > 0]
        if not pts:
            continue
        color = f"C{i}"
        xs, ms = [p[0] for p in pts], np.array([p[1] for p in pts])
        ss = np.nan_to_num(np.array([p[2] for p in pts]))
        ax.plot(xs, ms, "-o", color=color, label=a, linewidth=1.8)
        ax.fill_between(xs, ms - ss, ms + ss, color=color, alpha=0.18, linewidth=0)
        seeds = [(r["budget"], r["mean_dice"]) for r in rows if r["encoder"] == a]
        ax.scatter([x for x, _ in seeds], [y for _, y in seeds], s=10, color=color, alpha=0.5)
    ax.set_xticks(budgets)
    ax.set_xlabel("labelled training volumes")
    ax.set_ylabel("mean Dice (validation)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        p = stem.with_suffix(f".{ext}")
        with R.atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext)
        paths.append(p)
    plt.close(fig)
    return paths


def write_reports(out: Path, cells: list[Cell], arms: list[str], info: StudyInfo) -> list[dict]:
    """study.csv, study.md, study.png / .svg from every evaluated cell of the grid; returns the rows."""
    timings = read_timings(out)
    rows = [cell_row(out, c, info.class_names, timings) for c in cells if cell_state(out / c.name) == "done"]
    info.wall_s = sum(w for t in timings.values() for w, _ in t.values())
    info.cpu_s = sum(c for t in timings.values() for _, c in t.values())
    info.load = [round(x, 2) for x in os.getloadavg()]
    write_csv(rows, out / "study.csv")
    diffs = paired_differences(rows)
    plot = None
    if rows:
        plot_study(rows, arms, out / "study", f"{info.task}: Dice against labelled volumes")
        plot = "study.png"
    write_markdown(rows, diffs, info, arms, out / "study.md", plot)
    return rows


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
             overrides) -> tuple[dict, _Plan]:
    """Check the arguments, resolve every arm's config and count the training cases (nothing is written)."""
    from sslkit.config import read_recipe
    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.downstream.data import list_cases
    from sslkit.downstream.evaluate import class_names

    for name in encoders:
        _check_name(name)
    if not encoders and not scratch:
        raise ConfigError("study: nothing to compare; give --encoder NAME=PATH (and --scratch)")
    if not budgets or not seeds or min(budgets) < 1 or min(seeds) < 0:
        raise ConfigError("study: --budgets needs integers >= 1 and --seeds integers >= 0")
    budgets, seeds = sorted(set(budgets)), list(dict.fromkeys(seeds))
    # absolute paths: a cell's config (model.init_from, data.root) means the same from any working directory
    encoders = {n: str(Path(p).expanduser().resolve()) for n, p in encoders.items()}
    raw = read_recipe(recipe_path, list(overrides))
    root = raw.get("data", {}).get("root")
    if root:  # the cells' configs name the data wherever the study is later read from
        set_key(raw, "data.root", str(Path(root).expanduser().resolve()))
    arms = _resolve_arms(raw, encoders, scratch)
    n_train = _training_case_count(arms[0].config)
    if max(budgets) > n_train:
        raise ConfigError(f"--budgets: {max(budgets)} labelled cases asked for, the recipe's training set "
                          f"({raw.get('data', {}).get('root')}) has {n_train}")
    base = downstream_config_from_dict(arms[0].config)
    info = StudyInfo(str(recipe_path), list(overrides), dict(encoders), scratch, budgets, seeds,
                     base.data.task or base.data.layout, n_train, len(list_cases(base.data)[1]), class_names(base))
    return raw, _Plan(arms, study_grid(list(encoders), scratch, budgets, seeds), n_train, info, encoders)


def _run_cells(plan: _Plan, cells: list[Cell], out: Path, recipe_path, progress: bool,
               keep_checkpoints: bool) -> str | None:
    """Run `cells` one after the other (finished ones are only checked); the signal that stopped one, or None."""
    by_name = {a.name: a for a in plan.arms}
    for cell in cells:
        if cell_state(out / cell.name) != "done":
            print(f"study: cell {plan.cells.index(cell) + 1}/{len(plan.cells)}", flush=True)
        stopped = run_cell(by_name[cell.encoder], cell, out, plan.n_train, recipe_path, progress, keep_checkpoints)
        if stopped:
            return stopped
    return None


def _done(out: Path, cells: list[Cell]) -> set[str]:
    return {c.name for c in cells if cell_state(out / c.name) == "done"}


def run_study(recipe_path: str | Path, encoders: dict[str, str], scratch: bool, budgets: list[int],
              seeds: list[int], out: str | Path, overrides=(), progress: bool = True, jobs: int = 1,
              keep_checkpoints: bool = False, shard: tuple[int, int] | None = None) -> StudyResult:
    """Fine-tune and evaluate every (encoder, budget, seed) cell under `out`, skipping finished cells, then write
    study.csv / study.md / study.png / study.svg. `encoders`: {name: encoder path (run directory, checkpoint or
    .safetensors)}; `scratch`: add the from-scratch baseline (the first encoder's plan, random weights).

    `jobs` > 1 runs the cells in that many worker processes (`python -m sslkit study ... --shard i/jobs`,
    cell k in worker k mod jobs), each with train.threads = max(1, threads // jobs); small 3-D models use two
    single-threaded processes better than one process with two threads. SIGINT / SIGTERM / SIGUSR1 reach every
    worker: each stops after its current step with a checkpoint. `shard` = (i, n): run only cells k with
    k mod n == i and write no report (what a worker does)."""
    out = Path(out)
    raw, plan = _prepare(recipe_path, encoders, scratch, budgets, seeds, overrides)
    before = _done(out, plan.cells)
    if shard is not None:
        i, n = shard
        stopped = _run_cells(plan, plan.cells[i::n], out, recipe_path, progress, keep_checkpoints)
        return StudyResult(out, [], [], stopped, len(plan.cells), len(_done(out, plan.cells) - before))
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, recipe_path, overrides, plan.arms)
    if jobs > 1:
        threads = raw.get("train", {}).get("threads") or os.cpu_count() or 1
        cmd = _worker_command(recipe_path, plan.encoders, scratch, plan.info.budgets, plan.info.seeds, out,
                              list(overrides) + [f"train.threads={max(1, threads // jobs)}"])
        stopped = _run_workers(cmd + (["--keep-checkpoints"] if keep_checkpoints else []), jobs)
    else:
        stopped = _run_cells(plan, plan.cells, out, recipe_path, progress, keep_checkpoints)
    rows = write_reports(out, plan.cells, [a.name for a in plan.arms], plan.info)
    return StudyResult(out, rows, paired_differences(rows), stopped, len(plan.cells),
                       len(_done(out, plan.cells) - before))


def _worker_command(recipe_path, encoders, scratch, budgets, seeds, out, overrides) -> list[str]:
    cmd = [sys.executable, "-m", "sslkit", "study", "--cfg", str(recipe_path), "--out", str(out),
           "--budgets", ",".join(map(str, budgets)), "--seeds", ",".join(map(str, seeds)), "--no-progress"]
    for name, path in encoders.items():
        cmd += ["--encoder", f"{name}={path}"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--scratch"] if scratch else [])


def _run_workers(cmd: list[str], jobs: int) -> str | None:
    """Start `jobs` shard workers, pass stop signals on to them, wait; the signal that stopped them, or None.
    Workers get their own process group, so a terminal's Ctrl-C reaches them once (through this process), as
    the first SIGINT of a single-process run does."""
    import signal
    import subprocess

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


# ------------------------------------------------------------------------------------------------ command line


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """`sslkit study ...` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "study", help="label-efficiency study: fine-tune every (encoder, budget, seed), tables, intervals, plot",
        description="Fine-tune every (encoder, labelled budget, seed) cell with one downstream recipe, evaluate "
                    "each, and write DIR/study.md, study.csv, study.png and study.svg. Resumable: run the same "
                    "command again to skip finished cells and continue stopped ones.")
    _add_study_options(p)
    p.set_defaults(func=cmd_study)
    return p


def _add_study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", required=True, help="downstream YAML recipe, e.g. downstream/demo_study.yaml")
    p.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained encoder to study: NAME (its folder and label) = a pretraining run directory, "
                        "checkpoint or .safetensors file (repeatable; the first one's plan also defines scratch)")
    p.add_argument("--scratch", action="store_true",
                   help="add the from-scratch baseline: the first encoder's architecture and preprocessing from "
                        "random weights (or the recipe's model without --encoder)")
    p.add_argument("--budgets", required=True, metavar="N,N,...",
                   help="labelled training cases per cell (data.num_labelled), e.g. 1,3,5; nested per seed")
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...",
                   help="seeds (data.split_seed and train.seed of a cell; default 0,1,2)")
    p.add_argument("--out", required=True, help="output folder: one run directory per cell and the report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key for every cell, e.g. --set train.max_steps=60 (repeatable)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="cells run in N worker processes at once, each with train.threads // N threads "
                        "(default 1; 2 on a 2-core machine finishes sooner)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each evaluated cell's checkpoints/ (by default only its best model and reports stay)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (metrics.jsonl is still written)")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # I/N: what a --jobs worker runs


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, n = (int(v) for v in text.split("/"))
    return i, n


def cmd_study(a) -> int:
    if a.jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {a.jobs}")
    res = run_study(a.cfg, parse_encoders(a.encoder), a.scratch, parse_int_list(a.budgets, "--budgets"),
                    parse_int_list(a.seeds, "--seeds"), a.out, a.overrides, progress=not a.no_progress,
                    jobs=a.jobs, keep_checkpoints=a.keep_checkpoints, shard=_shard(a.shard))
    if res.stopped_by_signal:
        if a.shard is None:
            print(f"sslkit: study stopped by {res.stopped_by_signal}; the finished cells are in "
                  f"{res.out / 'study.md'}; run the same command again to continue", file=sys.stderr, flush=True)
        return R.EXIT_PREEMPTED
    if a.shard is None:
        print(f"{len(res.rows)}/{res.cells} cells evaluated; wrote {res.out / 'study.md'}, {res.out / 'study.csv'}, "
              f"{res.out / 'study.png'}, {res.out / 'study.svg'}")
    return 0
