"""The study's report: study.csv (one row per evaluated cell), study.md (tables, paired differences, mean ranks, the
encoders' task-probe Dice and pretraining cost, whether the probe ranked the arms as fine-tuning did, time) and the
plot (study.png / study.svg)."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslkit import run as R
from sslkit.downstream.study.grid import SCRATCH, Cell, cell_state
from sslkit.downstream.study.stats import (
    PairedDifference,
    ProbeAgreement,
    mean_ranks,
    mean_std,
    paired_differences,
    probe_agreement,
)

TIMINGS_FILE = "timings.jsonl"
_TIME_KEYS = ("train_wall_s", "eval_wall_s", "cpu_s")


# ------------------------------------------------------------------------------------------------ the encoders


def encoder_facts(weights: Path | None) -> dict:
    """What the study says of an encoder beside its fine-tuned Dice: its task-probe Dice (the last probe up to the
    checkpoint it comes from), the random-init reference of that probe, and its pretraining cost (wall seconds,
    optimizer steps, device). Missing figures are None (an encoder from another tool, a run without a probe)."""
    from sslkit.monitor.task_probe import probe_record
    from sslkit.plan import read_plan

    facts = {"probe_dice": None, "probe_step": None, "probe_random": None, "pretrain_s": None, "steps": None,
             "device": None}
    if weights is None:
        return facts
    weights = Path(weights)
    run_dir, upto = weights.parent, None
    if weights.name == "student.safetensors":                 # a checkpoint of a run: RUN/checkpoints/step_X
        run_dir, upto = weights.parent.parent.parent, R.checkpoint_step(weights.parent)
    try:
        plan = read_plan(weights)
    except Exception:  # noqa: BLE001 - weights from another tool: no plan, no figures
        plan = {}
    record = probe_record(run_dir, upto).get("task_probe") or plan.get("task_probe") or {}
    last = record.get("last") or {}
    facts.update(probe_dice=last.get("dice_mean"), probe_step=last.get("step"),
                 probe_random=(record.get("references") or {}).get("random"),
                 device=(plan.get("source") or {}).get("device"))
    rows = [r for r in R.read_jsonl(run_dir / "metrics.jsonl") if "time" in r and (upto is None or r["step"] <= upto)]
    if rows:
        facts.update(pretrain_s=float(rows[-1]["time"]), steps=int(rows[-1]["step"]))
    return facts


# ------------------------------------------------------------------------------------------------ rows


def _number(v) -> float:
    """A metrics.json value as a float (jsonable wrote nan as null, inf as "inf")."""
    return math.nan if v is None else float(v)


def cell_row(out: Path, cell: Cell, names: list[str], timings: dict) -> dict:
    """One study.csv row from an evaluated cell."""
    import yaml

    run_dir = out / cell.name
    m = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))["summary"]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    row = {"encoder": cell.encoder, "budget": cell.budget, "seed": cell.seed, "mean_dice": _number(m["mean_dice"])}
    row.update({f"dice_{n}": _number(m["per_class"].get(n, {}).get("dice")) for n in names})
    row["mean_hd95"] = _number(m["mean_hd95"])
    row.update({f"hd95_{n}": _number(m["per_class"].get(n, {}).get("hd95")) for n in names})
    row["mean_nsd"] = _number(m.get("mean_nsd"))
    row.update({f"nsd_{n}": _number(m["per_class"].get(n, {}).get("nsd")) for n in names})
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
                w.writerow({k: (_fmt(v) if isinstance(v, float) and k not in _TIME_KEYS else v) for k, v in r.items()})


# ------------------------------------------------------------------------------------------------ study.md


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
    schedules: dict[str, list[str]] = field(default_factory=dict)
    facts: dict[str, dict] = field(default_factory=dict)   # encoder name -> encoder_facts(); scratch included
    wall_s: float = 0.0
    cpu_s: float = 0.0
    load: list[float] = field(default_factory=list)


def arm_probe(arm: str, facts: dict[str, dict]) -> float | None:
    """The task-probe Dice an arm starts from: its encoder's (ENCODER+SCHEDULE shares ENCODER's); scratch: the
    random-init reference of the first encoder with a probe."""
    if arm == SCRATCH:
        return next((f["probe_random"] for f in facts.values() if f.get("probe_random") is not None), None)
    return facts.get(arm.split("+")[0], {}).get("probe_dice")


def arm_probe_gain(arm: str, facts: dict[str, dict]) -> float | None:
    """What pretraining added to the task probe: the arm's probe Dice minus its own encoder's random-init line
    (scratch: 0). Encoders with other plans (crop, spacing) probe at other levels, a random one included, so their
    raw probe Dice do not rank them; the gain does."""
    probe = arm_probe(arm, facts)
    random = probe if arm == SCRATCH else facts.get(arm.split("+")[0], {}).get("probe_random")
    return None if probe is None or random is None else probe - random


def summary_table(rows: list[dict], names: list[str], arms: list[str], facts: dict[str, dict]) -> list[str]:
    """Per budget and arm: mean ± std over seeds of mean Dice, each class's Dice, mean NSD and mean HD95, beside the
    task-probe Dice the arm starts from."""
    head = ["budget", "arm", "seeds", "mean Dice"] + [f"{n} Dice" for n in names] + \
        ["mean NSD", "mean HD95 (mm)", "task-probe Dice"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in sorted({r["budget"] for r in rows}):
        for a in arms:
            rs = [r for r in rows if r["budget"] == b and r["encoder"] == a]
            if not rs:
                continue
            probe = arm_probe(a, facts)
            cells = [str(b), a, str(len(rs)), _pm([r["mean_dice"] for r in rs])]
            cells += [_pm([r[f"dice_{n}"] for r in rs]) for n in names]
            cells += [_pm([r["mean_nsd"] for r in rs]), _pm([r["mean_hd95"] for r in rs], 2),
                      _fmt(probe) if probe is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def differences_section(diffs: list[PairedDifference], unit: str) -> list[str]:
    if not diffs:
        return ["No paired differences yet: they need finished scratch and encoder cells of the same budget and "
                "seed."]
    lv = f"{diffs[0].level:.0%}"
    lines = [f"| budget | arm | seeds | mean difference | {lv} bootstrap interval | per seed | verdict |",
             "|---|---|---|---|---|---|---|"]
    for d in diffs:
        per = ", ".join(f"s{s}: {x:+.4f}" for s, x in zip(d.seeds, d.diffs))
        verdict = "one seed" if len(d.diffs) < 2 else ("within noise" if d.within_noise else "beyond noise")
        lines.append(f"| {d.budget} | {d.encoder} | {len(d.diffs)} | {d.mean:+.4f} | "
                     f"[{d.ci[0]:+.4f}, {d.ci[1]:+.4f}] | {per} | {verdict} |")
    return lines + [""] + [f"- {d.sentence(unit)}" for d in diffs]


def encoders_section(arms: list[str], ranks: dict[str, float], facts: dict[str, dict]) -> list[str]:
    """Per arm: mean rank over budgets, the task-probe Dice it starts from, and its encoder's pretraining cost."""
    lines = ["| arm | mean rank over budgets | task-probe Dice (step) | pretraining wall time | steps | device |",
             "|---|---|---|---|---|---|"]
    for a in arms:
        f = facts.get(a.split("+")[0], {}) if a != SCRATCH else {}
        probe = arm_probe(a, facts)
        step = f.get("probe_step") if a != SCRATCH else 0
        wall = f"{f['pretrain_s'] / 60:.1f} min" if f.get("pretrain_s") is not None else ("none" if a == SCRATCH else "?")
        lines.append(f"| {a} | {_fmt(ranks.get(a, math.nan), 2)} | "
                     f"{(_fmt(probe) + f' ({step})') if probe is not None else '-'} | {wall} | "
                     f"{f.get('steps') if f.get('steps') is not None else '-'} | {f.get('device') or '-'} |")
    return lines


