"""torch.compile (fullgraph: no graph breaks through the layers, which hand torch's kernel to the
compiler) and torch.export."""

from __future__ import annotations

import torch
from torch import nn

import batchnorm


def tiny_model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        batchnorm.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )


def test_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    eager = tiny_model()
    compiled_src = tiny_model()
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 4, 4)
    y_eager = eager(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (n, a), (_, b) in zip(
        compiled_src.named_parameters(), eager.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    bn_c, bn_e = compiled_src[1], eager[1]
    torch.testing.assert_close(bn_c.running_mean, bn_e.running_mean)
    torch.testing.assert_close(bn_c.running_var, bn_e.running_var)
    assert bn_c.num_batches_tracked.item() == bn_e.num_batches_tracked.item() == 1
    compiled_src.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x))


def test_compile_inductor_training_step():
    torch._dynamo.reset()
    layer = batchnorm.BatchNorm1d(3)
    ref = batchnorm.BatchNorm1d(3)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(6, 3, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    compiled(x).pow(3).sum().backward()
    ref(xr).pow(3).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_export_eval_and_training_graphs():
    model = tiny_model().eval()
    x = torch.randn(2, 2, 4, 4)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x))
    model.train()
    ref = tiny_model()
    ref.load_state_dict(model.state_dict())
    ep = torch.export.export(model, (x,))
    assert any("batch_norm" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), ref(x))
