"""``BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm1d/2d/3d``.

Per feature for (N, C) and (N, C, L); per channel over N and every spatial position for
(N, C, H, W) and (N, C, D, H, W) — the paper's m' = |B|·p·q (Section 3.2).
"""

from __future__ import annotations

from .base import BatchNormBase


class BatchNorm1d(BatchNormBase):
    """BN over (N, C) or (N, C, L) input; arguments and state_dict as ``torch.nn.BatchNorm1d``."""

    _dims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Per-channel BN over (N, C, H, W); arguments and state_dict as ``torch.nn.BatchNorm2d``."""

    _dims = (4,)


class BatchNorm3d(BatchNormBase):
    """Per-channel BN over (N, C, D, H, W); arguments, state_dict as ``torch.nn.BatchNorm3d``."""

    _dims = (5,)
