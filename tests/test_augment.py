"""Random rotation / shear / zoom on image batches (batchnorm.research.data.augment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batchnorm.research.data.augment import affine_matrices, apply_affine, random_affine


def _blobs(n: int = 8) -> torch.Tensor:
    """Smooth images in [0, 1] with a centred blob, zero at the border."""
    r = torch.linspace(-1, 1, 28)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    base = torch.exp(-((xx - 0.1) ** 2 + (yy + 0.2) ** 2 / 0.3) / 0.1)
    return (base * torch.linspace(0.5, 1.0, n).view(n, 1, 1)).unsqueeze(1)


def test_output_keeps_shape_dtype_and_unit_range():
    x = torch.rand(16, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    y = random_affine(x, rotation=30, shear=0.3, zoom=0.3, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)


def test_zero_strength_is_identity_and_leaves_generator_alone():
    x = torch.rand(4, 1, 28, 28)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    y = random_affine(x, rotation=0, shear=0, zoom=0, generator=g)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.equal(g.get_state(), state)


def test_identity_maps_resample_exactly():
    x = torch.rand(3, 2, 28, 28, dtype=torch.float64)
    mats = affine_matrices(
        3, 0, 0, 0, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert torch.equal(
        mats, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(3, 2, 3)
    )
    torch.testing.assert_close(apply_affine(x, mats), x)


def test_same_seed_same_batch_different_seed_different_batch():
    x = _blobs()
    a = random_affine(x, generator=torch.Generator().manual_seed(5))
    b = random_affine(x, generator=torch.Generator().manual_seed(5))
    c = random_affine(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_maps_stay_within_the_requested_strengths():
    m = affine_matrices(
        2000,
        rotation=20,
        shear=0.0,
        zoom=0.0,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    angle = torch.atan2(m[:, 1, 0], m[:, 0, 0])
    assert angle.abs().max() <= math.radians(20) + 1e-12
    assert angle.abs().max() > math.radians(19)  # the range is used, not just a corner of it
    # pure rotation: orthonormal 2x2 part
    a = m[:, :, :2]
    torch.testing.assert_close(
        a @ a.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(2000, 2, 2)
    )
    z = affine_matrices(
        2000, 0, 0, zoom=0.25, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert z[:, 0, 0].min() >= 0.75 and z[:, 0, 0].max() <= 1.25 and z[:, 0, 1].abs().max() == 0


def test_rotation_by_a_right_angle_matches_rot90():
    """A 90° map through affine_grid equals torch.rot90 of the image (square grid, pixel centres)."""
    x = torch.rand(2, 1, 7, 7)
    m = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(2, 2, 3)
    torch.testing.assert_close(apply_affine(x, m), torch.rot90(x, k=1, dims=(2, 3)))


def test_mass_is_roughly_preserved_by_small_maps():
    x = _blobs(32)
    y = random_affine(
        x, rotation=10, shear=0.1, zoom=0.05, generator=torch.Generator().manual_seed(0)
    )
    ratio = y.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert ((ratio - 1).abs() < 0.2).all()
    # and the content moved: the mean squared change is not negligible
    assert F.mse_loss(y, x) > 1e-5


@pytest.mark.parametrize(
    "kw", [{"rotation": -1}, {"shear": float("nan")}, {"zoom": 1.0}, {"rotation": 180}]
)
def test_bad_strengths_raise_value_error(kw):
    with pytest.raises(ValueError):
        random_affine(torch.rand(2, 1, 8, 8), **kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_affine(torch.rand(2, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        random_affine(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
