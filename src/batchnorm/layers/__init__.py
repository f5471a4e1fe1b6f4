"""Batch-normalization layers."""

from .act import BatchNormAct1d, BatchNormAct2d
from .base import BatchNormBase
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
__all__ += ["BatchNormAct1d", "BatchNormAct2d"]
