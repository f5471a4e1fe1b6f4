"""Random rotation, shear and zoom of an image batch, in PyTorch (``affine_grid`` + ``grid_sample``).

The LeNet-BN study (seed 003) trained with Keras' ``ImageDataGenerator(rotation, shear, zoom)``;
this is the same kind of augmentation done on the batch tensor, one random affine map per image,
drawn from a ``torch.Generator`` so that a run is reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_strength(name: str, value: float, upper: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper}, got {value!r}")
    return float(value)


def affine_matrices(
    n: int,
    rotation: float = 10.0,
    shear: float = 0.1,
    zoom: float = 0.1,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` random 2×3 maps in ``affine_grid``'s normalized coordinates: (n, 2, 3).

    rotation: max angle in degrees (uniform in ±rotation); shear: max shear factor (uniform in
    ±shear); zoom: max relative scale change (uniform in [1−zoom, 1+zoom], per axis, as Keras does).
    All strengths zero gives the identity map for every image.
    """
    rotation = _check_strength("rotation", rotation, 180.0)
    shear = _check_strength("shear", shear)
    zoom = _check_strength("zoom", zoom, 1.0)
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1)
    theta = u[:, 0] * math.radians(rotation)
    sh = u[:, 1] * shear
    zx, zy = 1 + u[:, 2] * zoom, 1 + u[:, 3] * zoom
    cos, sin = torch.cos(theta), torch.sin(theta)
    # A = R(θ) · Shear(sh) · Zoom(zx, zy), mapping output coordinates to input coordinates.
    a00, a01 = cos * zx, (cos * sh - sin) * zy
    a10, a11 = sin * zx, (sin * sh + cos) * zy
    zero = torch.zeros_like(theta)
    mats = torch.stack([torch.stack([a00, a01, zero], 1), torch.stack([a10, a11, zero], 1)], 1)
    return mats.to(dtype)


def apply_affine(x: Tensor, mats: Tensor) -> Tensor:
    """Resample each image of ``x`` (N, C, H, W) through its map in ``mats`` (N, 2, 3).

    Bilinear, zero outside the image: values stay within [min(x, 0), max(x, 0)], so a batch in
    [0, 1] stays in [0, 1].
    """
    if x.dim() != 4:
        raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if mats.shape != (x.shape[0], 2, 3):
        raise ValueError(f"expected maps of shape ({x.shape[0]}, 2, 3), got {tuple(mats.shape)}")
    grid = F.affine_grid(mats.to(x.dtype), list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(
    x: Tensor,
    rotation: float = 10.0,
    shear: float = 0.1,
    zoom: float = 0.1,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A randomly rotated, sheared and zoomed copy of the batch ``x`` (N, C, H, W).

    One map per image. With all strengths 0 the input is returned unchanged (as a copy) and the
    generator is not advanced.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor (N, C, H, W), got {type(x).__name__}"
            f"{'' if not isinstance(x, Tensor) else ' of dtype ' + str(x.dtype)}"
        )
    if x.dim() != 4:
        raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if rotation == 0 and shear == 0 and zoom == 0:
        return x.clone()
    mats = affine_matrices(x.shape[0], rotation, shear, zoom, generator=generator, dtype=x.dtype)
    return apply_affine(x, mats)


@dataclass
class Augment:
    """Strengths of :func:`random_affine` (degrees, shear factor, relative zoom); all 0 = off."""

    rotation: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0

    def scaled(self, f: float) -> Augment:
        return Augment(self.rotation * f, self.shear * f, self.zoom * f)

    @property
    def off(self) -> bool:
        return self.rotation == 0 and self.shear == 0 and self.zoom == 0
