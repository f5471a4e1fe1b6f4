"""GhostBatchNorm: per-chunk BN in training, pooled chunk statistics for the running estimate."""

import pytest
import torch

from batchnorm import GhostBatchNorm1d, GhostBatchNorm2d
from batchnorm.ops import reference


@pytest.mark.parametrize(
    "cls,shape,vbs",
    [
        (GhostBatchNorm1d, (24, 4), 8),
        (GhostBatchNorm1d, (20, 4, 3), 6),  # uneven: chunks 6, 6, 6, 2
        (GhostBatchNorm2d, (10, 3, 4, 4), 4),  # chunks 4, 4, 2
    ],
)
def test_ghost_equals_batchnorm_applied_per_chunk(cls, shape, vbs):
    torch.manual_seed(0)
    layer = cls(shape[1], virtual_batch_size=vbs, momentum=0.3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    ref = torch.nn.BatchNorm1d(shape[1]) if len(shape) < 4 else torch.nn.BatchNorm2d(shape[1])
    ref = ref.double()
    ref.load_state_dict(layer.state_dict())
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    y = layer(x)
    xr = x.detach().clone().requires_grad_()
    y_ref = torch.cat([ref(c) for c in torch.split(xr, vbs)])
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    # running stats: one EMA step with the pooled chunk statistics
    chunks = list(torch.split(x.detach(), vbs))
    ms = [reference.values_per_channel(c) for c in chunks]
    stats = [reference.batch_stats(c) for c in chunks]
    mean = sum(m * mu for m, (mu, _) in zip(ms, stats, strict=True)) / sum(ms)
    var = sum(m * v for m, (_, v) in zip(ms, stats, strict=True)) / sum(m - 1 for m in ms)
    torch.testing.assert_close(layer.running_mean, 0.3 * mean)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * var)
    assert layer.num_batches_tracked.item() == 1


def test_ghost_with_equal_chunks_running_stats_are_average_of_chunk_stats():
    torch.manual_seed(1)
    layer = GhostBatchNorm1d(3, virtual_batch_size=5, momentum=1.0).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    layer(x)
    chunks = x.split(5)
    torch.testing.assert_close(layer.running_mean, torch.stack([c.mean(0) for c in chunks]).mean(0))
    torch.testing.assert_close(layer.running_var, torch.stack([c.var(0) for c in chunks]).mean(0))


def test_ghost_merges_a_last_chunk_of_one_and_eval_uses_running_stats():
    layer = GhostBatchNorm1d(2, virtual_batch_size=4)
    assert [len(c) for c in layer.chunks(torch.randn(9, 2))] == [4, 5]
    layer(torch.randn(9, 2))  # would fail on a chunk of one example
    layer.eval()
    x = torch.randn(3, 2)
    expect = (x - layer.running_mean) / (layer.running_var + layer.eps).sqrt()
    torch.testing.assert_close(layer(x), expect)


def test_ghost_batch_smaller_than_virtual_size_is_plain_batchnorm():
    torch.manual_seed(2)
    layer, ref = GhostBatchNorm2d(3, virtual_batch_size=64), torch.nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_ghost_rejects_bad_virtual_batch_size():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(2, virtual_batch_size=0)
