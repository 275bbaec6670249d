"""Datalists: MONAI decathlon-style JSON (`{"training": [{"image": ..., "label": ...}, ...]}`) or a folder.

Relative paths in a JSON are resolved against the JSON's folder; a folder is indexed for scans
(NIfTI / NRRD / MHA / MHD files and DICOM series folders).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sslkit.data.readers import SCAN_SUFFIXES, check_dicom_series, has_suffix, is_dicom_file, warn_once
from sslkit.errors import DataError

PATH_KEYS = ("image", "label")
# Files that look like annotations rather than images are left out when a folder is indexed.
_LABEL_DIR_PREFIXES = ("labels", "label", "masks", "segmentations")
_LABEL_STEM_SUFFIXES = ("_label", "_labels", "_seg", "_mask")


def _is_label_path(path: Path, root: Path) -> bool:
    rel = path.relative_to(root)
    if any(part.lower().startswith(_LABEL_DIR_PREFIXES) for part in rel.parts[:-1]):
        return True
    stem = path.name.lower()
    for s in SCAN_SUFFIXES:
        if stem.endswith(s):
            stem = stem[: -len(s)]
            break
    return stem.endswith(_LABEL_STEM_SUFFIXES)


def index_folder(root: str | Path, check_series: bool = True, warn=None) -> list[dict]:
    """Find scans under `root`: files ending .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd, and folders holding DICOM
    files (one entry per folder, i.e. per series). Label-looking files (under labels*/masks* folders, or named
    *_label/*_seg/*_mask) are left out. Returns sorted `[{"image": absolute path}, ...]`.

    check_series: each DICOM folder's headers are checked (`readers.check_dicom_series`); a folder the readers
    would refuse (missing slices, two images at one position, ...) is left out, and every problem or documented
    choice (several series in one folder, duplicate copies) is one line through `warn` (default: an
    `sslkit: warning:` line on stderr)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    say = warn or warn_once
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        dicom_here = False
        for name in sorted(filenames):
            f = d / name
            if has_suffix(f, SCAN_SUFFIXES):
                if not _is_label_path(f, root):
                    found.append(f)
            elif not dicom_here and name.upper() != "DICOMDIR" and is_dicom_file(f):
                dicom_here = True
        if dicom_here and (not check_series or _usable_series(d, say)):
            found.append(d)
    return [{"image": str(p)} for p in sorted(found)]


def _usable_series(folder: Path, say) -> bool:
    """True when the readers would read this DICOM folder; its warnings (or why not) go through `say`."""
    try:
        series = check_dicom_series(folder)
    except DataError as e:
        say(f"{e}; left out")
        return False
    for line in series.warnings:
        say(line)
    return True


def _resolve(entry, base: Path, where: str) -> dict:
    if isinstance(entry, str):  # MSD "test" lists hold bare paths
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise DataError(f"{where}: entry must be a mapping with an 'image' path, got {entry!r:.80}")
    out = dict(entry)
    for k in PATH_KEYS:
        v = out.get(k)
        if isinstance(v, str):
            p = Path(v).expanduser()
            out[k] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def load_datalist(path_or_folder: str | Path, key: str = "training", validate: bool = False) -> list[dict]:
    """Read a decathlon JSON (entries under `key`, relative paths resolved against the JSON's folder) or index
    a folder. With validate=True every referenced image/label must exist, else DataError naming entry and file.
    Returns `[{"image": abs path, "label"?: abs path, ...}, ...]`."""
    p = Path(path_or_folder).expanduser()
    if not p.exists():
        raise DataError(f"{p}: datalist not found")
    if p.is_dir():
        items = index_folder(p)
        if not items:
            raise DataError(f"{p}: folder holds no scans (.nii, .nii.gz, .nrrd, .mha, .mhd or DICOM series)")
        return items
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if isinstance(raw, list):  # a bare list of entries
        entries = raw
    elif isinstance(raw, dict):
        if key not in raw:
            keys = ", ".join(k for k, v in raw.items() if isinstance(v, list)) or "none"
            raise DataError(f"{p}: no '{key}' list (lists present: {keys})")
        entries = raw[key]
    else:
        raise DataError(f"{p}: expected a JSON object with a '{key}' list")
    if not isinstance(entries, list):
        raise DataError(f"{p}: '{key}' must be a list")
    base = p.resolve().parent
    items = [_resolve(e, base, f"{p} [{key}][{i}]") for i, e in enumerate(entries)]
    if validate:
        for i, it in enumerate(items):
            for k in PATH_KEYS:
                if isinstance(it.get(k), str) and not Path(it[k]).exists():
                    raise DataError(f"{p} [{key}][{i}]: {k} file {it[k]} not found")
    return items


def _relative(v, base: Path):
    if isinstance(v, str) and Path(v).is_absolute():
        return os.path.relpath(v, base)
    return v


def write_datalist(items: list[dict] | dict[str, list[dict]], out_path: str | Path,
                   base_dir: str | Path | None = None, key: str = "training") -> Path:
    """Write a decathlon JSON. `items` is one list (written under `key`) or a mapping of lists; image/label
    paths are written relative to `base_dir` (default: the JSON's folder). Returns the JSON path."""
    out = Path(out_path)
    base = Path(base_dir).resolve() if base_dir is not None else out.resolve().parent
    lists = items if isinstance(items, dict) else {key: items}
    doc = {}
    for k, lst in lists.items():
        if isinstance(lst, list):
            doc[k] = [{kk: (_relative(vv, base) if kk in PATH_KEYS else vv) for kk, vv in e.items()}
                      if isinstance(e, dict) else _relative(e, base) for e in lst]
        else:
            doc[k] = lst
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    os.replace(tmp, out)
    return out
