"""``BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm1d/2d/3d`` (and subclasses of them),
and their lazy forms.

Per feature for (N, C) and (N, C, L); per channel over N and every spatial position for
(N, C, H, W) and (N, C, D, H, W) — the paper's m' = |B|·p·q (Section 3.2).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _LazyNormBase

from .base import BatchNormBase


class BatchNorm1d(BatchNormBase, nn.BatchNorm1d):
    """BN over (N, C) or (N, C, L) input; arguments and state_dict as ``torch.nn.BatchNorm1d``."""

    _dims = (2, 3)


class BatchNorm2d(BatchNormBase, nn.BatchNorm2d):
    """Per-channel BN over (N, C, H, W); arguments and state_dict as ``torch.nn.BatchNorm2d``."""

    _dims = (4,)


class BatchNorm3d(BatchNormBase, nn.BatchNorm3d):
    """Per-channel BN over (N, C, D, H, W); arguments and state_dict as ``torch.nn.BatchNorm3d``."""

    _dims = (5,)


class LazyBatchNorm1d(_LazyNormBase, BatchNorm1d):
    """:class:`BatchNorm1d` with ``num_features`` taken from the first input's axis 1, as
    ``torch.nn.LazyBatchNorm1d``; it becomes a :class:`BatchNorm1d` after that call."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyNormBase, BatchNorm2d):
    """:class:`BatchNorm2d` with ``num_features`` inferred on the first call (as
    ``torch.nn.LazyBatchNorm2d``)."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyNormBase, BatchNorm3d):
    """:class:`BatchNorm3d` with ``num_features`` inferred on the first call (as
    ``torch.nn.LazyBatchNorm3d``)."""

    cls_to_become = BatchNorm3d
