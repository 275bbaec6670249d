"""sslkit.data: readers, datalists, the one preprocessing stack, the store of preprocessed volumes, the SSL
pretraining dataset, the demo corpus.

Names are imported on first use (PEP 562), so `import sslkit.data.store` or `sslkit.data.multicrop` does not pull in
MONAI, and `sslkit data prepare --help` answers at once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Scan": "readers", "load_scan": "readers", "validate": "readers", "is_dicom_series_dir": "readers",
    "load_datalist": "datalist", "index_folder": "datalist", "write_datalist": "datalist",
    "LoadScand": "preprocess", "preprocess_transforms": "preprocess", "preprocessing_params": "preprocess",
    "PretrainDataset": "pretrain", "cache_key": "pretrain",
    "VolumeStore": "store",
    "prepare_store": "prepare",
    "build_demo_corpus": "demo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sslkit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sslkit.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
