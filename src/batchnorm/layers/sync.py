"""Synchronized BN on ``torch.distributed``: statistics over the global batch of every rank.

Forward, one collective: each rank computes, per channel, its count n_r, mean μ_r and sum of
squared deviations M2_r (two-pass, float64), and ``all_gather`` exchanges the (1 + 2C) numbers.
Chan's parallel merge then gives, on every rank, the statistics of the concatenated batch
without the E[x²] − E[x]² cancellation:

    N = Σ n_r,   μ = Σ n_r μ_r / N,   M2 = Σ M2_r + Σ n_r (μ_r − μ)²,   σ²_B = M2 / N

Backward, one collective: ``all_reduce`` of (Σ dL/dy, Σ dL/dy · x̂) over all ranks, then Section 3's
dL/dx = γ/sqrt(σ²_B + ε) · (dL/dy − Σdy/N − x̂ · Σ(dy·x̂)/N) for the local rows. dL/dγ and dL/dβ
are this rank's sums (DDP averages parameter gradients across ranks, as with ``torch.nn``).

Ranks may hold different or zero examples (n_r = 0 adds nothing). Every rank in the group must
call forward (and backward) in the same order, as for any collective. With ``timeout`` (seconds)
a collective that does not complete in time raises a ``RuntimeError`` instead of waiting; the
default is the process group's timeout (``init_process_group(timeout=...)``). With no process
group, or a group of one rank, this is the local BatchNorm.
"""

from __future__ import annotations

import datetime
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .. import functional as BF
from ..ops import reference
from .base import BatchNormBase, replace_modules, share_state
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d


