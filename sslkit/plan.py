"""The plan: everything that decides what an encoder's input looks like, carried with its weights.

A plan is a JSON-able dict written by pretraining into every checkpoint and export (safetensors metadata under
`sslkit.plan`) and read by fine-tuning, predict, `sslkit info` and the exports to other formats:

    {"plan_version": 1, "sslkit_version": "0.2.0", "kind": "encoder" | "segmenter",
     "encoder": {"name": "swin_unetr", "args": {...}},          # builder options (not spatial_dims / in_channels)
     "spatial_dims": 3, "in_channels": 1, "slices": false,       # slices: a 2-D model on axial slices of volumes
     "axis_order": "CXYZ",                                       # channel first, then the RAS voxel axes
     "feature_channels": [...], "feature_strides": [[2, 2, 2], ...],
     "orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "modality": "ct",
     "intensity": {"ct": {"scheme": "window", "window": [-175, 250]},
                   "mri": {"scheme": "percentile", "percentiles": [0.5, 99.5]}},
     "crop_foreground": true, "crop_size": [48, 48, 48],
     "recipe": {"name": "demo_ct_byol", "path": "...", "sha256": "..."},
     "source": {"kind": "pretrain", "run_dir": "...", "step": 120},
     "corpus": {"scans": 3, "modalities": {"ct": 1, "mri": 2}},  # what these weights were trained on
     # segmenters (fine-tuned models) also carry ("corpus" is then the fine-tuning data: scans, modalities, task):
     "segmenter": {"name": "swin_unetr", "args": {...}, "num_classes": 3, "adapt": "full",
                   "label_names": ["background", ...]},                # one per class, background first
     "encoder_corpus": {...},                                   # the pretraining corpus of its encoder
     "input_stats": {...}}                                       # what the model saw (predict compares inputs)

This module sits below everything (like config.py): it knows dicts and files, not models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sslkit.errors import UserError

PLAN_KEY = "sslkit.plan"
ALIASES_KEY = "sslkit.aliases"  # {name: name it shares storage with}: one copy on disk, both names on reading
PLAN_VERSION = 1
WEIGHT_FILES = ("encoder.safetensors", "model.safetensors", "student.safetensors")
# Plan fields that decide what an input array means, with the recipe key each one corresponds to.
PREPROCESSING_KEYS = {"spatial_dims": "model.spatial_dims", "in_channels": "model.in_channels",
                      "slices": "data.slices", "orientation": "orientation", "spacing": "data.spacing",
                      "modality": "data.modality", "intensity": "data intensity",
                      "crop_foreground": "data.crop_foreground", "axis_order": "axis order"}


def _version() -> str:
    from sslkit.version import __version__

    return __version__


def recipe_record(path: str | Path | None) -> dict:
    """{"name", "path", "sha256"} of the recipe file a run came from ({} without one)."""
    if path is None:
        return {}
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return {"name": p.stem, "path": str(p), "sha256": digest}


def intensity_schemes(data_cfg) -> dict:
    """The one intensity scheme per modality of a data config (both loops share the keys)."""
    mri = {"scheme": data_cfg.mri_norm}
    if data_cfg.mri_norm == "percentile":
        mri["percentiles"] = [float(v) for v in data_cfg.mri_percentiles]
    return {"ct": {"scheme": "window", "window": [float(v) for v in data_cfg.intensity_range]}, "mri": mri}


def preprocessing_plan(data_cfg, spatial_dims: int, in_channels: int, slices: bool) -> dict:
    """The preprocessing part of a plan, from a data section (pretraining or downstream)."""
    return {
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
        "slices": bool(slices),
        "axis_order": "CXYZ" if (spatial_dims == 3 or slices) else "CXY",
        "orientation": "RAS",
        "spacing": [float(s) for s in data_cfg.spacing],
        "modality": data_cfg.modality,
        "intensity": intensity_schemes(data_cfg),
        "crop_foreground": bool(data_cfg.crop_foreground),
        "crop_size": [int(r) for r in data_cfg.roi],
    }


def make_plan(encoder_name: str, encoder_args: dict, preprocessing: dict, feature_channels, feature_strides,
              recipe: dict | None = None, source: dict | None = None, corpus: dict | None = None) -> dict:
    """An encoder plan (see the module docstring)."""
    plan = {"plan_version": PLAN_VERSION, "sslkit_version": _version(), "kind": "encoder",
            "encoder": {"name": encoder_name, "args": _jsonable(dict(encoder_args))},
            **preprocessing,
            "feature_channels": [int(c) for c in feature_channels],
            "feature_strides": [[int(s) for s in st] for st in feature_strides]}
    for key, value in (("recipe", recipe), ("source", source), ("corpus", corpus)):
        if value:
            plan[key] = _jsonable(value)
    return plan


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ------------------------------------------------------------------------------------------------ files


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], plan: dict | None = None,
                  metadata: dict[str, str] | None = None) -> Path:
    """Safetensors file of `tensors` with the plan in its metadata; written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    from sslkit.run import atomic_path

    meta = {"format": "pt", **(metadata or {})}
    if plan is not None:
        meta[PLAN_KEY] = json.dumps(plan, sort_keys=True)
    unique, aliases = _split_aliases(tensors)
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in unique.items()}, str(tmp), metadata=meta)
    return out


