"""The grid of a study: arms (scratch, encoders, encoders under transfer schedules), budgets, seeds, and each cell's
recipe; the study folder's manifest and the state of each cell."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sslkit import run as R
from sslkit.errors import ConfigError, UserError

SCRATCH = "scratch"
STUDY_FILE = "study.json"
CELL_KEYS = ("data.num_labelled", "data.split_seed", "train.seed")
# keys a finished cell may differ in from the current recipe: where and how fast it ran, not what it computed
RUN_ONLY_KEYS = ("train.threads", "train.device", "train.num_workers", "train.worker_nice", "logging")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Cell:
    """One fine-tune of the grid; `encoder` is an arm name (an encoder, SCRATCH, or encoder+schedule)."""
    encoder: str
    budget: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.encoder}/b{self.budget}_s{self.seed}"


def study_grid(arms: list[str], scratch: bool, budgets: list[int], seeds: list[int]) -> list[Cell]:
    """Cells in run order: budget, then seed, then scratch and the arms, so a study stopped early already holds
    complete seed-paired comparisons at the small budgets."""
    names = ([SCRATCH] if scratch else []) + list(arms)
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


# ------------------------------------------------------------------------------------------------ arguments


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5]: distinct non-negative integers, in the order given."""
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, e.g. 1,3,5; got {text!r}") from None
    if not vals or len(set(vals)) != len(vals) or min(vals) < 0:
        raise ConfigError(f"{what}: expected distinct non-negative integers, got {text!r}")
    return vals


def check_name(name: str, what: str = "--encoder") -> None:
    if not _NAME.match(name) or name == SCRATCH:
        raise ConfigError(f"{what} {name!r}: a name is letters, digits, '_', '.', '-' and not '{SCRATCH}'")


def parse_encoders(items: list[str]) -> dict[str, str]:
    """['byol=runs/a', 'mg=runs/b@best-probe'] -> {'byol': 'runs/a', ...} (names become folder names)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--encoder {item!r}: expected NAME=PATH, e.g. byol=runs/demo_ct_byol")
        check_name(name)
        if name in out:
            raise ConfigError(f"--encoder {name}: given twice")
        out[name] = path
    return out


def parse_schedules(items: list[str]) -> dict[str, list[str]]:
    """['frozen20=adapt.warmup_frozen_steps=20', 'ld=optim.layer_decay=0.75,adapt.encoder_lr_scale=0.5'] ->
    {name: [--set assignments]}: the transfer schedules every pretrained encoder is fine-tuned with."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, sets = item.partition("=")
        if not sep:
            raise ConfigError(f"--schedule {item!r}: expected NAME=KEY=VALUE[,KEY=VALUE], e.g. "
                              "frozen20=adapt.warmup_frozen_steps=20 (NAME= for the recipe as it is)")
        check_name(name, "--schedule")
        if name in out:
            raise ConfigError(f"--schedule {name}: given twice")
        assignments = [s.strip() for s in sets.split(",") if s.strip()]
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--schedule {name}: {a!r} is not KEY=VALUE")
        out[name] = assignments
    return out


# ------------------------------------------------------------------------------------------------ arms


@dataclass
class Arm:
    """One line of the study: scratch or an encoder (under a transfer schedule) with its resolved config."""
    name: str
    encoder_path: str | None     # what finetune gets as encoder_path (scratch: the plan it follows)
    scratch: bool
    config: dict                 # the resolved config (plan filled in) before the cell keys
    weights: Path | None = None  # the encoder's weights file (None for scratch)
    encoder: str = ""            # the encoder's name (the arm without its schedule)
    schedule: str = ""           # the transfer schedule's name ("" without --schedule)


def resolve_arms(raw: dict, encoders: dict[str, str], scratch: bool,
                 schedules: dict[str, list[str]] | None = None) -> list[Arm]:
    """Each arm's resolved config. Scratch follows the first encoder's plan with random weights (or, with no
    encoder, the model the recipe names); with schedules every encoder gives one arm per schedule, named
    ENCODER+SCHEDULE (scratch trains with the recipe as it is)."""
    from sslkit.config import apply_override
    from sslkit.downstream.train import resolve_recipe

    arms = []
    first = next(iter(encoders.values()), None)
    if scratch:
        cfg, _, _ = resolve_recipe(raw, first)
        cfg.model.init_from = ""
        if not cfg.model.name:
            raise ConfigError("model.name: a scratch-only study needs a recipe that names the model "
                              "(or give --encoder NAME=PATH: scratch then follows its plan)")
        arms.append(Arm(SCRATCH, first, bool(first), cfg.to_dict(), encoder=SCRATCH))
    for name, path in encoders.items():
        for sched, sets in (schedules or {"": []}).items():
            arm_raw = json.loads(json.dumps(raw))
            for s in sets:
                apply_override(arm_raw, s)
            cfg, _, enc_file = resolve_recipe(arm_raw, path)
            label = f"{name}+{sched}" if sched else name
            arms.append(Arm(label, path, False, cfg.to_dict(), Path(enc_file), name, sched))
    return arms


def training_case_count(config: dict) -> int:
    from sslkit.downstream.config import downstream_config_from_dict
    from sslkit.downstream.data import list_cases

    base = json.loads(json.dumps(config))
    set_key(base, "data.num_labelled", 0)
    return len(list_cases(downstream_config_from_dict(base).data)[0])


def check_manifest(out: Path, recipe_path, overrides, arms: list[Arm]) -> dict:
    """study.json of this study; a later run into the same folder must use the same encoder weights."""
    path = out / STUDY_FILE
    now = {"recipe": str(recipe_path), "overrides": list(overrides),
           "encoders": {a.encoder: {"path": str(a.weights), "blake2b": R.file_digest(a.weights)}
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


def cell_state(run_dir: Path) -> str:
    """'done' (trained and evaluated), 'trained' (summary, no evaluation) or 'todo' (new, or stopped mid-run)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return "todo"
    if json.loads(summary.read_text(encoding="utf-8")).get("stopped_by_signal"):
        return "todo"
    return "done" if (run_dir / "eval" / "metrics.json").is_file() else "trained"


def check_not_stale(run_dir: Path, expected: dict) -> None:
    import yaml

    used = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    changed = R.config_changes(used, expected, ignore=RUN_ONLY_KEYS)
    if changed:
        raise UserError(f"{run_dir}: finished with another recipe ({R.changes_text(changed)} differ); use a new "
                        "--out, or delete that cell to train it again")
