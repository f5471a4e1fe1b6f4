"""The settings every experiment shares, with one default each, and loading their data."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.sources import DATASETS, best_available, check_data_dir, load_dataset
from .data import TensorData
from .runner import option

__all__ = ["DataConfig", "DeviceConfig", "RunConfig", "load_tensor_data"]

DATASET_CHOICES = ("auto", *DATASETS)


@dataclass
class RunConfig:
    """Base of every experiment's ``Config``."""

    seed: int = field(default=0, metadata=option("random seed (weights, data order, augmentation)"))

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class DataConfig(RunConfig):
    """An experiment on the in-memory digit data sets (MNIST, Fashion-MNIST, 8x8 digits)."""

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in DATASET_CHOICES:
            raise ValueError(
                f"dataset must be one of {', '.join(DATASET_CHOICES)}, got {self.dataset!r}"
            )


@dataclass
class DeviceConfig:
    """Options of an experiment that runs on GPUs (mixed into its ``Config``)."""

    device: str = field(
        default="auto",
        metadata=option("auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda")),
    )
    amp: str = field(
        default="off",
        metadata=option(
            "mixed precision: bf16, fp16 (CUDA, with loss scaling) or off",
            choices=("off", "bf16", "fp16"),
        ),
    )
    channels_last: bool = field(default=True, metadata=option("channels_last memory on CUDA"))
    sync_bn: bool = field(
        default=False,
        metadata=option(
            "BN statistics over all processes (this package's SyncBatchNorm); default: per process"
        ),
    )


def load_tensor_data(cfg: DataConfig) -> TensorData:
    """The data set ``cfg`` names (``auto``: the best available), as in-memory tensors."""
    check_data_dir(cfg.data_dir)
    name = cfg.dataset if cfg.dataset != "auto" else best_available(cfg.data_dir)
    ds = load_dataset(name, cfg.data_dir)
    return TensorData(ds.name, ds.source, ds.train_x, ds.train_y, ds.test_x, ds.test_y)
