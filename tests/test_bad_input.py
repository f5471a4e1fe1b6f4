"""User errors: a clear ValueError/TypeError naming expected vs actual, and no state changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.functional as BF


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    after = layer.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed call"


def trained(cls, c=3, **kw):
    layer = cls(c, **kw)
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
        layer.num_batches_tracked.fill_(5)
    return layer


@pytest.mark.parametrize(
    "cls,shape",
    [
        (batchnorm.BatchNorm1d, (1, 3)),
        (batchnorm.BatchNorm1d, (1, 3, 1)),
        (batchnorm.BatchNorm2d, (1, 3, 1, 1)),
        (batchnorm.BatchNorm3d, (1, 3, 1, 1, 1)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_raises_if_less_than_two_values_per_channel_in_training_and_changes_nothing(
    bn_core_backend, cls, shape, momentum
):
    layer = trained(cls, momentum=momentum)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\.eval\(\)"):
        layer(torch.randn(shape))
    assert_unchanged(layer, before)
    # torch.nn raises too, but only after bumping num_batches_tracked: ours must not
    theirs = getattr(nn, cls.__name__)(3, momentum=momentum)
    with pytest.raises(ValueError):
        theirs(torch.randn(shape))
    assert theirs.num_batches_tracked.item() == 1
    # eval mode accepts the same batch of one
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape
    assert_unchanged(layer, before)


def test_eval_without_running_stats_also_needs_two_values():
    layer = batchnorm.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count(training):
    layer = trained(batchnorm.BatchNorm2d, 3).train(training)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"expected 3 channels.*got 4.*num_features=4"):
        layer(torch.randn(2, 4, 2, 2))
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "cls,bad_shape,want",
    [
        (batchnorm.BatchNorm1d, (2, 3, 4, 4), "2-D or 3-D"),
        (batchnorm.BatchNorm1d, (3,), "2-D or 3-D"),
        (batchnorm.BatchNorm2d, (2, 3, 4), "4-D"),
        (batchnorm.BatchNorm2d, (2, 3, 4, 4, 4), "4-D"),
        (batchnorm.BatchNorm3d, (2, 3, 4, 4), "5-D"),
    ],
)
def test_wrong_number_of_dimensions_per_layer_class(cls, bad_shape, want):
    layer = trained(cls, 3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=rf"expected {want} input, got {len(bad_shape)}-D"):
        layer(torch.randn(bad_shape))
    assert_unchanged(layer, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_raise_type_error(dtype):
    layer = trained(batchnorm.BatchNorm1d, 3)
    before = snapshot(layer)
    with pytest.raises(TypeError, match=rf"floating-point tensor, got dtype {dtype}.*x\.float\(\)"):
        layer(torch.ones(4, 3, dtype=dtype))
    assert_unchanged(layer, before)
    with pytest.raises(TypeError, match="floating-point"):
        BF.batch_norm(torch.ones(4, 3, dtype=dtype), None, None, training=True)


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        batchnorm.BatchNorm1d(3)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf")])
def test_eps_must_be_positive_in_training(eps):
    """As torch: the constructor takes any eps; a training call needs eps > 0 (and finite)."""
    layer = batchnorm.BatchNorm2d(3, eps=eps)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="eps must be"):
        layer(torch.randn(4, 3, 2, 2))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k  # nothing touched
    with pytest.raises(ValueError, match="eps must be"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


def test_eps_zero_is_allowed_in_inference_as_in_torch():
    x = torch.randn(4, 3)
    ours, ref = batchnorm.BatchNorm1d(3, eps=0.0).eval(), torch.nn.BatchNorm1d(3, eps=0.0).eval()
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3), eps=-1.0)


@pytest.mark.parametrize("momentum", [-0.1, 1.01, float("nan"), "0.1"])
def test_momentum_outside_unit_interval_raises_in_constructor(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\].*decay"):
        batchnorm.BatchNorm1d(3, momentum=momentum)


@pytest.mark.parametrize("attr,value", [("momentum", 1.5), ("momentum", -1), ("eps", 0.0)])
def test_hyperparameters_changed_after_construction_are_checked_at_call_time(attr, value):
    layer = trained(batchnorm.BatchNorm1d, 3)
    setattr(layer, attr, value)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=attr):
        layer(torch.randn(4, 3))
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "name,pos", [("weight", 3), ("bias", 4), ("running_mean", 1), ("running_var", 2)]
)
def test_functional_mismatched_parameter_shape(name, pos):
    args = [torch.randn(4, 3), torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)]
    rm, rv = args[1].clone(), args[2].clone()
    args[pos] = torch.ones(5)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\).*got \(5,\)"):
        BF.batch_norm(*args, training=True)
    if pos > 2:  # the running statistics were not touched
        assert torch.equal(args[1], rm) and torch.equal(args[2], rv)


def test_functional_eval_needs_running_stats():
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_functional_running_stats_must_come_in_pairs():
    with pytest.raises(ValueError, match="both"):
        BF.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


def test_functional_cumulative_momentum_needs_counter():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        BF.batch_norm(torch.randn(4, 3), rm, rv, training=True, momentum=None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("n", [-2, 2.5, True])
def test_num_features_must_be_a_positive_int(n):
    """(0 is allowed, as torch allows it: torch's lazy layers start from it.)"""
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        batchnorm.BatchNorm1d(n)


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        batchnorm.set_backend("cuda-magic")