def agreement_section(agree: ProbeAgreement | None) -> list[str]:
    if agree is None:
        return ["The probe's ranking is compared with fine-tuning's once at least three arms (scratch counts, with "
                "the random-init probe) have a task-probe figure and finished cells at one budget."]
    per = ", ".join(f"{b} labelled: {v:+.2f}" for b, v in agree.per_budget.items())
    verdict = ("the probe ranked the arms as fine-tuning did" if agree.mean >= 0.99 else
               "the probe's ranking mostly agreed with fine-tuning's" if agree.mean > 0 else
               "the probe's ranking did not agree with fine-tuning's")
    return [f"Spearman's rank correlation between each arm's task-probe gain (its probe Dice minus its own "
            "encoder's random-init probe, scratch 0: encoders with other crops or spacings probe at other levels) "
            f"and its fine-tuned mean Dice, over "
            f"{len(agree.arms)} arms ({', '.join(agree.arms)}): {per}; mean {agree.mean:+.2f}: {verdict}. With few "
            "arms the correlation takes few values (three arms: -1, -0.5, +0.5, +1): read it as agreement of "
            "orderings, not as a precise statistic."]


def write_markdown(rows: list[dict], diffs: list[PairedDifference], info: StudyInfo, arms: list[str],
                   path: Path, plot_name: str | None) -> None:
    enc = ", ".join(f"`{n}` = `{p}`" for n, p in info.encoders.items()) or "none"
    sets = " ".join(f"`--set {o}`" for o in info.overrides)
    scratch = (f"`{SCRATCH}`: the architecture and preprocessing of `{next(iter(info.encoders), '')}`'s plan "
               "from random weights" if info.scratch and info.encoders else
               f"`{SCRATCH}`: the recipe's model from random weights" if info.scratch else "no scratch baseline")
    sched = ("; transfer schedules " + ", ".join(f"`{n}` ({', '.join(s) or 'the recipe as it is'})"
                                                for n, s in info.schedules.items()) + " (arm ENCODER+SCHEDULE)"
             if info.schedules else "")
    lines = [f"# Label-efficiency study: {info.task}", "",
             f"Recipe `{info.recipe}`{(' with ' + sets) if sets else ''}; encoders {enc}; {scratch}{sched}.",
             f"Budgets (labelled training cases) {', '.join(map(str, info.budgets))} of {info.n_train}; seeds "
             f"{', '.join(map(str, info.seeds))}. Each cell sets data.num_labelled = budget, data.split_seed = "
             "train.seed = seed: the cases of one seed are nested across budgets and the same for every encoder. "
             f"Every cell is evaluated on the same {info.n_val} validation case{'s' if info.n_val != 1 else ''}.",
             "", "## Dice, NSD and HD95 on the validation set (mean ± sample std over seeds)", ""]
    lines += summary_table(rows, info.class_names, arms, info.facts)
    lines += ["", "HD95 is averaged over the classes found (a missed class has no finite distance). NSD is the "
              "normalised surface Dice at the recipe's data.nsd_tolerance_mm. The task-probe Dice is the encoder's "
              "last task probe before fine-tuning (scratch: the probe of the randomly initialised encoder).", "",
              "## Paired difference to scratch (mean Dice; same seed, same labelled cases)", "",
              "Percentile bootstrap of the mean seed-paired difference (scipy.stats.bootstrap, 10,000 resamples, "
              "seeded). With 3 or fewer seeds the 95 % interval is the range of the per-seed differences, so "
              "'beyond noise' means every seed moved the same way.", ""]
    lines += differences_section(diffs, "labelled")
    lines += ["", "## Arms: mean rank, task probe, pretraining cost", ""]
    lines += encoders_section(arms, mean_ranks(rows), info.facts)
    lines += ["", "## Did the task probe rank the arms as fine-tuning did?", ""]
    lines += agreement_section(probe_agreement(rows, {a: arm_probe_gain(a, info.facts) for a in arms}))
    if plot_name:
        lines += ["", "## Plot", "", f"![Dice against labelled volumes]({plot_name})"]
    lines += ["", "## Time", "",
              f"{len(rows)} evaluated cells; fine-tuning + evaluation of all cells: {info.wall_s:.0f} s wall, "
              f"{info.cpu_s:.0f} s CPU (summed over the cells' logged phases; load average at the end of this run "
              f"{', '.join(f'{x:.2f}' for x in info.load)})."]
    R.atomic_write_text(path, "\n".join(lines) + "\n")


def plot_study(rows: list[dict], arms: list[str], stem: Path, title: str) -> list[Path]:
    """study.png + study.svg: mean Dice (mean over seeds, shaded mean ± std, one dot per seed) against labelled
    volumes, one line per arm. matplotlib with the Agg backend (no display needed)."""
    from sslkit.errors import UserError

    try:
        import matplotlib
    except ImportError:
        raise UserError("study plots need matplotlib: pip install 'sslkit[plots]'") from None
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
