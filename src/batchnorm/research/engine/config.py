"""The settings every experiment shares, with one default each, and loading their data."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.sources import DATASETS, best_available, check_data_dir, load_dataset
from .data import TensorData
from .runner import option

__all__ = ["RunConfig", "load_tensor_data"]

DATASET_CHOICES = ("auto", *DATASETS)


@dataclass
class RunConfig:
    """Base of every experiment's ``Config``: the data, and the seed."""

    dataset: str = field(
        default="auto",
        metadata=option(
            "mnist, fashion-mnist, digits, or auto (the best available)", choices=DATASET_CHOICES
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=option(
            "directory holding the dataset's IDX files (default: $BATCHNORM_DATA, the user "
            "cache, the system copy, a download)",
            metavar="DIR",
        ),
    )
    seed: int = field(default=0, metadata=option("random seed (weights, data order, augmentation)"))

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_CHOICES:
            raise ValueError(
                f"dataset must be one of {', '.join(DATASET_CHOICES)}, got {self.dataset!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def load_tensor_data(cfg: RunConfig) -> TensorData:
    """The data set ``cfg`` names (``auto``: the best available), as in-memory tensors."""
    check_data_dir(cfg.data_dir)
    name = cfg.dataset if cfg.dataset != "auto" else best_available(cfg.data_dir)
    ds = load_dataset(name, cfg.data_dir)
    return TensorData(ds.name, ds.source, ds.train_x, ds.train_y, ds.test_x, ds.test_y)
