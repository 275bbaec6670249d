"""`sslkit` command line. Argument parsing only: each sub-command calls one function of a package.

User errors (bad file, bad config key, missing path) print one line `sslkit: error: ...` and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sslkit.errors import UserError


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining from a YAML recipe",
                       description="Pretrain an encoder. Runs as one process, or under torchrun for several.")
    p.add_argument("--cfg", required=True, help="YAML recipe, e.g. pretrain_configs/demo_ct_byol.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<recipe name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint (auto) or a checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(a) -> int:
    from sslkit.config import load_config

    cfg = load_config(a.cfg, a.overrides)
    run_dir = Path(a.run_dir) if a.run_dir else Path("runs") / Path(a.cfg).stem
    from sslkit.engine.trainer import pretrain

    res = pretrain(cfg, run_dir, resume=a.resume, progress=not a.no_progress)
    if _is_rank0():
        state = "stopped by an alarm" if res.stopped_by_alarm else "done"
        print(f"{state}: {res.steps} steps, run directory {res.run_dir}")
    return 3 if res.stopped_by_alarm else 0


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the student encoder of a run as safetensors")
    p.add_argument("--run-dir", required=True, help="a pretraining run directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest)")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    from sslkit.engine.export import export_from_run

    out, n = export_from_run(Path(a.run_dir), Path(a.out), a.checkpoint)
    print(f"wrote {out} ({n} tensors)")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="demo corpus and datalists")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("demo", help="build the demo corpus of real scans (no network needed)")
    d.add_argument("--out", default="demo_data", help="output folder (default demo_data)")
    d.set_defaults(func=cmd_data_demo)
    i = dsub.add_parser("index", help="find NIfTI / NRRD / MHA files and DICOM series under ROOT")
    i.add_argument("root")
    i.add_argument("--out", required=True, help="datalist JSON to write")
    i.set_defaults(func=cmd_data_index)


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
    items = index_folder(root)
    out = Path(a.out)
    write_datalist(items, out, out.parent)
    print(f"{len(items)} scans -> {out}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and the DeepSpeed accelerator")
    p.set_defaults(func=cmd_info)


def cmd_info(a) -> int:
    from sslkit.engine.info import environment_report

    print(environment_report())
    return 0


def _add_monitor(sub) -> None:
    p = sub.add_parser("dashboard", help="live collapse-monitoring dashboard for one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--html", default=None, help="write one self-contained HTML file instead of serving")
    p.set_defaults(func=cmd_dashboard)
    q = sub.add_parser("probe", help="collapse statistics of a checkpoint on the run's fixed probe crops")
    q.add_argument("checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    q.add_argument("--crops", type=int, default=None, help="number of probe crops (default: the run's)")
    q.set_defaults(func=cmd_probe)


def cmd_dashboard(a) -> int:
    from sslkit.monitor.dashboard import dashboard_main

    dashboard_main([Path(r) for r in a.run_dirs], port=a.port, html_out=a.html, host=a.host)
    return 0


def cmd_probe(a) -> int:
    import json

    from sslkit.engine.export import probe_checkpoint

    print(json.dumps(probe_checkpoint(Path(a.checkpoint), a.crops), indent=1))
    return 0


def _add_downstream(sub) -> None:
    p = sub.add_parser("finetune", help="segmentation fine-tuning from a downstream recipe")
    p.add_argument("--cfg", required=True)
    p.add_argument("--encoder", default=None, help="encoder.safetensors or a pretraining run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", nargs="?", const="auto", default=None)
    p.set_defaults(func=cmd_finetune)
    e = sub.add_parser("evaluate", help="per-case, per-class Dice / HD95 / surface distance of a run")
    e.add_argument("run_dir")
    e.add_argument("--ckpt", default=None, help="checkpoint to evaluate (default: the run's best)")
    e.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N validation cases")
    e.set_defaults(func=cmd_evaluate)
    c = sub.add_parser("compare", help="several evaluated runs side by side")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default=None, help="Markdown file to write (default comparison.md)")
    c.set_defaults(func=cmd_compare)
    r = sub.add_parser("predict", help="label maps for new scans in their original geometry")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--input", required=True, help="a scan, a DICOM series folder or a folder of scans")
    r.add_argument("--output", required=True)
    r.set_defaults(func=cmd_predict)


def cmd_finetune(a) -> int:
    from sslkit.downstream.config import load_downstream_config
    from sslkit.downstream.train import finetune

    cfg = load_downstream_config(a.cfg, a.overrides)
    run_dir = Path(a.run_dir) if a.run_dir else Path("runs") / Path(a.cfg).stem
    out = finetune(cfg, run_dir, encoder_path=a.encoder, resume=a.resume)
    print(f"best mean Dice {out['best_dice']:.4f} at step {out['best_step']}, run directory {out['run_dir']}")
    return 0


def cmd_evaluate(a) -> int:
    from sslkit.downstream.evaluate import evaluate

    res = evaluate(Path(a.run_dir), ckpt=a.ckpt, max_cases=a.max_cases)
    print(f"mean Dice {res.get('mean_dice', float('nan')):.4f}; reports in {Path(a.run_dir) / 'eval'}")
    return 0


def cmd_compare(a) -> int:
    from sslkit.downstream.evaluate import compare

    out = compare([Path(r) for r in a.run_dirs], Path(a.out) if a.out else Path("comparison.md"))
    print(Path(out).read_text(encoding="utf-8"))
    return 0


def cmd_predict(a) -> int:
    from sslkit.downstream.predict import predict

    for path in predict(a.ckpt, a.input, a.output):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_pretrain, _add_export, _add_data, _add_info, _add_monitor, _add_downstream):
        add(sub)
    return parser


def _version() -> str:
    from sslkit import __version__

    return f"sslkit {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"sslkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
