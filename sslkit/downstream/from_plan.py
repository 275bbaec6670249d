"""Downstream follows the plan: a recipe filled in from the encoder's plan, the differences named, the fine-tuned
model's own plan, and what `predict` compares an input with.

    raw, diffs = recipe_from_plan(read_recipe(path), encoder_plan)   # keys the recipe leaves out come from the plan
    warn(differences_line(diffs))                                     # or ConfigError with --strict-plan
"""

from __future__ import annotations

import json
import math

import numpy as np

from sslkit.plan import make_plan, preprocessing_plan

# ------------------------------------------------------------------------------------------ recipe from plan


def _get(raw: dict, key: str):
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(raw: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


_MISSING = object()

# Transfer defaults: what a fine-tune from a plan (`--encoder`, and `--scratch` with it, so both arms train alike)
# uses where the recipe is silent; chosen from the demo study's schedule comparison (docs/study.md)
TRANSFER_DEFAULTS = (("adapt.encoder_lr_scale", 0.1),)


def _same(a, b) -> bool:
    """Equal as JSON values, numbers within 1e-6 (a recipe's 2 is the plan's 2.0; tuples are lists)."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def plan_expectations(plan: dict, modality: str) -> list[tuple[str, object]]:
    """(recipe key, value) pairs a recipe must match to feed the encoder what its plan says, for scans of
    `modality`. The model section comes from the segmenter that holds the plan's encoder."""
    from sslkit.models.registry import segmenter_for_encoder

    enc = plan["encoder"]
    seg_name, seg_args = segmenter_for_encoder(enc["name"], enc.get("args", {}))
    pairs = [("model.name", seg_name)] + [(f"model.args.{k}", v) for k, v in seg_args.items()]
    pairs += [("model.spatial_dims", plan["spatial_dims"]), ("model.in_channels", plan["in_channels"]),
              ("data.spacing", plan["spacing"]), ("data.crop_foreground", plan["crop_foreground"])]
    scheme = (plan.get("intensity") or {}).get(modality, {})
    if scheme.get("scheme") == "window":
        pairs.append(("data.intensity_range", scheme["window"]))
    elif scheme:
        pairs.append(("data.mri_norm", scheme["scheme"]))
        if "percentiles" in scheme:
            pairs.append(("data.mri_percentiles", scheme["percentiles"]))
    return pairs


def recipe_from_plan(raw: dict, plan: dict | None) -> tuple[dict, list[tuple[str, object, object]]]:
    """(recipe, differences): keys the recipe leaves out are taken from the plan (the crop size too) and, for a full
    fine-tune, from TRANSFER_DEFAULTS; keys it sets to another value stay as the recipe says and are listed as
    (key, encoder value, recipe value)."""
    if plan is None:
        return raw, []
    raw = json.loads(json.dumps(raw))
    diffs: list[tuple[str, object, object]] = []
    modality = raw.get("data", {}).get("modality", plan.get("modality", "ct"))
    seen = (plan.get("corpus") or {}).get("modalities")
    if seen and modality not in seen:
        diffs.append(("data.modality", sorted(seen), modality))
    recipe_model = _get(raw, "model.name")
    for key, value in plan_expectations(plan, modality):
        if key.startswith("model.args.") and recipe_model is not _MISSING and recipe_model != _get_plan_model(plan):
            continue  # another architecture: its args are not comparable one by one (model.name differs already)
        have = _get(raw, key)
        if have is _MISSING:
            _set(raw, key, value)
        elif not _same_in_plane(key, have, value):
            diffs.append((key, value, have))
    if _get(raw, "data.roi") is _MISSING and plan.get("crop_size"):
        _set(raw, "data.roi", plan["crop_size"])
    if "data.modality" not in [d[0] for d in diffs] and _get(raw, "data.modality") is _MISSING:
        _set(raw, "data.modality", modality)
    if _get(raw, "adapt.mode") in (_MISSING, "full"):
        for key, value in TRANSFER_DEFAULTS:
            if _get(raw, key) is _MISSING:
                _set(raw, key, value)
    return raw, diffs


def _get_plan_model(plan: dict) -> str:
    from sslkit.models.registry import segmenter_for_encoder

    return segmenter_for_encoder(plan["encoder"]["name"], plan["encoder"].get("args", {}))[0]


def _same_in_plane(key: str, have, want) -> bool:
    """A 2-D recipe's spacing matches the in-plane part of a sliced-volume plan's spacing."""
    if key == "data.spacing" and isinstance(have, list) and isinstance(want, list) and len(have) < len(want):
        want = want[:len(have)]
    return _same(have, want)


def differences_line(diffs: list[tuple[str, object, object]]) -> str:
    """One line naming every difference: `key: encoder value -> recipe value; ...`."""
    parts = [f"{k}: {json.dumps(e)} -> {json.dumps(r)}" for k, e, r in diffs]
    return "the recipe differs from the encoder's plan (key: encoder -> recipe): " + "; ".join(parts)


# ------------------------------------------------------------------------------------------ the model's plan


def segmenter_plan(cfg, encoder_plan: dict | None, input_stats: dict, recipe: dict | None = None,
                   source: dict | None = None) -> dict:
    """The plan of a fine-tuned segmentation model: its own preprocessing (what predict must do), its encoder,
    the segmenter, and the statistics of the inputs it was trained on."""
    m, d = cfg.model, cfg.data
    prep = preprocessing_plan(d, m.spatial_dims, m.in_channels, slices=d.slices)
    if encoder_plan is not None:
        enc_name, enc_args = encoder_plan["encoder"]["name"], encoder_plan["encoder"].get("args", {})
        channels, strides = encoder_plan.get("feature_channels", []), encoder_plan.get("feature_strides", [])
    else:
        enc_name, enc_args, channels, strides = m.name, m.args, [], []
    cases = int(input_stats.get("cases", 0))
    plan = make_plan(enc_name, enc_args, prep, channels, strides, recipe=recipe, source=source,
                     corpus={"scans": cases, "modalities": {d.modality: cases}, "task": d.task or d.layout})
    if (encoder_plan or {}).get("corpus"):
        plan["encoder_corpus"] = encoder_plan["corpus"]  # what the encoder was pretrained on, not this model
    plan["kind"] = "segmenter"
    plan["segmenter"] = {"name": m.name, "args": json.loads(json.dumps(m.args)), "num_classes": d.num_classes,
                         "label_names": all_class_names(d), "adapt": cfg.adapt.mode}
    plan["input_stats"] = input_stats
    return plan


def all_class_names(data_cfg) -> list[str]:
    """One name per output class, background first: data.label_names names the foreground classes (class_<i>
    where it names fewer), or every class when it has num_classes names."""
    names = [str(n) for n in data_cfg.label_names]
    if len(names) == data_cfg.num_classes:
        return names
    return ["background"] + (names + [f"class_{i}" for i in range(len(names) + 1, data_cfg.num_classes)])[
        : data_cfg.num_classes - 1]


# ------------------------------------------------------------------------------------------ input statistics


def case_stats(image) -> dict:
    """What a preprocessed image looks like: the scan's own spacing, the field of view after preprocessing (mm per
    axis) and the mean / 99th percentile of its foreground (voxels > 0 for [0, 1] schemes, != 0 for z-scores).
    `image`: a MetaTensor (C, *S) from sslkit.data.preprocess."""
    arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)
    spacing = [float(s) for s in np.asarray(image.pixdim)] if hasattr(image, "pixdim") else [1.0] * (arr.ndim - 1)
    native = image.meta.get("spacing") if hasattr(image, "meta") else None
    native = [float(s) for s in np.asarray(native)] if native is not None else spacing
    fg = arr[arr != 0]
    return {"native_spacing": native, "fov_mm": [float(n * s) for n, s in zip(arr.shape[1:], spacing)],
            "fg_mean": float(fg.mean()) if fg.size else 0.0,
            "fg_p99": float(np.percentile(fg, 99)) if fg.size else 0.0}


