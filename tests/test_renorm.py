"""BatchRenorm: equals BN at r_max=1, d_max=0; r, d clipped and constant in backward; schedule."""

import pytest
import torch

from batchnorm import BatchRenorm1d, BatchRenorm2d


def _pair(cls, tcls, c, **kw):
    torch.manual_seed(0)
    ours, ref = cls(c, **kw).double(), tcls(c).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize(
    "cls,tcls,shape",
    [
        (BatchRenorm1d, torch.nn.BatchNorm1d, (16, 5)),
        (BatchRenorm1d, torch.nn.BatchNorm1d, (8, 5, 3)),
        (BatchRenorm2d, torch.nn.BatchNorm2d, (4, 5, 3, 3)),
    ],
)
def test_renorm_with_r_max_1_d_max_0_equals_batchnorm_in_training(cls, tcls, shape):
    ours, ref = _pair(cls, tcls, shape[1], r_max=1.0, d_max=0.0)
    for step in range(3):  # running stats drift away from the batch's: r, d would matter otherwise
        x = torch.randn(*shape, dtype=torch.float64) * 3 + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), ref(x2)
        torch.testing.assert_close(y1, y2)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_renorm_output_uses_clipped_r_and_d_from_running_stats():
    torch.manual_seed(1)
    layer = BatchRenorm1d(4, r_max=2.0, d_max=0.5).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 10.0, -10.0, 0.1]))
        layer.running_var.copy_(torch.tensor([1.0, 100.0, 0.01, 1.0]))
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = layer(x)
    mu, var = x.mean(0), x.var(0, unbiased=False)
    sb, s = (var + layer.eps).sqrt(), (rv + layer.eps).sqrt()
    r = (sb / s).clamp(0.5, 2.0)
    d = ((mu - rm) / s).clamp(-0.5, 0.5)
    expect = layer.weight * ((x - mu) / sb * r + d) + layer.bias
    torch.testing.assert_close(y, expect)
    assert (r == 2.0).any() and (r == 0.5).any() and (d.abs() == 0.5).any()  # clipping exercised


def test_renorm_gradient_treats_r_and_d_as_constants():
    torch.manual_seed(2)
    layer = BatchRenorm1d(3, r_max=3.0, d_max=5.0, affine=False).double()
    with torch.no_grad():
        layer.running_mean.fill_(0.3)
        layer.running_var.fill_(2.0)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    # same r, d as constants, autograd through the batch statistics only
    xx = x.detach().clone().requires_grad_()
    mu, var = xx.mean(0), xx.var(0, unbiased=False)
    sb = (var + layer.eps).sqrt()
    s = (state["running_var"] + layer.eps).sqrt()
    r = (sb / s).clamp(1 / 3, 3).detach()
    d = ((mu - state["running_mean"]) / s).clamp(-5, 5).detach()
    (dx_ref,) = torch.autograd.grad((xx - mu) / sb * r + d, xx, g)
    torch.testing.assert_close(dx, dx_ref)


def test_renorm_schedule_relaxes_linearly_from_1_0():
    layer = BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10, relax_steps=20)
    assert layer.clip_limits(0) == (1.0, 0.0)
    assert layer.clip_limits(9) == (1.0, 0.0)
    assert layer.clip_limits(20) == pytest.approx((2.0, 2.5))
    assert layer.clip_limits(30) == (3.0, 5.0)
    assert layer.clip_limits(1000) == (3.0, 5.0)
    layer(torch.randn(4, 2))
    assert layer.num_batches_tracked.item() == 1


def test_renorm_rejects_bad_arguments_and_needs_running_stats():
    with pytest.raises(ValueError, match="r_max"):
        BatchRenorm1d(2, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        BatchRenorm1d(2, d_max=-1)
    with pytest.raises(ValueError, match="track_running_stats"):
        BatchRenorm1d(2, track_running_stats=False)
    layer = BatchRenorm2d(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 4, 3, 3))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])
