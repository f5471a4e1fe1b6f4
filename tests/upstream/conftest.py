"""Ports of upstream batch-norm test suites (PyTorch, fvcore, timm), written for this package.

Every test takes the ``impl`` fixture and runs twice: once against ``torch.nn`` (the control,
which shows the port itself is right) and once against ``batchnorm``. A case that passes for
torch.nn must pass for batchnorm; a deliberate difference is listed in the README with its reason.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import batchnorm


def _torch_impl() -> SimpleNamespace:
    nn = torch.nn
    return SimpleNamespace(
        name="torch",
        BatchNorm1d=nn.BatchNorm1d,
        BatchNorm2d=nn.BatchNorm2d,
        BatchNorm3d=nn.BatchNorm3d,
        LazyBatchNorm1d=nn.LazyBatchNorm1d,
        LazyBatchNorm2d=nn.LazyBatchNorm2d,
        LazyBatchNorm3d=nn.LazyBatchNorm3d,
        SyncBatchNorm=nn.SyncBatchNorm,
        batch_norm=F.batch_norm,
    )


def _ours_impl() -> SimpleNamespace:
    B = batchnorm
    return SimpleNamespace(
        name="batchnorm",
        BatchNorm1d=B.BatchNorm1d,
        BatchNorm2d=B.BatchNorm2d,
        BatchNorm3d=B.BatchNorm3d,
        LazyBatchNorm1d=getattr(B, "LazyBatchNorm1d", None),
        LazyBatchNorm2d=getattr(B, "LazyBatchNorm2d", None),
        LazyBatchNorm3d=getattr(B, "LazyBatchNorm3d", None),
        SyncBatchNorm=B.SyncBatchNorm,
        batch_norm=B.functional.batch_norm,
    )


@pytest.fixture(params=["torch", "batchnorm"])
def impl(request) -> SimpleNamespace:
    """The namespace under test: ``torch.nn`` (control) or ``batchnorm``."""
    return _torch_impl() if request.param == "torch" else _ours_impl()
