"""Which examples each step trains on: a stateless sampler, so a resumed run repeats exactly.

The mini-batch of step ``t`` depends only on (seed, tag, t): epoch ``t // steps_per_epoch``
reshuffles the examples with a generator seeded by (seed, tag, epoch), and the last partial
batch of an epoch is dropped. Nothing is carried from step to step, so a checkpoint needs no
sampler state, and arms that share a tag see the same mini-batches in the same order.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["Batches", "step_seed"]


def step_seed(seed: int, tag: str, step: int = 0) -> int:
    """A 62-bit seed for (run seed, tag, step), the same in every process and on every run."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode()) * 65_537 + step * 7_919) % (2**62)


class Batches:
    """Indices of step ``t``'s mini-batch of ``batch_size`` out of ``n`` examples.

    With ``world > 1`` the global batch is split into equal shares, one per rank: rank ``r``
    trains on ``indices(t)[r * b : (r + 1) * b]`` with ``b = batch_size // world``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, tag: str) -> None:
        if batch_size > n:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {n} training examples; use a smaller "
                "--batch-size or more data"
            )
        self.n, self.batch_size, self.seed, self.tag = n, batch_size, seed, tag
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def indices(self, step: int, rank: int = 0, world: int = 1) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, self.tag + "/epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        batch = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
        share = self.batch_size // world
        return batch[rank * share : (rank + 1) * share]
