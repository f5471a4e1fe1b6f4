"""Shared test set-up: deterministic seeds, two threads (the CI box has two cores)."""

from __future__ import annotations

import pytest
import torch

import batchnorm

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_torch_per_test():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "auto"])
def bn_core_backend(request):
    """Runs a test once per op backend and restores the previously selected one afterwards."""
    old = batchnorm.set_backend(request.param)
    try:
        yield request.param
    finally:
        batchnorm.set_backend(old)
