"""`sslkit` command line. Argument parsing only: each sub-command calls one function of a package.

User errors (bad file, bad config key, missing path) print one line `sslkit: error: ...` and exit with 2.
A run stopped by SIGTERM / SIGUSR1 / SIGINT after writing its checkpoint exits with 75 (run it again with
`--resume auto`); a pretraining run stopped by a collapse alarm exits with 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sslkit.errors import UserError, disk_full_in, user_error_in


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining from a YAML recipe",
                       description="Pretrain an encoder. Runs as one process, or under torchrun for several.")
    p.add_argument("--cfg", default=None, help="YAML recipe, e.g. pretrain_configs/demo_ct_byol.yaml (with "
                                               "--resume it may be left out: the run's own config.yaml is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<recipe name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest valid checkpoint (auto) or a checkpoint directory; "
                        "`--run-dir RUN --resume auto` alone continues RUN with its own recipe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.set_defaults(func=cmd_pretrain)


def _run_dir(a) -> Path:
    """--run-dir, else runs/<recipe name>; without either there is nothing to name the run by."""
    if a.run_dir:
        return Path(a.run_dir)
    if a.cfg:
        return Path("runs") / Path(a.cfg).stem
    raise UserError("--cfg: needed (or --run-dir RUN --resume auto to continue a run with its own recipe)")


def _own_config(a, run_dir: Path) -> Path:
    """The config.yaml a resumed run was started with, when --cfg is left out (UserError otherwise)."""
    if not a.resume:
        raise UserError("--cfg: needed to start a run (only --resume may leave it out, to continue a run with the "
                        "config.yaml in its --run-dir)")
    own = run_dir / "config.yaml"
    if not own.is_file():
        raise UserError(f"{run_dir}: no config.yaml to resume from; give the recipe with --cfg")
    return own


def _recorded_source(run_dir: Path) -> tuple[str | None, dict]:
    """(recipe path, source) a run's plan recorded (what its first start was given), or (None, {})."""
    from sslkit.plan import read_plan

    try:
        plan = read_plan(run_dir)
    except UserError:
        return None, {}
    return (plan.get("recipe") or {}).get("path"), plan.get("source") or {}


def cmd_pretrain(a) -> int:
    from sslkit.config import load_config

    run_dir = _run_dir(a)
    recipe = a.cfg or _recorded_source(run_dir)[0]
    cfg = load_config(a.cfg or _own_config(a, run_dir), a.overrides)
    _check_datalist(cfg.data.datalist, "--set data.datalist=PATH")
    from sslkit.engine.trainer import pretrain

    res = pretrain(cfg, run_dir, resume=a.resume, progress=not a.no_progress, recipe=recipe)
    if not _is_rank0():
        return 75 if res.stopped_by_signal else (3 if res.stopped_by_alarm or res.stopped_by_nonfinite else 0)
    if res.stopped_by_signal:
        return _preempted(res.stopped_by_signal, res.steps, "pretrain", run_dir)
    if res.stopped_by_nonfinite:  # its one line, with the step and the checkpoint, is already on stderr
        print(f"stopped by a non-finite loss, gradient or weights (see the line above); run directory {res.run_dir}")
        return 3
    if res.stopped_by_alarm:
        print(f"stopped by an alarm at step {res.steps}; run directory {res.run_dir}")
        return 3
    from sslkit.monitor.task_probe import probe_summary

    probe = probe_summary(res.run_dir)
    if probe:
        print(probe)
    print(f"done: {res.steps} steps, run directory {res.run_dir}\n"
          f"  encoder + plan:  {res.run_dir / 'encoder.safetensors'}  (sslkit info {res.run_dir})\n"
          f"  dashboard:       sslkit dashboard {res.run_dir}\n"
          f"  export:          sslkit export --run-dir {res.run_dir} --out encoder.safetensors\n"
          f"  fine-tune:       sslkit finetune --cfg downstream/RECIPE.yaml --encoder {res.run_dir}")
    return 0


