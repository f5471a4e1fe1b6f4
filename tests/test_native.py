"""The op ``torch.ops.batchnorm.batch_norm`` (csrc/bn_cpu.cpp, loaded by ops/native.py) and the
path that chooses it (ops/op.py): exact gradients to second order, what backward keeps, the
running-statistics update against torch.nn, what a failed call leaves behind, and the fallbacks
to PyTorch's kernel (no build, a failed build, ``BATCHNORM_NATIVE=0``, other devices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm as B
from batchnorm.ops import native, op, reference

pytestmark = pytest.mark.skipif(native.load() is None, reason="the C++ kernels are not built here")

CPP_NODE = "TrainFn"  # the op's autograd node: torch::autograd::CppNode<...TrainFn>
TORCH_NODE = "NativeBatchNormBackward0"


def _op(
    x,
    w=None,
    b=None,
    rm=None,
    rv=None,
    nbt=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    act=0,
    slope=0.3,
    save=1,
):
    return native.op(x, w, b, rm, rv, nbt, training, momentum, eps, act, slope, save)


def _cl(x):
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def test_the_op_is_registered_once_with_its_schema():
    registered = torch.ops.batchnorm.batch_norm.default
    args = [a.name for a in registered._schema.arguments]
    assert args == [
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "training",
        "momentum",
        "eps",
        "act",
        "slope",
        "save",
    ]
    mutated = [
        a.name
        for a in registered._schema.arguments
        if a.alias_info is not None and a.alias_info.is_write
    ]
    assert mutated == ["running_mean", "running_var", "num_batches_tracked"]


def test_the_fast_entry_is_the_registered_op():
    """native.op (the extension's unboxed dispatcher call) and torch.ops' boxed call run the same
    op: same outputs, same buffer updates, the same autograd node."""
    x = torch.randn(6, 3, 4, requires_grad=True)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    state = [torch.randn(3), torch.rand(3) + 0.5, torch.tensor(2)]
    outs = []
    for call in (native.op, torch.ops.batchnorm.batch_norm.default):
        rm, rv, nbt = (t.clone() for t in state)
        y, mean, var = call(x, w, b, rm, rv, nbt, True, 0.1, 1e-5, 0, 0.0, 1)
        outs.append((y, mean, var, rm, rv, nbt, y.grad_fn.name()))
    for a, b_ in zip(outs[0][:6], outs[1][:6], strict=True):
        assert torch.equal(a, b_)
    assert outs[0][6] == outs[1][6]
    assert not torch.equal(outs[0][3], state[0]) and int(outs[0][5]) == 3  # buffers moved
    assert native.load() is native._ext  # loaded once, then cached


# ---------------------------------------------------------------- exact gradients, two orders
def _leaves(shape, affine, cl=False):
    x = torch.randn(shape, dtype=torch.float64)
    x = (_cl(x) if cl else x).requires_grad_()
    c = shape[1]
    w = b = None
    if affine in ("both", "weight"):
        w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    if affine in ("both", "bias"):
        b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    return x, w, b


def _fn(w, b, **kw):
    """The op as a function of the tensors gradcheck perturbs (x, then γ and β when given),
    returning all three outputs so the gradients of μ_B and σ²_B are checked too."""

    def f(*ts):
        it = iter(ts)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return _op(xx, ww, bb, **kw)

    return f


@pytest.mark.parametrize("act,save", [(0, 1), (0, 0), (1, 1), (1, 0), (2, 1), (2, 0)])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_gradcheck_and_gradgradcheck_every_activation_saved_and_affine(act, save, affine, cl):
    x, w, b = _leaves((2, 3, 3, 2), affine, cl)
    inputs = tuple(t for t in (x, w, b) if t is not None)
    f = _fn(w, b, act=act, save=save)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("act,save", [(2, 0), (1, 1)])
@pytest.mark.parametrize(
    "shape,cl",
    [
        ((6, 3), False),
        ((3, 3, 4), False),
        ((2, 3, 2, 3, 2), False),
        ((2, 3, 2, 3, 2), True),
        ((2, 3, 1, 1), True),
    ],
    ids=["2d", "3d", "5d", "5d-cl", "4d-cl-1x1"],
)
def test_gradcheck_and_gradgradcheck_other_layouts(shape, cl, act, save):
    x, w, b = _leaves(shape, "both", cl)
    f = _fn(w, b, act=act, save=save)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("act,save", [(0, 1), (0, 0), (1, 1), (2, 0), (2, 1)])
@pytest.mark.parametrize("cl", [False, True])
def test_kernel_backward_equals_the_differentiable_backward(act, save, cl):
    """First-order gradients come from the kernels; with create_graph=True from ATen ops. Both
    must give the same numbers (and the reference's), here above the one-thread cut-off."""
    x, w, b = _leaves((16, 5, 30, 30), "both", cl)
    dy = torch.randn_like(x)
    y = _op(x, w, b, act=act, save=save)[0]
    kernel = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    aten = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    assert all(g.grad_fn is None for g in kernel)
    assert aten[0].grad_fn is not None and aten[1].grad_fn is not None  # dβ = Σ dz needs none
    z, mean, var = reference.forward(x.detach(), w.detach(), b.detach(), 1e-5)
    dz = dy if act == 0 else torch.where(z > 0, dy, dy * (0.0 if act == 1 else 0.3))
    ref = reference.backward(dz, x.detach(), mean, var, w.detach(), 1e-5)
    for k, a, r in zip(kernel, aten, ref, strict=True):
        torch.testing.assert_close(k, a.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(k, r, rtol=1e-10, atol=1e-10)


def test_second_order_gradient_penalty_matches_torch():
    """A gradient penalty through the op equals the same penalty through torch's kernel."""

    def penalty(fn, x, w, b):
        y = fn(x, w, b)
        (gx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w, b))

    x, w, b = _leaves((4, 3, 5, 5), "both")
    ours = penalty(lambda *a: _op(*a, act=2, save=0)[0], x, w, b)
    theirs = penalty(
        lambda x, w, b: F.leaky_relu(F.batch_norm(x, None, None, w, b, True), 0.3), x, w, b
    )
    for a, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, t)


@pytest.mark.parametrize("act,save", [(0, 1), (2, 0), (1, 1)])
def test_batched_gradients_equal_one_at_a_time(act, save):
    """autograd.grad(is_grads_batched=True) (a Jacobian's rows at once, under vmap) gives each
    row's gradient, as separate calls do."""
    x, w, b = _leaves((4, 3, 5, 2), "both", cl=True)
    y = _op(x, w, b, act=act, save=save)[0]
    dys = torch.randn(3, *y.shape, dtype=y.dtype)
    batched = torch.autograd.grad(y, (x, w, b), dys, retain_graph=True, is_grads_batched=True)
    for i, dy in enumerate(dys):
        single = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        for bt, st in zip(batched, single, strict=True):
            torch.testing.assert_close(bt[i], st, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("save", [0, 1])
@pytest.mark.parametrize("needs", ["w", "b", "xb", "wb", "xw"])
def test_only_the_inputs_that_need_a_gradient_get_one(needs, save):
    """A frozen γ, or a data input without gradient (a network's first BN): the node's edges are
    exactly the tensors given, and each gradient lands on its own input."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    mean, var = reference.batch_stats(x)
    want = dict(zip("xwb", reference.backward(dy, x, mean, var, w, 1e-5), strict=True))
    ts = {k: t.clone().requires_grad_(k in needs) for k, t in zip("xwb", (x, w, b), strict=True)}
    _op(ts["x"], ts["w"], ts["b"], save=save)[0].backward(dy)
    for k, t in ts.items():
        if k in needs:
            torch.testing.assert_close(t.grad, want[k], rtol=1e-10, atol=1e-10)
        else:
            assert t.grad is None


# ---------------------------------------------------------------- what backward keeps
def _saved(act, save, w, x, slope=0.1):
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = _op(x, w, torch.zeros_like(w), act=act, slope=slope, save=save)[0]
    return y, [t for t in seen if t.shape == x.shape]


@pytest.mark.parametrize(
    "act,save,keeps", [(0, 1, "x"), (1, 1, "x"), (2, 1, "x"), (1, 0, "x"), (2, 0, "y"), (0, 0, "y")]
)
def test_one_activation_sized_tensor_is_saved(act, save, keeps):
    x = torch.randn(8, 6, 5, 5, requires_grad=True)
    w = torch.ones(6, requires_grad=True)
    y, big = _saved(act, save, w, x)
    assert len(big) == 1
    assert big[0].data_ptr() == (x if keeps == "x" else y).data_ptr()
    if keeps == "y":  # γ ≈ 0 cannot be inverted: the op keeps x instead
        with torch.no_grad():
            w[2] = 1e-9
        y, big = _saved(act, save, w, x)
        assert [t.data_ptr() for t in big] == [x.data_ptr()]


def test_the_invertibility_threshold_depends_on_the_dtype():
    """|γ| = 0.05 keeps ~5 of float32's 7 digits in x̂ (y kept), but not bfloat16's 2-3 (x kept)."""
    for dtype, keeps_y in ((torch.float32, True), (torch.bfloat16, False)):
        x = torch.randn(4, 3, 4, 4).to(dtype).requires_grad_()
        w = torch.full((3,), 0.05, requires_grad=True)
        y, big = _saved(2, 0, w, x)
        assert [t.data_ptr() for t in big] == [(y if keeps_y else x).data_ptr()]


@pytest.mark.parametrize("act,save,keeps", [(0, 1, "x"), (1, 0, "x"), (2, 0, "y")])
def test_modifying_the_saved_tensor_in_place_is_caught(act, save, keeps):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    xi = x * 1  # a non-leaf, which may change in place
    y = _op(xi, w, None, act=act, save=save)[0]
    loss = y.sum()
    (xi if keeps == "x" else y).add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- running statistics
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,cl", [((6, 5, 4, 3), False), ((6, 5, 4, 3), True), ((12, 5), False)]
)
def test_op_running_statistics_and_counter_match_torch_nn(momentum, dtype, shape, cl):
    layer = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    ref = layer(5, momentum=momentum).to(dtype)
    rm, rv, nbt = torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype), torch.tensor(0)
    w, b = ref.weight.detach(), ref.bias.detach()
    versions = rm._version, rv._version, nbt._version
    for step in range(4):
        x = torch.randn(shape, dtype=dtype) * (step + 1) + step
        x = _cl(x) if cl else x
        m = -1.0 if momentum is None else momentum
        y = _op(x, w, b, rm, rv, nbt, momentum=m)[0]
        torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(rm, ref.running_mean)
    torch.testing.assert_close(rv, ref.running_var)
    assert int(nbt) == int(ref.num_batches_tracked) == 4
    # written in place: autograd sees each update as an in-place op would make it see it
    assert rm._version > versions[0] and rv._version > versions[1] and nbt._version > versions[2]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_running_statistics_and_counter_match_torch_nn(momentum, dtype):
    ours = B.BatchNorm2d(5, momentum=momentum).to(dtype)
    ref = nn.BatchNorm2d(5, momentum=momentum).to(dtype)
    for step in range(4):
        x = (torch.randn(6, 5, 4, 3, dtype=dtype) * (step + 1) + step).requires_grad_()
        y = ours(x)
        assert CPP_NODE in y.grad_fn.name()  # the C++ op ran
        torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4


def test_bfloat16_layer_matches_torch_nn():
    ours, ref = B.BatchNorm2d(3).bfloat16(), nn.BatchNorm2d(3).bfloat16()
    for _ in range(3):
        x = torch.randn(8, 3, 5, 5).bfloat16()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert CPP_NODE in ya.grad_fn.name()
        torch.testing.assert_close(ya, yb, atol=2e-2, rtol=2e-2)
        ya.backward(torch.ones_like(ya) * x)
        yb.backward(torch.ones_like(yb) * x)
        torch.testing.assert_close(xa.grad, xb.grad, atol=5e-2, rtol=5e-2)
    for name in ("running_mean", "running_var"):  # bfloat16 buffers: one rounding apart at most
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=8e-3, rtol=8e-3)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_training_without_autograd_matches_torch_nn(context):
    """Below autograd (inference mode) the same kernel updates the buffers as torch.nn does."""
    ours, ref = B.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3, momentum=None)
    guard = torch.no_grad if context == "no_grad" else torch.inference_mode
    with guard():
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5)
            torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_bfloat16_and_strided_running_buffers_take_the_torch_op_update():
    """Buffers the raw float32/float64 loop cannot write (bfloat16, a strided view) are updated
    with torch ops: the same EMA as F.batch_norm's."""
    x = torch.randn(16, 3, 4, 4)
    rm, rv = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    _op(x.bfloat16(), None, None, rm, rv, momentum=1.0)
    want_m, want_v = reference.batch_stats(x.bfloat16().double())
    torch.testing.assert_close(rm.double(), want_m, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rv.double(), want_v * 256 / 255, atol=2e-2, rtol=2e-2)

    store_m, store_v = torch.zeros(6), torch.ones(6)
    ref_m, ref_v = torch.zeros(3), torch.ones(3)
    for _ in range(2):
        _op(x, None, None, store_m[::2], store_v[::2], momentum=0.3)
        F.batch_norm(x, ref_m, ref_v, None, None, True, 0.3)
    torch.testing.assert_close(store_m[::2], ref_m)
    torch.testing.assert_close(store_v[::2], ref_v)
    assert torch.equal(store_m[1::2], torch.zeros(3)) and torch.equal(store_v[1::2], torch.ones(3))


def test_a_failed_call_touches_no_buffer():
    x = torch.randn(4, 3, 2, 2)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(5)
    before = [(t.clone(), t._version) for t in (rm, rv, nbt)]
    bad = [
        (ValueError, r"shape \(3,\)", dict(x=x, w=torch.ones(4))),  # wrong-shaped weight
        (ValueError, r"shape \(3,\)", dict(x=x, b=torch.ones(3, 1))),  # wrong-shaped bias
        (ValueError, "Half", dict(x=x.half())),  # a dtype the kernels do not take
        (ValueError, "channels_last", dict(x=x.transpose(0, 2))),  # odd strides
        (ValueError, "more than 1 value per channel", dict(x=torch.randn(1, 3))),
        (ValueError, "more than 1 value per channel", dict(x=torch.randn(1, 3, 1, 1))),
        (ValueError, "num_batches_tracked", dict(x=x, nbt=None, momentum=-1.0)),
    ]
    for exc, msg, kw in bad:
        args = dict(w=None, b=None, rm=rm, rv=rv, nbt=nbt) | kw
        with pytest.raises(exc, match=msg):
            _op(args.pop("x"), **args)
    with pytest.raises(ValueError, match=r"running_var must be a CPU tensor of shape \(3,\)"):
        _op(x, None, None, rm, torch.ones(4), nbt)
    with pytest.raises(ValueError, match="both be tensors or both be None"):
        _op(x, None, None, rm, None, nbt)
    with pytest.raises(RuntimeError, match="no gradient"):  # inference needs no-grad calls
        _op(x.requires_grad_(), None, None, rm, rv, nbt, training=False)
    for t, (value, version) in zip((rm, rv, nbt), before, strict=True):
        assert torch.equal(t, value) and t._version == version


# ---------------------------------------------------------------- the dispatch in ops/op.py
def test_fast_path_takes_exactly_what_the_kernels_compute():
    x = torch.randn(4, 3, 5, 5)
    w, b = torch.ones(3), torch.zeros(3)
    takes = [
        (x, w, b),
        (_cl(x), w, b),
        (x.double(), w.double(), b.double()),
        (x.bfloat16(), w.bfloat16(), b.bfloat16()),
        (x.bfloat16(), w, b),  # bf16: float32 params
        (torch.randn(4, 3), None, None),
        (_cl(torch.randn(2, 3, 2, 2, 2)), None, None),
        (x, nn.Parameter(w), nn.Parameter(b)),
    ]
    for args in takes:
        assert op.fast_path_applies(*args, None, None), args[0].shape
    declines = [
        (x.half(), None, None),  # float16: torch's kernel
        (x.transpose(0, 2), None, None),  # neither contiguous nor channels_last
        (torch.randn(3), None, None),
        (torch.randn(2, 3, 1, 1, 1, 2), None, None),  # rank 1, 6
        (torch.randn(0, 3, 2), None, None),  # empty
        (x, w.double(), b),  # γ in another dtype
        (x.double(), w, b),  # float32 γ with float64 input: only bfloat16 input mixes
        (x, w.to("meta"), b),  # γ elsewhere
        (nn.Parameter(x), None, None),  # a tensor subclass
    ]
    for args in declines:
        assert not op.fast_path_applies(*args, None, None)
    assert not op.fast_path_applies(x, None, None, torch.zeros(3, dtype=torch.float64), None)
    old = op.set_backend("torch")
    try:
        assert not op.fast_path_applies(x, w, b, None, None)
    finally:
        op.set_backend(old)
    with pytest.raises(ValueError, match="backend must be one of"):
        op.set_backend("numba")


def test_other_devices_never_trigger_the_build(monkeypatch):
    """Only a CPU input may build or load the extension: a meta (or CUDA) input, or one the kernels
    do not take, is decided without it."""

    def forbidden(*_a, **_k):
        raise AssertionError("native.load() was called")

    monkeypatch.setattr(native, "load", forbidden)
    meta = torch.empty(4, 3, 2, 2, device="meta")
    assert not op.fast_path_applies(meta, None, None, None, None)
    assert not op.fast_path_applies(torch.randn(4, 3).half(), None, None, None, None)
    assert op.fast_batch_norm(meta, None, None, None, None, True, 0.1, 1e-5) is None
    layer = B.BatchNorm2d(3, device="meta")
    y = layer(meta)
    assert y.device.type == "meta" and y.shape == meta.shape
    y_train = op.batch_norm_train(meta, None, None, 1e-5)
    assert all(t.device.type == "meta" for t in y_train)


def test_inference_uses_the_op_only_without_gradients(monkeypatch):
    calls = []
    real = native._ext.batch_norm

    def spy(*args):
        calls.append(args[6])  # training
        return real(*args)

    monkeypatch.setattr(native._ext, "batch_norm", spy)
    ours, ref = B.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    ours(x), ref(x)
    assert calls == [True]
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert calls == [True, False]
    xg = x.clone().requires_grad_()
    y = ours(xg)  # needs a gradient: torch's kernel, whose backward handles eval
    assert calls == [True, False] and y.grad_fn.name() == TORCH_NODE
    torch.testing.assert_close(y, ref(x))


def test_batch_norm_train_statistics_on_both_paths():
    x = torch.randn(8, 4, 6, 6) * 2 + 3
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    ym = reference.forward(x.double(), w.double(), b.double(), 1e-5)[0]
    for xx, tol in ((x, 1e-5), (x.half(), 2e-3)):  # float16: torch.native_batch_norm
        y, mean, var = op.batch_norm_train(xx, w.to(xx.dtype), b.to(xx.dtype), 1e-5)
        assert var.dtype == torch.float64 and y.dtype == xx.dtype
        mr, vr = reference.batch_stats(xx.double())
        torch.testing.assert_close(mean.double(), mr, rtol=tol, atol=tol)
        torch.testing.assert_close(var, vr, rtol=tol, atol=tol)
        torch.testing.assert_close(y.double(), ym, rtol=tol * 10, atol=tol * 10)


def test_large_batch_matches_float64_truth():
    """Above the one-thread cut-off (several work items and threads) the fused layer stays within
    float32 accuracy of torch's kernel run in float64: dγ, dβ sum 25,600 terms of size ~4."""
    x = torch.randn(64, 8, 20, 20) * 2 + 3
    g = torch.randn_like(x)

    def run(backend, dtype):
        old = op.set_backend(backend)
        try:
            bn = B.BatchNormAct2d(8, "leaky_relu", negative_slope=0.2).to(dtype)
            xg = x.to(dtype, copy=True).requires_grad_()
            y = bn(xg)
            assert (CPP_NODE in y.grad_fn.name()) == (backend == "auto")
            y.backward(g.to(dtype))
            return [
                t.double()
                for t in (
                    y.detach(),
                    xg.grad,
                    bn.weight.grad,
                    bn.bias.grad,
                    bn.running_mean,
                    bn.running_var,
                )
            ]
        finally:
            op.set_backend(old)

    truth = run("torch", torch.float64)
    got = run("auto", torch.float32)
    for i, (a, t) in enumerate(zip(got, truth, strict=True)):
        atol = 2e-3 if i in (2, 3) else 2e-5  # parameter gradients: float32 sums of 25,600 terms
        torch.testing.assert_close(a, t, rtol=1e-4, atol=atol, msg=f"output {i}")


# ---------------------------------------------------------------- without the extension
def test_a_failed_build_warns_once_and_the_layers_fall_back_to_torch(monkeypatch):
    """No compiler (or ninja): one RuntimeWarning naming the fix, then torch's kernel everywhere,
    with torch.nn's numbers."""
    from torch.utils import cpp_extension

    def broken(*_a, **_k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(native, "_built", lambda name: True)
    monkeypatch.setattr(native, "_ext", False)  # not tried yet (restored after the test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load() is None
        assert native.load() is None  # tried once: no second build, no second warning
        ours, ref = B.BatchNormAct2d(3, "relu"), nn.BatchNorm2d(3)
        x = torch.randn(4, 3, 5, 5)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), F.relu(ref(xb))
        assert not op.fast_path_applies(x, None, None, None, None)
        assert op.fast_batch_norm(x, None, None, None, None, True, 0.1, 1e-5) is None
        assert ya.grad_fn.next_functions[0][0].name() == TORCH_NODE  # relu over torch's BN
        ya.sum().backward()
        yb.sum().backward()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "could not be built" in msgs[0] and "pip install ninja" in msgs[0]
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 1


def test_invalid_env_switch_raises(monkeypatch):
    for raw, on in (("0", False), ("off", False), (" No ", False), ("1", True), ("TRUE", True)):
        monkeypatch.setenv("BATCHNORM_NATIVE", raw)
        assert native.enabled() is on
    monkeypatch.setenv("BATCHNORM_NATIVE", "maybe")
    with pytest.raises(ValueError, match="BATCHNORM_NATIVE must be one of"):
        native.enabled()
    monkeypatch.setattr(native, "_ext", False)
    with pytest.raises(ValueError, match="BATCHNORM_NATIVE"):
        native.load()
    monkeypatch.setattr(native, "_ext", False)
    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert native.load() is None


def test_env_switch_off_in_a_fresh_process_gives_torch_nn_numbers():
    """``BATCHNORM_NATIVE=0``: nothing is built or loaded, no warning, and every layer equals
    torch.nn (torch's kernel), running statistics and gradients included."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import torch
        from torch import nn
        import batchnorm as B
        from batchnorm.ops import buffers, native, op
        torch.manual_seed(0)
        for ours, ref, shape in ((B.BatchNorm2d(3), nn.BatchNorm2d(3), (4, 3, 5, 5)),
                                 (B.BatchNorm1d(3, momentum=None),
                                  nn.BatchNorm1d(3, momentum=None), (8, 3))):
            for _ in range(2):
                x = torch.randn(shape)
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = ours(xa), ref(xb)
                assert ya.grad_fn.name() == "NativeBatchNormBackward0", ya.grad_fn.name()
                assert torch.equal(ya, yb)
                ya.sum().backward()
                yb.sum().backward()
                assert torch.equal(xa.grad, xb.grad)
            assert torch.equal(ours.running_mean, ref.running_mean)
            assert torch.equal(ours.running_var, ref.running_var)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
            ours.eval(), ref.eval()
            with torch.no_grad():
                assert torch.equal(ours(x), ref(x))
        assert native.load() is None and native._ext is None
        assert not op.fast_path_applies(torch.randn(4, 3), None, None, None, None)
        info = buffers.info()
        assert info["limit"] == 3 << 20 and info["hits"] == info["misses"] == 0, info
        print("OK")
    """)
    env = dict(os.environ, BATCHNORM_NATIVE="0", BATCHNORM_CPU_CACHE_MB="3")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]
    assert "compiling" not in out.stderr


def test_a_build_is_announced_when_none_is_newer_than_the_source(monkeypatch, tmp_path):
    """The "compiling" line shows for a first build and for a rebuild after the source changed."""
    import os

    from torch.utils import cpp_extension

    src, build = tmp_path / "bn_cpu.cpp", tmp_path / "build"
    build.mkdir()
    src.write_text("//")
    monkeypatch.setattr(native, "SOURCE", src)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(build))
    assert not native._built("x")  # no build at all
    so = build / "x.so"
    so.write_text("")
    os.utime(so, (src.stat().st_mtime - 10, src.stat().st_mtime - 10))
    assert not native._built("x")  # older than the source: ninja will rebuild
    os.utime(so, (src.stat().st_mtime + 10, src.stat().st_mtime + 10))
    assert native._built("x")
