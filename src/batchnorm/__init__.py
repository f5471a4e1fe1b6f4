"""batchnorm: Batch Normalization (Ioffe & Szegedy, 2015) for PyTorch.

Drop-in layers for ``torch.nn.BatchNorm1d/2d/3d`` (subclasses of them) with fast C++ CPU
kernels behind one registered op (``torch.ops.batchnorm.batch_norm``, used only where it
computes what PyTorch's kernel computes), fused BN + activation, BN variants, and whole-model
tools.
"""

from . import diagnostics, functional
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormBase,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    SyncBatchNorm,
    convert_sync_batchnorm,
)
from .ops import get_backend, set_backend
from .tools import (
    convert_model,
    fold_batchnorm,
    freeze_batchnorm,
    fuse_bn_act,
    recompute_population_stats,
    unfreeze_batchnorm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "convert_model",
    "functional",
    "get_backend",
    "set_backend",
]
__all__ += [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "fold_batchnorm",
    "freeze_batchnorm",
    "recompute_population_stats",
    "unfreeze_batchnorm",
]
__all__ += ["diagnostics"]
__all__ += ["BatchNormAct1d", "BatchNormAct2d", "fuse_bn_act"]
__all__ += ["FrozenBatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]