def _split_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share storage (a segmenter whose `encoder` is a view of its inner net) are written once."""
    first: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
            unique[name] = t
    return unique, aliases


def read_metadata(path: str | Path) -> dict[str, str]:
    """Safetensors header metadata (UserError naming the file when it is not a readable safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - truncated / not safetensors
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, plan or None) of a safetensors file."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    plan = plan_from_metadata(meta, path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read weights ({type(e).__name__})") from None
    for alias, name in json.loads(meta.get(ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, plan


def plan_from_metadata(meta: dict[str, str], where: str | Path = "") -> dict | None:
    text = meta.get(PLAN_KEY)
    if text is None:
        return None
    try:
        plan = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{where}: its sslkit plan is not valid JSON") from None
    return plan


def weights_file(path: str | Path) -> Path:
    """The weights file a path names: the file itself, a checkpoint directory's weights, or a run directory's
    exported encoder (else its newest checkpoint)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return p / name
    ckpts = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
    for c in reversed(ckpts):
        for name in WEIGHT_FILES:
            if (c / name).is_file():
                return c / name
    raise UserError(f"{p}: holds no sslkit weights (encoder.safetensors, model.safetensors or a checkpoint)")


def read_plan(path: str | Path) -> dict:
    """The plan of an encoder file, a checkpoint directory or a run directory (UserError when it has none)."""
    f = weights_file(path)
    plan = plan_from_metadata(read_metadata(f), f)
    if plan is None:
        raise UserError(f"{f}: carries no sslkit plan (written by another tool or an sslkit before 0.2)")
    return plan


def format_plan(plan: dict) -> str:
    """Human-readable lines for `sslkit info PATH`."""
    enc = plan.get("encoder", {})
    lines = [f"kind            {plan.get('kind', '?')} (plan v{plan.get('plan_version', '?')}, "
             f"sslkit {plan.get('sslkit_version', '?')})",
             f"encoder         {enc.get('name', '?')} {json.dumps(enc.get('args', {}), sort_keys=True)}"]
    seg = plan.get("segmenter")
    if seg:
        lines.append(f"segmenter       {seg.get('name')} {json.dumps(seg.get('args', {}), sort_keys=True)}, "
                     f"{seg.get('num_classes')} classes {seg.get('label_names', [])}, adapt {seg.get('adapt')}")
    lines += [f"input           {plan.get('in_channels')} channel(s), {plan.get('spatial_dims')}-D"
              + (" on axial slices of volumes" if plan.get("slices") else "")
              + f", axis order {plan.get('axis_order')}",
              f"orientation     {plan.get('orientation')}",
              f"spacing         {plan.get('spacing')} mm",
              f"modality        {plan.get('modality')}"]
    for mod, scheme in (plan.get("intensity") or {}).items():
        params = {k: v for k, v in scheme.items() if k != "scheme"}
        lines.append(f"intensity {mod:<5} {scheme.get('scheme')} {json.dumps(params) if params else ''}".rstrip())
    lines += [f"foreground crop {plan.get('crop_foreground')}",
              f"crop size       {plan.get('crop_size')}",
              f"features        channels {plan.get('feature_channels')}, strides {plan.get('feature_strides')}"]
    if plan.get("recipe"):
        lines.append(f"recipe          {plan['recipe'].get('name')} ({plan['recipe'].get('path')})")
    if plan.get("source"):
        lines.append(f"source          {json.dumps(plan['source'], sort_keys=True)}")
    if plan.get("corpus"):
        what = "trained on      " if plan.get("kind") == "segmenter" else "corpus          "
        lines.append(f"{what}{json.dumps(plan['corpus'], sort_keys=True)}")
    if plan.get("encoder_corpus"):
        lines.append(f"encoder corpus  {json.dumps(plan['encoder_corpus'], sort_keys=True)} (its pretraining)")
    probe = plan.get("task_probe")
    if probe:
        marks = [f"{k} {probe[k]['dice_mean']:.4f} (step {probe[k]['step']})" for k in ("last", "best") if probe.get(k)]
        refs = [f"{k} {v:.4f}" for k, v in (probe.get("references") or {}).items()]
        lines.append(f"task probe      mean Dice {', '.join(marks)}; references {', '.join(refs) or 'none'}")
    return "\n".join(lines)