def _wait(work, timeout: float | None, what: str, group) -> None:
    """Wait for an async collective, turning a failure or time-out into a clear error."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:  # DistBackendError and gloo/NCCL time-outs are RuntimeErrors
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        limit = f"{timeout} s" if timeout is not None else "the process group's"
        raise RuntimeError(
            f"SyncBatchNorm: {what} on rank {rank} of {world} failed ({e}). Another rank has "
            f"probably died, or did not run the same forward/backward; every rank must call the "
            f"layer in the same order. Time-out: {limit}."
        ) from e


class _SyncNormalize(torch.autograd.Function):
    """y = γ·(x − μ)·invstd + β with global μ, invstd; backward all-reduces (Σdy, Σdy·x̂)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group, timeout):
        acc = mean.dtype
        x_hat = (x.to(acc) - reference.channel_view(mean, x)) * reference.channel_view(invstd, x)
        y = x_hat
        if weight is not None:
            y = y * reference.channel_view(weight.to(acc), x)
        if bias is not None:
            y = y + reference.channel_view(bias.to(acc), x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group, ctx.timeout = count, group, timeout
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        acc, dims = mean.dtype, reference.reduce_dims(x)
        dya = dy.to(acc)
        x_hat = (x.to(acc) - reference.channel_view(mean, x)) * reference.channel_view(invstd, x)
        sum_dy = dya.sum(dims)  # local Σ dL/dy  (= local dL/dβ)
        sum_dy_xhat = (dya * x_hat).sum(dims)  # local Σ dL/dy·x̂  (= local dL/dγ)
        both = torch.cat([sum_dy, sum_dy_xhat])
        # the backward's one collective
        work = dist.all_reduce(both, group=ctx.group, async_op=True)
        _wait(work, ctx.timeout, "all_reduce of the gradient sums", ctx.group)
        c = mean.shape[0]
        g_dy, g_dy_xhat = both[:c] / ctx.count, both[c:] / ctx.count
        gamma = weight.to(acc) if weight is not None else torch.ones_like(mean)
        dx = reference.channel_view(gamma * invstd, x) * (
            dya - reference.channel_view(g_dy, x) - x_hat * reference.channel_view(g_dy_xhat, x)
        )
        pdtype = weight.dtype if weight is not None else acc
        dw = sum_dy_xhat.to(pdtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.to(pdtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), dw, db, None, None, None, None, None


class SyncBatchNorm(BatchNormBase):
    """BN whose training statistics span every rank of ``process_group`` (default: the world).

    Same arguments, buffers and ``state_dict`` as ``torch.nn.SyncBatchNorm``, plus ``timeout``
    (seconds to wait for a collective before raising; None = the process group's own time-out).
    Accepts (N, C, *spatial) input of any rank ≥ 2, on CPU (gloo) as on GPUs.

    A ``_BatchNorm`` (tools that look for BN by class find it) but deliberately not a
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses every ``torch.nn.SyncBatchNorm``
    instance in a CPU model, and this layer is made to work there.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise BF.BatchNormInputError(f"expected at least 2D input (got {input.dim()}D input)")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        timeout: float | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.timeout = timeout

    def _world_size(self) -> int:
        """Ranks in the group, or 1 when torch.distributed is unavailable or not initialized."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def check_input(self, x: Tensor) -> None:
        if self._world_size() > 1 and self._uses_batch_stats():
            # Local batches may be tiny or empty; the global count is checked after the gather.
            BF.check_hyperparameters(self.eps, self.momentum)
            BF.check_input(x, self.num_features, self._dims, layer=type(self).__name__)
            return
        super().check_input(x)

    @torch.no_grad()
    def check_channels_across_ranks(self) -> None:
        """Once per layer: every rank holds the same channel count. Ranks that disagree would
        exchange statistics of different sizes, which kills a gloo rank with SIGABRT (and hangs
        NCCL); one small all_gather turns that into a clear error on every rank."""
        world = self._world_size()
        mine = torch.tensor([self.num_features], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        work = dist.all_gather(gathered, mine, group=self.process_group, async_op=True)
        _wait(work, self.timeout, "all_gather of the channel counts", self.process_group)
        counts = [int(t) for t in gathered]
        if len(set(counts)) > 1:
            raise ValueError(
                f"SyncBatchNorm: the ranks disagree on this layer's channel count (this rank, "
                f"{dist.get_rank(self.process_group)}, has {self.num_features}; by rank: {counts}); every "
                f"rank must build the same model, so that each SyncBatchNorm sees the same "
                f"num_features"
            )
        self._channels_checked = True

    @torch.no_grad()
    def global_stats(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """(μ_B, biased σ²_B, N) over the batch of all ranks (float64, one all_gather)."""
        c = x.shape[1]
        xd = x.detach().to(torch.float64)
        n = reference.values_per_channel(x)
        if n > 0:
            mean_r, var_r = reference.batch_stats(xd)
            m2_r = var_r * n
        else:  # an empty rank contributes nothing
            mean_r = m2_r = xd.new_zeros(c)
        packed = torch.cat([xd.new_tensor([float(n)]), mean_r, m2_r])  # (1 + 2C,)
        world = self._world_size()
        gathered = [torch.empty_like(packed) for _ in range(world)]
        work = dist.all_gather(gathered, packed, group=self.process_group, async_op=True)
        _wait(work, self.timeout, "all_gather of the batch statistics", self.process_group)
        g = torch.stack(gathered)  # (world, 1 + 2C)
        counts, means, m2s = g[:, :1], g[:, 1 : 1 + c], g[:, 1 + c :]
        total = float(counts.sum())
        if total < 2:
            raise ValueError(
                f"SyncBatchNorm: training needs more than 1 value per channel over all ranks, got "
                f"{int(total)}; use bigger batches, or call .eval() to use the running statistics"
            )
        mean = (counts * means).sum(0) / total  # Chan: μ = Σ n_r μ_r / N
        # Chan: M2 = Σ M2_r + Σ n_r (μ_r − μ)²
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        return mean, m2 / total, int(total)

    def forward(self, x: Tensor) -> Tensor:
        if not self._uses_batch_stats() or self._world_size() == 1:
            return super().forward(x)  # eval, or the local path
        self.check_input(x)
        if not getattr(self, "_channels_checked", False):
            self.check_channels_across_ranks()
        mean, var, total = self.global_stats(x)
        acc = reference.acc_dtype(x.dtype)
        invstd = torch.rsqrt(var + self.eps)
        rm, rv, nbt = self._running_buffers()
        if rm is not None and rv is not None:
            factor = BF.ema_factor(self.momentum, nbt)
            BF.update_running_stats(rm, rv, mean, var, total, factor)
        return _SyncNormalize.apply(
            x,
            self.weight,
            self.bias,
            mean.to(acc),
            invstd.to(acc),
            total,
            self.process_group,
            self.timeout,
        )


_TO_SYNC = (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


def convert_sync_batchnorm(
    module: nn.Module, process_group: Any = None, timeout: float | None = None
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (ours or torch's, exact types) and ``torch.nn.SyncBatchNorm``
    with :class:`SyncBatchNorm`, in place, sharing parameters and buffers; returns the model."""

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in _TO_SYNC:
            return None
        bn = cast(_NormBase, m)  # one of _TO_SYNC: a BN layer
        new = SyncBatchNorm(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            process_group,
            timeout,
            device="meta",
        )
        return share_state(m, new)

    return replace_modules(module, swap)
