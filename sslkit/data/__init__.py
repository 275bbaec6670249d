"""sslkit.data: readers, datalists, MONAI preprocessing presets, SSL pretraining dataset, demo corpus."""

from sslkit.data.datalist import index_folder, load_datalist, write_datalist
from sslkit.data.demo import build_demo_corpus
from sslkit.data.pretrain import PretrainDataset, cache_key
from sslkit.data.readers import Scan, is_dicom_series_dir, load_scan, validate
from sslkit.data.transforms import LoadScand, preprocess_transforms, preprocessing_params

__all__ = [
    "Scan", "load_scan", "validate", "is_dicom_series_dir",
    "load_datalist", "index_folder", "write_datalist",
    "LoadScand", "preprocess_transforms", "preprocessing_params",
    "PretrainDataset", "cache_key",
    "build_demo_corpus",
]
