"""Batch-normalization layers."""

from .act import BatchNormAct1d, BatchNormAct2d
from .base import BatchNormBase
from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d
from .renorm import BatchRenorm1d, BatchRenorm2d
from .sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]
__all__ += [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
]
__all__ += ["BatchNormAct1d", "BatchNormAct2d"]
