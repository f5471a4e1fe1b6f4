"""The engine's data seam: where an arm's mini-batches and test batches come from.

The loop asks a :class:`Data` for an iterator over the mini-batches of steps ``start..stop-1``
(so a ``torch.utils.data.DataLoader`` behind it can prefetch with workers) and for the test
set in batches. :class:`TensorData` serves datasets that fit in memory (every experiment
here); a data set of image files implements the same two methods with a DataLoader whose
batch sampler yields ``Batches.indices(step, rank, world)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .sampler import Batches, step_seed

__all__ = ["Data", "TensorData"]


class Data(Protocol):
    name: str  # e.g. "fashion-mnist"
    source: str  # where it was read from, for the report
    n_train: int

    def train_batches(
        self, batches: Batches, start: int, stop: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) of steps ``start..stop-1``: this rank's share of each global mini-batch."""
        ...

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole test split, in order, ``batch_size`` examples at a time."""
        ...


@dataclass
class TensorData:
    """A data set held in memory as four tensors."""

    name: str
    source: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def n_train(self) -> int:
        return len(self.train_x)

    def train_batches(
        self, batches: Batches, start: int, stop: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(start, stop):
            idx = batches.indices(step, rank, world)
            yield self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.test_x), batch_size):
            yield self.test_x[i : i + batch_size], self.test_y[i : i + batch_size]

    def flat(self) -> TensorData:
        """Each example as one vector (for MLPs), contiguous."""
        return TensorData(
            self.name,
            self.source,
            self.train_x.reshape(len(self.train_x), -1).contiguous(),
            self.train_y,
            self.test_x.reshape(len(self.test_x), -1).contiguous(),
            self.test_y,
        )

    def subset(self, train: int = 0, test: int = 0, seed: int = 0) -> TensorData:
        """Fixed random subsets of ``train`` / ``test`` examples (0: all), the same for a seed."""
        g = torch.Generator().manual_seed(step_seed(seed, "subset"))
        tx, ty, vx, vy = self.train_x, self.train_y, self.test_x, self.test_y
        if 0 < train < len(tx):
            idx = torch.randperm(len(tx), generator=g)[:train]
            tx, ty = tx[idx], ty[idx]
        if 0 < test < len(vx):
            idx = torch.randperm(len(vx), generator=g)[:test]
            vx, vy = vx[idx], vy[idx]
        return TensorData(self.name, self.source, tx, ty, vx, vy)
