"""Shared test set-up: deterministic seeds, two threads (the CI box has two cores)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from hypothesis import settings

import batchnorm

torch.set_num_threads(2)

# CI gets a fixed example sequence (a red CI run is reproducible); local runs explore new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed_torch_per_test():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=["torch", "auto"])
def bn_core_backend(request):
    """Runs a test once per backend (auto: the C++ kernels where they apply; torch: PyTorch's
    kernel for every call) and restores the previously selected one afterwards."""
    old = batchnorm.set_backend(request.param)
    try:
        yield request.param
    finally:
        batchnorm.set_backend(old)


@pytest.fixture
def torch_bn_bias() -> bool:
    """Whether this torch's ``nn.BatchNorm*`` take the keyword-only ``bias`` (torch 2.13 does; the
    package supports torch >= 2.4). Tests that hand ``bias=`` to torch's layer, or compare reprs
    that show it, ask this first."""
    return "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters
