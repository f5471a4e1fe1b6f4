"""``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature: input checks, then dispatch.

Running statistics (Algorithm 2 convention, as PyTorch does it): the batch is normalized with
its *biased* variance σ²_B, and the running estimate stores the *unbiased* m/(m−1)·σ²_B:

    running_mean ← (1 − momentum)·running_mean + momentum·μ_B
    running_var  ← (1 − momentum)·running_var  + momentum·m/(m−1)·σ²_B

``momentum`` is PyTorch's convention (weight of the new batch). Keras and Flax call
``1 − momentum`` the "decay"; :func:`momentum_from_decay` / :func:`decay_from_momentum` convert.
``momentum=None`` gives the cumulative average (factor 1/t for the t-th batch), which needs the
``num_batches_tracked`` counter. Every check runs before any state is touched: a failed call
leaves every buffer exactly as it was.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .ops import op, reference

__all__ = [
    "BatchNormInputError",
    "BatchNormTypeError",
    "batch_norm",
    "check_input",
    "decay_from_momentum",
    "ema_factor",
    "momentum_from_decay",
    "update_running_stats",
]


class BatchNormInputError(ValueError, RuntimeError):
    """Input a BN layer cannot normalize (rank, channel count, one value per channel, shapes of
    γ, β and the running statistics). Both a ValueError and a RuntimeError: torch.nn raises one or
    the other for the same misuse, so ``except`` clauses written for torch.nn keep working."""


class BatchNormTypeError(TypeError, RuntimeError):
    """Input of a type a BN layer cannot normalize (not a tensor, not floating point). Both a
    TypeError and the RuntimeError torch raises for an integer input."""


def momentum_from_decay(decay: float) -> float:
    """Keras/Flax moving-average ``decay`` (e.g. 0.99) → PyTorch ``momentum`` (0.01)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return 1.0 - decay


def decay_from_momentum(momentum: float) -> float:
    """PyTorch ``momentum`` (e.g. 0.1) → Keras/Flax moving-average ``decay`` (0.9)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return 1.0 - momentum


def _is_real(v: object) -> bool:
    """A real number (Python or NumPy scalar), but not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_hyperparameters(eps: float, momentum: float | None, training: bool = True) -> None:
    """:func:`check_eps`, and ``momentum`` in [0, 1] or None (the layers' check; ``batch_norm``
    takes any momentum, as torch's does)."""
    check_eps(eps, training)
    check_momentum(momentum)


def check_momentum(momentum: float | None) -> None:
    """``momentum`` in [0, 1] or None, else a ValueError that says what to pass."""
    if momentum is not None and (not _is_real(momentum) or not 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"momentum must be in [0, 1] (PyTorch convention: weight of the new batch) or None "
            f"for a cumulative average, got {momentum!r}; a Keras/Flax decay d is momentum 1 - d"
        )


def check_eps(eps: float, training: bool = True) -> None:
    """As torch: ``eps`` > 0 in training, ≥ 0 in inference (and finite, a number)."""
    if not _is_real(eps) or math.isnan(eps) or eps == math.inf:
        raise ValueError(f"batch_norm eps must be a finite number (e.g. 1e-5), got {eps!r}")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training (e.g. 1e-5), got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, got {eps}")


def check_input(
    x: Tensor,
    num_features: int | None = None,
    dims: tuple[int, ...] | None = None,
    training: bool = False,
    layer: str = "batch_norm",
) -> None:
    """Raise a clear :class:`BatchNormTypeError` / :class:`BatchNormInputError` for input a BN
    layer cannot normalize."""
    if not isinstance(x, Tensor):
        raise BatchNormTypeError(f"{layer}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise BatchNormTypeError(
            f"{layer}: expected a floating-point tensor, got dtype {x.dtype}; "
            f"convert it first, e.g. x.float()"
        )
    if dims is not None and x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise BatchNormInputError(
            f"{layer}: expected {want} input, got {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    if x.dim() < 2 and x.numel() > 0:  # an empty tensor is torch's kernel's to define
        raise BatchNormInputError(
            f"{layer}: expected input of shape (N, C, ...), got shape {tuple(x.shape)}; "
            f"add a batch axis with x.unsqueeze(0)"
        )
    # num_features 0: a lazy layer loaded from a checkpoint keeps it; its tensors say the count
    if num_features and x.shape[1] != num_features:
        raise BatchNormInputError(
            f"{layer}: expected {num_features} channels (axis 1), got {x.shape[1]} in input of "
            f"shape {tuple(x.shape)}; set num_features={x.shape[1]} or fix the layer before"
        )
    if training and reference.values_per_channel(x) == 1:
        raise BatchNormInputError(
            f"{layer}: training needs more than 1 value per channel to compute a variance, got "
            f"input of shape {tuple(x.shape)}; use a batch of at least 2, or call .eval() to use "
            f"the running statistics"
        )


def _check_param(name: str, t: Tensor | None, c: int) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != c):
        raise BatchNormInputError(
            f"{name} must have shape ({c},) to match the input's {c} channels, got {tuple(t.shape)}"
        )


def check_counter(num_batches_tracked: Tensor) -> None:
    """The cumulative average (momentum=None) weighs the t-th batch by 1/t: a negative counter
    would make that weight negative or infinite, and the running statistics with it."""
    if int(num_batches_tracked) < 0:
        raise BatchNormInputError(
            f"num_batches_tracked is {int(num_batches_tracked)}, but momentum=None (cumulative "
            f"average) counts batches from 0; reset it with layer.reset_running_stats() or "
            f"num_batches_tracked.zero_()"
        )


def ema_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """Count this batch in ``num_batches_tracked`` (when given) and return the EMA weight of the
    batch: ``momentum``, or 1/t for the t-th batch when ``momentum`` is None (cumulative average)."""
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    assert num_batches_tracked is not None, "momentum=None (cumulative average) needs a counter"
    return 1.0 / float(num_batches_tracked.item())


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    m: int,
    factor: float,
) -> None:
    """EMA step with the unbiased batch variance m/(m−1)·σ²_B (in place, no autograd)."""
    with torch.no_grad():
        unbiased = var * (m / (m - 1))
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_(unbiased.to(running_var.dtype), factor)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``torch.nn.functional.batch_norm``.

    In training the batch statistics normalize ``input`` and, when ``running_mean``/``running_var``
    are given, update them in place; otherwise the running statistics are used (inference).
    ``momentum=None`` averages cumulatively and requires ``num_batches_tracked`` (incremented here
    in training, as the layers do).
    """
    proxy = isinstance(input, torch.fx.Proxy)  # torch.fx tracing: record torch's op
    if not proxy:
        check_eps(eps, training)
        check_input(input, training=training)
    if proxy or input.dim() < 2:  # (an empty (0,) input: torch's kernel defines the result)
        return op.torch_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked,
        )
    c = input.shape[1]
    _check_param("weight", weight, c)
    _check_param("bias", bias, c)
    _check_param("running_mean", running_mean, c)
    _check_param("running_var", running_var, c)
    if (running_mean is None) != (running_var is None):
        raise BatchNormInputError(
            "running_mean and running_var must both be tensors or both be None"
        )
    if not training and running_mean is None:
        raise BatchNormInputError(
            "batch_norm in eval mode (training=False) needs running_mean and running_var; "
            "pass them, or use training=True to normalize with batch statistics"
        )
    if training and running_mean is not None and momentum is None:
        if num_batches_tracked is None:
            raise BatchNormInputError(
                "momentum=None (cumulative average) needs num_batches_tracked"
            )
        check_counter(num_batches_tracked)

    y = op.fast_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
    )
    if y is not None:
        return y
    return op.torch_batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
    )
