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


def index_folder(root: str | Path, check_series: bool = True, warn=None, inspect: bool = False) -> list[dict]:
    """Find scans under `root`: files ending .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd, and folders holding DICOM
    files (one entry per folder, i.e. per series). Label-looking files (under labels*/masks* folders, or named
    *_label/*_seg/*_mask) are left out. Returns sorted `[{"image": absolute path}, ...]`.

    check_series: each DICOM folder's headers are checked (`readers.check_dicom_series`); a folder the readers
    would refuse (missing slices, two images at one position, ...) is left out, and every problem or documented
    choice (several series in one folder, duplicate copies) is one line through `warn` (default: an
    `sslkit: warning:` line on stderr).
    inspect (`sslkit data index`): every scan is read as pretraining reads it (`scan_kind.inspect_scan`): one the
    reader refuses (a 2-D radiograph, NaN voxels, ...) or a label map (an atlas, a tissue map) is left out with
    its reason, and each entry gets its "modality"; the guesses that are not sure are one warning line."""
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
        if dicom_here and (inspect or not check_series or _usable_series(d, say)):
            found.append(d)
    if inspect:
        return _inspected(sorted(found), say)
    return [{"image": str(p)} for p in sorted(found)]


def _inspected(paths: list[Path], say) -> list[dict]:
    """The entries of the scans pretraining's reader takes, with their modality (scan_kind)."""
    from sslkit.data.scan_kind import inspect_scan

    entries, unsure = [], []
    for p in paths:
        try:
            entry = inspect_scan(p)
        except DataError as e:
            say(f"{e}" if str(e).endswith("left out") else f"{e}; left out")
            continue
        why = entry.pop("modality_unsure", None)
        if why is not None:
            unsure.append(f"{p.name}: {entry['modality']} ({why})")
        entries.append(entry)
    if unsure:
        shown = "; ".join(unsure[:3]) + (f"; and {len(unsure) - 3} more" if len(unsure) > 3 else "")
        say(f"modality guessed, not sure, for {len(unsure)} of {len(entries)} scans: {shown}; check their "
            "\"modality\" (ct | mri) in the datalist")
    return entries


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


def _absolute(v: str, base: Path) -> str:
    p = Path(v).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve(entry, base: Path, where: str, need_label: bool = False) -> dict:
    if isinstance(entry, str):  # MSD "test" lists hold bare paths
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise DataError(f"{where}: entry must be a mapping with an 'image' path, got {entry!r:.80}")
    if need_label and "label" not in entry:
        raise DataError(f"{where}: entry needs 'image' and 'label'")
    out = dict(entry)
    for k in PATH_KEYS:
        v = out.get(k)
        if isinstance(v, str):
            out[k] = _absolute(v, base)
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):  # one file per channel
            out[k] = [_absolute(x, base) for x in v]
    return out


def resolve_entries(entries: list, base: Path, where: str, need_label: bool = False) -> list[dict]:
    """Datalist entries with their image / label paths (or lists of paths, one per channel) made absolute against
    `base`; DataError naming `where` and the entry for a malformed one (or, with need_label, one without label)."""
    return [_resolve(e, base, f"{where} [{i}]", need_label) for i, e in enumerate(entries)]


def read_datalist_json(path: str | Path, what: str = "datalist") -> dict | list:
    """The parsed JSON of a decathlon datalist (MSD dataset.json included): DataError naming the file when it is
    missing or not JSON. The one reader of these files; `resolve_entries` makes their paths absolute."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: {what} not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None


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
        warn_once(f"{p}: a folder datalist gives every scan the recipe's data.modality; `sslkit data index {p} "
                  "--out datalist.json` reads each scan's modality, leaves out label maps and unreadable scans")
        return items
    raw = read_datalist_json(p)
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
    items = resolve_entries(entries, p.resolve().parent, f"{p} [{key}]")
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
    from sslkit.run import atomic_write_json

    return atomic_write_json(out, doc, indent=2)