def _preempted(signal: str, steps: int, command: str, run_dir: Path) -> int:
    """The stop line: the command that continues the run (its recipe, overrides and encoder are the run's own)."""
    import shlex

    from sslkit.run import EXIT_PREEMPTED

    print(f"sslkit: stopped by {signal} at step {steps} after writing its checkpoint; continue with: "
          f"sslkit {command} --run-dir {shlex.quote(str(run_dir))} --resume auto", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def _check_datalist(path: str, how: str) -> None:
    """A missing datalist path says how to make one (before anything else happens)."""
    if not path:
        raise UserError(f"data.datalist: not set; point it at a datalist JSON or a folder of scans ({how})")
    p = Path(path).expanduser()
    if not p.exists():
        hint = " (build the demo corpus with `sslkit data demo`)" if "demo_data" in p.parts else ""
        raise UserError(f"data.datalist: {p} not found{hint}; or give another one with {how}")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's encoder (with its plan) for sslkit, MONAI, timm or Hugging Face, "
                                      "or a fine-tuned model as a MONAI bundle")
    p.add_argument("--run-dir", required=True,
                   help="a pretraining run directory (monai-bundle: a fine-tuning run, checkpoint or model file)")
    p.add_argument("--out", required=True, help="output file (a folder for --format hf)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the one --select picks)")
    p.add_argument("--select", default="last", choices=["last", "healthy", "best-probe"],
                   help="which checkpoint of the run: last (the newest valid one), healthy (the last one saved while "
                        "the collapse monitor raised no alarm) or best-probe (the best task-probe Dice)")
    p.add_argument("--format", default="sslkit",
                   choices=["sslkit", "monai", "monai_load_from", "timm", "hf", "monai-bundle"],
                   help="sslkit: safetensors + plan; monai: SwinUNETR swinViT.* state dict; monai_load_from: the "
                        "file SwinUNETR.load_from reads; timm: samvit_* state dict; hf: a folder with config.json, "
                        "model.safetensors and a model card (sslkit.from_pretrained loads it); monai-bundle: a "
                        "fine-tuned model as a MONAI bundle folder (python -m monai.bundle run)")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    if a.format == "monai-bundle":
        from sslkit.downstream.bundle import export_monai_bundle

        out = export_monai_bundle(a.checkpoint or a.run_dir, a.out)
        print(f"wrote {out}; run it: python -m monai.bundle run --config_file {out}/configs/inference.json "
              f"--meta_file {out}/configs/metadata.json --bundle_root {out} --dataset_dir SCANS --output_dir OUT")
        return 0
    from sslkit.engine.export import export_encoder_as

    paths = export_encoder_as(Path(a.run_dir), Path(a.out), a.format, a.checkpoint, select=a.select)
    print("wrote " + ", ".join(str(p) for p in paths) + (f"; its plan: sslkit info {paths[0]}"
                                                          if a.format in ("sslkit", "hf") else ""))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="demo corpus and datalists")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("demo", help="build the demo corpus of real scans (no network needed)")
    d.add_argument("--out", default="demo_data", help="output folder (default demo_data)")
    d.set_defaults(func=cmd_data_demo)
    i = dsub.add_parser("index", help="find NIfTI / NRRD / MHA files and DICOM series under ROOT, with each scan's "
                                      "modality; label maps and scans pretraining cannot read are left out")
    i.add_argument("root", help="folder to search (recursively)")
    i.add_argument("--out", required=True, help="datalist JSON to write")
    i.set_defaults(func=cmd_data_index)
    _add_data_prepare(dsub)


