"""The engine's data seam: where an arm's mini-batches and test batches come from.

The loop asks a :class:`Data` for an iterator over the mini-batches of steps ``start..stop-1``
(so a ``torch.utils.data.DataLoader`` behind it can prefetch with workers), this rank's share
of each, augmented as the arm asks; and for its shard of the test set. Augmentation is the
data's job: each example's random transform is seeded by (run seed, arm, step), so a resumed
or re-sharded run sees the same examples the same way. :class:`TensorData` serves data sets
that fit in memory; :class:`batchnorm.research.data.images.ImageFolderData` decodes image
files in DataLoader workers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..data.augment import Augment, random_affine
from .sampler import Batches, step_seed

__all__ = ["Data", "TensorData"]


class Data(Protocol):
    name: str  # e.g. "fashion-mnist"
    source: str  # where it was read from, for the report
    n_train: int

    def train_batches(
        self,
        batches: Batches,
        start: int,
        stop: int,
        *,
        rank: int = 0,
        world: int = 1,
        augment: Any = None,
        tag: str = "",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) of steps ``start..stop-1``: this rank's share of each global mini-batch,
        augmented as ``augment`` (its type is the data's) says, seeded by ``tag`` and step."""
        ...

    def test_batches(
        self, batch_size: int, *, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's shard of the test split, in order; the shards of ranks 0..world-1
        together hold every test example exactly once."""
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
        self,
        batches: Batches,
        start: int,
        stop: int,
        *,
        rank: int = 0,
        world: int = 1,
        augment: Augment | None = None,
        tag: str = "",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(start, stop):
            idx = batches.indices(step, rank, world)
            x, y = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)
            if augment is not None and not augment.off:
                seed = step_seed(batches.seed, f"augment/{tag}", step * world + rank)
                g = torch.Generator().manual_seed(seed)
                x = random_affine(x, augment.rotation, augment.shear, augment.zoom, generator=g)
            yield x, y

    def test_batches(
        self, batch_size: int, *, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.test_x[rank::world], self.test_y[rank::world]
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]

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
