"""Datasets for the experiments: an IDX reader and MNIST / Fashion-MNIST / digits sources."""

from .idx import IDXError, read_idx, write_idx
from .sources import (
    DATASETS,
    DataNotFoundError,
    Dataset,
    best_available,
    cache_dir,
    download,
    load_dataset,
    locate,
)

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "Dataset",
    "IDXError",
    "best_available",
    "cache_dir",
    "download",
    "load_dataset",
    "locate",
    "read_idx",
    "write_idx",
]