def _add_data_prepare(subparsers) -> None:
    """`sslkit data prepare` (sslkit.data.prepare)."""
    p = subparsers.add_parser(
        "prepare", help="preprocess a recipe's datalist into a store of compressed volumes (before pretraining)",
        description="Preprocess every scan of a recipe's datalist with the recipe's preprocessing (the same code "
                    "and settings as pretraining) into a store folder of compressed volumes; point pretraining at "
                    "it with --set data.cache_dir=STORE. Resumable: scans already in the store are skipped.")
    p.add_argument("--cfg", required=True, help="pretraining YAML recipe whose data section (datalist, spacing, "
                                                "intensity, roi, store_dtype) decides the preprocessing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set data.datalist=my.json (repeatable)")
    p.add_argument("--out", required=True, help="store folder to write (created if missing; shared by all parts)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, one thread each (default 1; use the cores you can spare)")
    p.add_argument("--part", type=int, default=0,
                   help="which part of the datalist this job prepares, 0..parts-1 (entry i goes to part i %% parts)")
    p.add_argument("--parts", type=int, default=1,
                   help="into how many parts the datalist is split, for several jobs or machines (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)


def cmd_data_prepare(a) -> int:
    from sslkit.config import load_config
    from sslkit.data.prepare import SKIPPED_NAME, check_part, prepare_store
    from sslkit.errors import DataError

    check_part(a.part, a.parts)
    if a.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {a.workers}")
    cfg = load_config(a.cfg, a.overrides)
    if not cfg.data.datalist:
        raise UserError("data.datalist: not set; give one with --set data.datalist=PATH")
    if not Path(cfg.data.datalist).expanduser().exists():
        raise UserError(f"data.datalist: {cfg.data.datalist} not found")
    report = prepare_store(cfg, a.out, workers=a.workers, part=a.part, parts=a.parts, progress=not a.no_progress)
    print(report.line())
    if report.prepared + report.already == 0 and report.entries:
        raise DataError(f"no usable scans among the {report.entries} entries of this part "
                        f"(see {Path(a.out) / SKIPPED_NAME})")
    return 0


def cmd_data_demo(a) -> int:
    from sslkit.data.demo import build_demo_corpus

    path = build_demo_corpus(Path(a.out))
    print(f"demo datalist: {path}")
    return 0


def cmd_data_index(a) -> int:
    from sslkit.data.datalist import index_folder, write_datalist

    root = Path(a.root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    left_out = []

    def warn(line: str) -> None:  # one line per problem folder; the index goes on
        print(f"sslkit: warning: {line}", file=sys.stderr, flush=True)
        if line.endswith("left out"):
            left_out.append(line)

    items = index_folder(root, warn=warn, inspect=True)
    out = Path(a.out)
    write_datalist(items, out, out.parent)
    kinds = ", ".join(f"{sum(e['modality'] == m for e in items)} {m}" for m in ("ct", "mri")
                      if any(e["modality"] == m for e in items))
    print(f"{len(items)} scans ({kinds or 'none'}) -> {out}"
          + (f" ({len(left_out)} left out, see the warnings above)" if left_out else ""))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="the plan of an encoder, checkpoint or run; without PATH: versions and devices")
    p.add_argument("path", nargs="?", default=None,
                   help="an encoder / model .safetensors file, a checkpoint directory or a run directory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(a) -> int:
    if a.path is None:
        from sslkit.engine.info import environment_report

        print(environment_report())
        return 0
    import json

    from sslkit.plan import format_plan, read_plan, weights_file

    plan = read_plan(a.path)
    print(json.dumps(plan, indent=1) if a.json else f"{weights_file(a.path)}\n{format_plan(plan)}")
    return 0


def _add_monitor(sub) -> None:
    p = sub.add_parser("dashboard", help="live collapse-monitoring dashboard for one or more runs")
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders of run directories")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                   "address exposes the page, which has no authentication)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header names NAME (e.g. a reverse proxy; repeatable)")
    p.add_argument("--html", default=None, help="write one self-contained HTML file instead of serving")
    p.set_defaults(func=cmd_dashboard)
    q = sub.add_parser("probe", help="collapse statistics of a checkpoint on the run's fixed probe crops")
    q.add_argument("checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    q.add_argument("--crops", type=int, default=None, help="number of probe crops (default: the run's)")
    q.set_defaults(func=cmd_probe)


def cmd_dashboard(a) -> int:
    from sslkit.monitor.dashboard import dashboard_main

    dashboard_main([Path(r) for r in a.run_dirs], port=a.port, html_out=a.html, host=a.host,
                   allowed_hosts=a.allow_host)
    return 0


def cmd_probe(a) -> int:
    import json

    from sslkit.engine.export import probe_checkpoint

    print(json.dumps(probe_checkpoint(Path(a.checkpoint), a.crops), indent=1))
    return 0


def _add_downstream(sub) -> None:
    p = sub.add_parser("finetune", help="segmentation fine-tuning from a downstream recipe")
    p.add_argument("--cfg", default=None, help="downstream YAML recipe, e.g. downstream/demo_mni_gm_wm.yaml (with "
                                               "--resume it may be left out: the run's own config.yaml is used)")
    p.add_argument("--encoder", default=None,
                   help="pretrained encoder: a pretraining run directory (RUN@best-probe, RUN@healthy: that "
                        "checkpoint of it), a checkpoint or a .safetensors file; the recipe's missing model / "
                        "preprocessing keys come from its plan")
    p.add_argument("--scratch", action="store_true",
                   help="with --encoder: its plan's model and preprocessing, random weights (the from-scratch baseline)")
    p.add_argument("--strict-plan", action="store_true",
                   help="refuse (exit 2) when the recipe differs from the encoder's plan, instead of a warning")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.max_steps=60 (repeatable)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<recipe name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest valid checkpoint (auto) or a checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.set_defaults(func=cmd_finetune)
    e = sub.add_parser("evaluate", help="per-case, per-class Dice / HD95 / surface distance of a fine-tuning run")
    e.add_argument("run_dir", help="a fine-tuning run directory")
    e.add_argument("--ckpt", default=None, help="a model.safetensors or checkpoint directory (default: the best)")
    e.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N validation cases")
    e.set_defaults(func=cmd_evaluate)
    c = sub.add_parser("compare", help="several evaluated runs side by side")
    c.add_argument("run_dirs", nargs="+", help="evaluated fine-tuning run directories")
    c.add_argument("--out", default=None, help="Markdown file to write (default comparison.md; a .csv beside it)")
    c.set_defaults(func=cmd_compare)
    r = sub.add_parser("predict", help="label maps for new scans in their original geometry")
    r.add_argument("--ckpt", required=True, help="a fine-tuning run directory, checkpoint or model.safetensors")
    r.add_argument("--input", required=True, help="a scan, a DICOM series folder or a folder of scans")
    r.add_argument("--output", required=True, help="folder for the <name>_seg.nii.gz label maps")
    r.set_defaults(func=cmd_predict)


def cmd_finetune(a) -> int:
    from sslkit.downstream.config import read_downstream_recipe
    from sslkit.downstream.train import finetune

    run_dir = _run_dir(a)
    recipe, encoder, scratch = a.cfg, a.encoder, a.scratch
    if not a.cfg:  # continue with the run's own recipe, encoder and --scratch choice
        own = _own_config(a, run_dir)
        recipe, source = _recorded_source(run_dir)
        if encoder is None and source.get("plan_from"):
            encoder, scratch = source["plan_from"], source.get("encoder") is None
        raw = read_downstream_recipe(own, a.overrides)
    else:
        raw = read_downstream_recipe(a.cfg, a.overrides)
    out = finetune(raw, run_dir, encoder_path=encoder, resume=a.resume, progress=not a.no_progress,
                   strict_plan=a.strict_plan, recipe_path=recipe, scratch=scratch)
    if out["stopped_by_signal"]:
        return _preempted(out["stopped_by_signal"], out["steps"], "finetune", run_dir)
    if out["stopped_by_nonfinite"]:
        return 3
    best = f"{out['best_dice']:.4f} at step {out['best_step']}" if out["best_dice"] is not None else "n/a"
    print(f"best mean Dice {best}, run directory {out['run_dir']}\n"
          f"  evaluate: sslkit evaluate {out['run_dir']}\n"
          f"  predict:  sslkit predict --ckpt {out['run_dir']} --input SCAN --output preds/")
    return 0


def cmd_evaluate(a) -> int:
    from sslkit.downstream.evaluate import evaluate

    res = evaluate(Path(a.run_dir), ckpt=a.ckpt, max_cases=a.max_cases)
    out = Path(a.run_dir) / "eval"
    print(f"mean Dice {res.get('mean_dice', float('nan')):.4f}; wrote {out / 'report.md'}, "
          f"{out / 'per_case.csv'}, {out / 'metrics.json'}\n"
          f"  next: sslkit compare OTHER_RUN {a.run_dir}   (side by side with another evaluated run, e.g. from "
          f"scratch)\n"
          f"        sslkit predict --ckpt {a.run_dir} --input SCAN --output preds/   (label maps for new scans)")
    return 0


def cmd_compare(a) -> int:
    from sslkit.downstream.evaluate import compare

    out = compare([Path(r) for r in a.run_dirs], Path(a.out) if a.out else Path("comparison.md"))
    print(Path(out).read_text(encoding="utf-8"))
    print(f"wrote {out} and {Path(out).with_suffix('.csv')}\n"
          "  one run per side says little: `sslkit study` repeats the comparison over seeds and labelled budgets "
          "and gives paired intervals (docs/study.md)")
    return 0


def cmd_predict(a) -> int:
    from sslkit.downstream.predict import predict

    for path in predict(a.ckpt, a.input, a.output):
        print(path)
    return 0


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="label-efficiency study: fine-tune every (encoder, budget, seed), tables, intervals, plot",
        description="Fine-tune every (encoder, labelled budget, seed) cell with one downstream recipe, evaluate "
                    "each, and write DIR/study.md, study.csv, study.png and study.svg. Resumable: run the same "
                    "command again to skip finished cells and continue stopped ones.")
    p.add_argument("--cfg", required=True, help="downstream YAML recipe, e.g. downstream/demo_study.yaml")
    p.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained encoder to study: NAME (its folder and label) = a pretraining run directory "
                        "(RUN@best-probe: its best task-probe checkpoint), checkpoint or .safetensors file "
                        "(repeatable; the first one's plan also defines scratch)")
    p.add_argument("--scratch", action="store_true",
                   help="add the from-scratch baseline: the first encoder's architecture and preprocessing from "
                        "random weights (or the recipe's model without --encoder)")
    p.add_argument("--schedule", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="a transfer schedule every encoder is fine-tuned with (arm ENCODER+NAME), e.g. "
                        "frozen20=adapt.warmup_frozen_steps=20 or ld=optim.layer_decay=0.75; NAME= keeps the "
                        "recipe as it is (repeatable)")
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
    p.set_defaults(func=cmd_study)


def cmd_study(a) -> int:
    from sslkit.downstream.study import parse_encoders, parse_int_list, parse_schedules, run_study
    from sslkit.errors import ConfigError
    from sslkit.run import EXIT_PREEMPTED

    if a.jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {a.jobs}")
    shard = tuple(int(v) for v in a.shard.split("/")) if a.shard else None
    res = run_study(a.cfg, parse_encoders(a.encoder), a.scratch, parse_int_list(a.budgets, "--budgets"),
                    parse_int_list(a.seeds, "--seeds"), a.out, a.overrides, progress=not a.no_progress,
                    jobs=a.jobs, keep_checkpoints=a.keep_checkpoints, shard=shard,
                    schedules=parse_schedules(a.schedule))
    if res.stopped_by_signal:
        if shard is None:
            print(f"sslkit: study stopped by {res.stopped_by_signal}; the finished cells are in "
                  f"{res.out / 'study.md'}; run the same command again to continue", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if shard is None:
        print(f"{len(res.rows)}/{res.cells} cells evaluated; wrote {res.out / 'study.md'}, {res.out / 'study.csv'}, "
              f"{res.out / 'study.png'}, {res.out / 'study.svg'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--verbose", action="store_true",
                        help="keep third-party start-up messages (DeepSpeed, torch extensions, pydicom)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_pretrain, _add_export, _add_data, _add_info, _add_monitor, _add_downstream, _add_study):
        add(sub)
    return parser


def _version() -> str:
    from sslkit import __version__

    return f"sslkit {__version__}"


def quiet_third_party() -> None:
    """Silence start-up chatter of libraries we import (DeepSpeed's accelerator and op messages, torch's
    CUDA_HOME notice, MONAI / nvImageCodec / pydicom warnings); errors still show. DeepSpeed resets its logger's
    level on import, so sslkit.engine.distributed lowers it again after importing it (SSLKIT_QUIET)."""
    import logging
    import warnings

    os.environ["SSLKIT_QUIET"] = "1"
    for name in ("DeepSpeed", "torch.utils.cpp_extension", "torch.distributed", "pydicom", "nvimgcodec", "monai"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(deepspeed|pydicom|nvidia|monai|torch\.distributed)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(nvImageCodec|nvimgcodec|TORCH_CUDA_ARCH_LIST|CUDA_HOME).*")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_third_party()
    try:
        return args.func(args)
    except UserError as e:
        print(f"sslkit: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - two kinds become one line, everything else is re-raised
        # MONAI wraps a transform's exception (e.g. a DataError) in RuntimeError
        user = user_error_in(e)
        if user is not None:
            print(f"sslkit: error: {user}", file=sys.stderr)
            return 2
        full = disk_full_in(e)
        if full is None:
            raise
        where = getattr(full, "filename", None) or Path.cwd()
        print(f"sslkit: error: {where}: disk full (No space left on device); free some space and run the same "
              "command again (with --resume auto for a training run)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