def summarize_stats(per_case: list[dict]) -> dict:
    """Training-set ranges of case_stats: {name: [[min, max] per axis] or [min, max]}."""
    out: dict = {"cases": len(per_case)}
    for key in ("native_spacing", "fov_mm", "fg_mean", "fg_p99"):
        vals = np.asarray([c[key] for c in per_case], dtype=float)
        if vals.ndim == 2:
            out[key] = [[float(vals[:, a].min()), float(vals[:, a].max())] for a in range(vals.shape[1])]
        else:
            out[key] = [float(vals.min()), float(vals.max())]
    return out


def input_warnings(stats: dict, seen: dict | None) -> list[str]:
    """Ways an input is far from what the model saw in training (empty when close). Rules: native spacing outside
    [0.5x, 2x] of the training range on an axis; field of view outside [0.67x, 1.5x]; foreground mean intensity
    outside the training range widened by max(0.1, half its width)."""
    if not seen:
        return []
    notes = []
    for key, what, lo_f, hi_f in (("native_spacing", "spacing (mm)", 0.5, 2.0),
                                  ("fov_mm", "field of view (mm)", 0.67, 1.5)):
        have, ranges = stats.get(key), seen.get(key)
        if not have or not ranges or len(have) != len(ranges):
            continue
        far = [i for i, (v, (lo, hi)) in enumerate(zip(have, ranges)) if v < lo * lo_f or v > hi * hi_f]
        if far:
            notes.append(f"{what} {_fmt(have)} vs {_fmt_ranges(ranges)} in training")
    lo, hi = seen.get("fg_mean", [None, None])
    if lo is not None:
        pad = max(0.1, (hi - lo) / 2)
        v = stats["fg_mean"]
        if v < lo - pad or v > hi + pad:
            notes.append(f"foreground mean intensity {v:.3g} after preprocessing vs {lo:.3g}..{hi:.3g} in training")
    return notes


def _fmt(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"


def _fmt_ranges(r: list[list[float]]) -> str:
    return "[" + ", ".join(f"{a:.3g}" if math.isclose(a, b) else f"{a:.3g}..{b:.3g}" for a, b in r) + "]"
