"""The C++ CPU kernels behind ``torch.ops.batchnorm.batch_norm`` (csrc/bn_cpu.cpp), called through
the op: the training forward (y, μ_B, σ²_B), the first-order backward (dL/dx, dL/dγ, dL/dβ) and
the inference forward, against the paper's equations in float64 (``ops/reference.py``) and against
PyTorch's own kernel in float32 and bfloat16, over both layouts (planes and rows), every fused
activation and both saved tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchnorm.ops import native, reference

pytestmark = pytest.mark.skipif(native.load() is None, reason="the C++ kernels are not built here")

EPS = 1e-5
SLOPE = 0.2
# (shape, channels_last): odd sizes, N=2, H=1, a plane longer than one 4096-value block, rows
# layouts long enough for several sub-blocks, sizes above the one-thread cut-off (2^16 values).
CASES = [
    ((2, 3), False),
    ((7, 5, 3), False),
    ((2, 3, 1, 5), False),
    ((3, 5, 7, 9), False),
    ((3, 5, 7, 9), True),
    ((2, 3, 1, 1), True),
    ((2, 4, 3, 5, 6), False),
    ((2, 4, 3, 5, 6), True),
    ((2, 3, 9000), False),  # one plane of several 4096-value blocks
    ((4, 3, 120, 120), False),  # large planes, several threads
    ((4, 3, 120, 120), True),  # large rows layout (channels_last)
    ((9000, 7), False),  # (N, C): rows, many sub-blocks
    ((37, 3, 10, 10), False),  # short planes: several samples of one channel per work item
    ((130, 6, 9, 11), False),  # the same above the one-thread cut-off, last item partial
    ((40, 6, 4, 4, 7), True),  # channels_last_3d above the one-thread cut-off
    ((4, 16, 40, 40), False),  # channels enough for one sweep per channel (bn_cpu.cpp: sweeps)
    ((2, 8, 70, 70), False),  # the same with planes of two blocks
]
IDS = [f"{'x'.join(map(str, s))}{'-cl' if cl else ''}" for s, cl in CASES]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2}
ACT_SAVE = [(0, 1), (0, 0), (1, 1), (1, 0), (2, 1), (2, 0)]


def _fmt(x):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _like(t, x):
    """t laid out as x is (contiguous or channels_last)."""
    return t.contiguous() if x.is_contiguous() else t.contiguous(memory_format=_fmt(x))


def _make(shape, cl, dtype, seed=0, offset=1.0, pdtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
    if cl:
        x = x.contiguous(memory_format=_fmt(x))
    c = shape[1]
    pdtype = pdtype or dtype
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pdtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(pdtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, _like(dy, x)


def _close(a, b, tol, what=""):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1.0)
    err = (a - b).abs().max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _op(
    x,
    w,
    b,
    act=0,
    save=1,
    eps=EPS,
    training=True,
    rm=None,
    rv=None,
    nbt=None,
    momentum=0.1,
    slope=SLOPE,
):
    return native.op(x, w, b, rm, rv, nbt, training, momentum, eps, act, slope, save)


def _kernel_run(x, w, b, dy, act=0, save=1, eps=EPS):
    """(y, μ_B, σ²_B) and the first-order gradients (dx, dγ, dβ) of the op (the kernels: no
    create_graph). Parameters that are None take no gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y, mean, var = _op(*leaves, act=act, save=save, eps=eps)
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wrt, dy))
    return (
        y.detach(),
        mean.detach(),
        var.detach(),
        *[next(grads) if t is not None else None for t in leaves],
    )


def _act(z, act):
    return z if act == 0 else torch.where(z > 0, z, z * (0.0 if act == 1 else SLOPE))


def _act_ref(z, dy, act, y_kernel):
    """act(z) in float64 and dL/dz. The kernel-side mask (where its own output is positive) picks
    the branch, so an element whose pre-activation rounds to the other side of 0 in float32 does
    not count as a gradient error; the forward values are still compared against act(z_ref)."""
    if act == 0:
        return z, dy
    pos = y_kernel.double() > 0
    return _act(z, act), torch.where(pos, dy, dy * (0.0 if act == 1 else SLOPE))


def _reference_run(x, w, b, dy, act, y_kernel, eps=EPS):
    """The paper's equations in float64 on the same (rounded) input."""
    xd, dyd = x.double(), dy.double()
    wd = w.double() if w is not None else None
    bd = b.double() if b is not None else None
    z, mean, var = reference.forward(xd, wd, bd, eps)
    y, dz = _act_ref(z, dyd, act, y_kernel)
    dx, dg, db = reference.backward(dz, xd, mean, var, wd, eps)
    return y, mean, var, dx, dg, db


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,cl", CASES, ids=IDS)
def test_forward_backward_match_reference(shape, cl, dtype):
    x, w, b, dy = _make(shape, cl, dtype)
    y, mean, var, dx, dg, db = _kernel_run(x, w, b, dy)
    yr, mr, vr, dxr, dgr, dbr = _reference_run(x, w, b, dy, 0, y)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == var.shape == (shape[1],)
    tol = TOL[dtype]
    _close(mean, mr, tol / 10, "mean")
    _close(var, vr, tol / 10, "var")
    _close(y, yr, tol, "y")
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    assert dg.dtype == db.dtype == w.dtype
    _close(dx, dxr, tol, "dx")
    _close(dg, dgr, tol, "dgamma")
    _close(db, dbr, tol, "dbeta")


# Both layouts, short and long planes and rows, 4-D and 5-D, one thread and several.
ACT_CASES = [CASES[i] for i in (1, 3, 4, 7, 9, 10, 11, 13, 14)]
ACT_IDS = [IDS[i] for i in (1, 3, 4, 7, 9, 10, 11, 13, 14)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act,save", ACT_SAVE)
@pytest.mark.parametrize("shape,cl", ACT_CASES, ids=ACT_IDS)
def test_fused_activation_and_saved_tensor_match_reference(shape, cl, act, save, dtype):
    """act 0/1/2 with save 0 (y kept and inverted where γ allows: identity, leaky ReLU) or 1
    (x kept, the activation's mask recomputed from it)."""
    x, w, b, dy = _make(shape, cl, dtype, seed=3)
    y, mean, var, dx, dg, db = _kernel_run(x, w, b, dy, act=act, save=save)
    yr, mr, vr, dxr, dgr, dbr = _reference_run(x, w, b, dy, act, y)
    tol = TOL[dtype]
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    if act == 1:
        assert (y >= 0).all() and (y == 0).any()
    if act == 2:
        assert (y < 0).any()
    _close(mean, mr, tol / 10, "mean")
    _close(var, vr, tol / 10, "var")
    _close(y, yr, tol, "y")
    _close(dx, dxr, tol, "dx")
    _close(dg, dgr, tol, "dgamma")
    _close(db, dbr, tol, "dbeta")


def _torch_run(x, w, b, dy, act, y_kernel, eps=EPS):
    """PyTorch's kernel on the same input, with its gradients. The activation's branch is taken
    where the op's own output says (its sign), so that an element whose pre-activation rounds to
    the other side of 0 in torch's arithmetic compares the BN numerics, not a coin flip at z = 0;
    the test checks separately that such elements have z ≈ 0."""
    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, w, b))
    z = F.batch_norm(xt, None, None, wt, bt, True, 0.0, eps)
    if act:
        z = torch.where(y_kernel > 0, z, z * (0.0 if act == 1 else SLOPE))
    dx, dg, db = torch.autograd.grad(z, (xt, wt, bt), dy)
    y_own = F.batch_norm(x, None, None, w, b, True, 0.0, eps)  # torch's own activation
    y_own = y_own if act == 0 else F.relu(y_own) if act == 1 else F.leaky_relu(y_own, SLOPE)
    return y_own, dx, dg, db


TORCH_CASES = [CASES[i] for i in (0, 3, 4, 8, 10, 11, 13, 14)]
TORCH_IDS = [IDS[i] for i in (0, 3, 4, 8, 10, 11, 13, 14)]


@pytest.mark.parametrize(
    "dtype,pdtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["f32", "bf16", "bf16-f32params"],
)
@pytest.mark.parametrize("act,save", ACT_SAVE)
@pytest.mark.parametrize("shape,cl", TORCH_CASES, ids=TORCH_IDS)
def test_matches_torch_kernel(shape, cl, act, save, dtype, pdtype):
    """The same numbers as torch.nn's kernel (+ activation) within the dtype's rounding, with γ and
    β in the input's dtype or, for bfloat16 input, in float32 (what torch.nn accepts)."""
    x, w, b, dy = _make(shape, cl, dtype, seed=5, pdtype=pdtype)
    y, _, _, dx, dg, db = _kernel_run(x, w, b, dy, act=act, save=save)
    yt, dxt, dgt, dbt = _torch_run(x, w, b, dy, act, y)
    assert y.dtype == yt.dtype and y.stride() == yt.stride()
    assert dx.stride() == dxt.stride() and dg.dtype == dgt.dtype == pdtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    if act:  # the two disagree on the sign of act's input only where it is ≈ 0
        flip = (y > 0) != (yt > 0)
        z = reference.forward(x.double(), w.double(), b.double(), EPS)[0]
        assert (z[flip].abs() <= 2 * tol * z.abs().max()).all()
    _close(y, yt, tol, "y")
    _close(dx, dxt, tol, "dx")
    _close(dg, dgt, tol, "dgamma")
    _close(db, dbt, tol, "dbeta")


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize(
    "shape,cl",
    [
        ((3, 5, 7, 9), False),
        ((3, 5, 7, 9), True),
        ((6, 4), False),
        ((2, 4, 3, 5, 6), True),
        ((4, 3, 120, 120), True),
    ],
)
def test_no_affine_and_eval_forward(shape, cl, act):
    x, _, _, dy = _make(shape, cl, torch.float32, seed=1)
    y, mean, var, dx, dg, db = _kernel_run(x, None, None, dy, act=act, eps=1e-3)
    assert dg is None and db is None
    yr, _, _, dxr, _, _ = _reference_run(x, None, None, dy, act, y, eps=1e-3)
    _close(y, yr, 2e-5, "y")
    _close(dx, dxr, 2e-5, "dx")

    # inference: y = act((x − E)·γ/sqrt(Var + ε) + β) with the running statistics, no grad
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    before = (rm.clone(), rv.clone())
    for w, b in ((torch.randn(c), torch.randn(c)), (None, None)):
        with torch.no_grad():
            ye, me, ve = _op(x, w, b, act=act, training=False, rm=rm, rv=rv)
        assert me.numel() == ve.numel() == 0
        assert ye.dtype == x.dtype and ye.stride() == x.stride()
        wd = w.double() if w is not None else None
        bd = b.double() if b is not None else None
        zr = reference.eval_forward(x.double(), rm.double(), rv.double(), wd, bd, EPS)
        _close(ye, _act(zr, act), 2e-5, "eval y")
        assert not ye.requires_grad
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # inference reads only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_eval_forward_low_and_high_precision(dtype):
    x, w, b, _ = _make((8, 4, 6, 6), True, dtype, seed=2, pdtype=torch.float32)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    with torch.inference_mode():  # below autograd: the CPU kernel alone
        ye = _op(x, w, b, training=False, rm=rm, rv=rv, act=2)[0]
    want = F.leaky_relu(
        F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False, 0.0, EPS),
        SLOPE,
    )
    assert ye.dtype == dtype
    _close(ye, want, TOL[dtype], "eval y")


@pytest.mark.parametrize(
    "shape,cl",
    [
        ((16, 4, 33, 17), False),
        ((16, 4, 33, 17), True),
        ((32, 4, 40, 33), False),
        ((32, 4, 40, 33), True),
        ((40000, 4), False),
    ],
    ids=["serial", "serial-cl", "parallel", "parallel-cl", "rows"],
)
def test_large_mean_offset_keeps_variance_and_gradients_accurate(shape, cl):
    """1e4 ± 1e-2 in float32: E[x²]−E[x]² would lose every digit of σ² (1e8 vs 1e-4). Below the
    one-thread cut-off the sums are float64; above it float32 per block, merged in float64."""
    g = torch.Generator().manual_seed(1)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = _like(torch.randn(shape, generator=g), x)
    y, mean, var, dx, _, _ = _kernel_run(x, None, None, dy, eps=1e-12)
    yr, mr, vr = reference.forward(x.double(), None, None, 1e-12)
    assert ((mean - mr).abs() / vr.sqrt()).max() < 1e-4  # μ_B to 1e-4 σ, not to float32's 1e-3
    assert ((var - vr).abs() / vr).max() < 1e-4
    assert (y.double() - yr).abs().max() < 1e-3  # x̂ of order 1: no 5e-4/1e-2 = 5% offset
    # dγ (needs a γ): with γ = 1, β = 0 the op's dγ is the no-affine one
    w, b = torch.ones(shape[1]), torch.zeros(shape[1])
    _, _, _, dx_w, dg, _ = _kernel_run(x, w, b, dy, eps=1e-12)
    dxr, dgr, _ = reference.backward(dy.double(), x.double(), mr, vr, None, 1e-12)
    assert ((dg.double() - dgr).abs() / dgr.abs().max()).max() < 1e-3
    assert ((dx.double() - dxr).abs().max() / dxr.abs().max()) < 1e-3
    assert ((dx_w.double() - dxr).abs().max() / dxr.abs().max()) < 1e-3


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("act,save", [(0, 1), (2, 0), (1, 1)])
def test_gradient_in_any_layout(cl, act, save):
    """dL/dy as autograd hands it over: expanded from a sum (stride 0), or in the other memory
    format than x; dL/dx still comes back in x's layout with the reference's values."""
    x, w, b, _ = _make((6, 4, 7, 5), cl, torch.float64, seed=4)
    z = reference.forward(x, w, b, EPS)[0]
    mean, var = reference.batch_stats(x)
    other = torch.contiguous_format if cl else torch.channels_last
    for dy in (
        torch.ones((), dtype=torch.float64).expand(x.shape),
        torch.randn(x.shape, dtype=torch.float64).contiguous(memory_format=other),
    ):
        xg = x.clone().requires_grad_()
        y = _op(xg, w, b, act=act, save=save)[0]
        y.backward(dy)
        dz = _act_ref(z, dy, act, y.detach())[1]
        assert xg.grad.stride() == x.stride()
        _close(xg.grad, reference.backward(dz, x, mean, var, w, EPS)[0], 1e-11, "dx")


@pytest.mark.parametrize(
    "shape,cl",
    [((4, 3, 5), False), ((40, 3), False), ((4, 3, 2, 5), True), ((8, 3, 64, 64), False)],
)
def test_nan_propagates_instead_of_being_hidden(shape, cl):
    x = torch.randn(shape)
    x[1, 2].view(-1)[-1] = float("nan")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    for act in (0, 1, 2):
        y, mean, var = _op(x, None, None, act=act)
        assert torch.isnan(mean[2]) and torch.isnan(var[2]) and torch.isnan(y[:, 2]).all()
        assert not torch.isnan(y[:, :2]).any() and not torch.isnan(mean[:2]).any()


@pytest.mark.parametrize("act,save", [(0, 1), (1, 1), (2, 0), (5, 1)])
@pytest.mark.parametrize("shape", [(4, 16, 40, 40), (2, 8, 70, 70)], ids=str)
def test_channel_sweep_equals_two_passes(shape, act, save):
    """With one thread these shapes take the one-sweep-per-channel kernels, with many threads
    (more than C/4) the two-pass kernels: the same work items and sums in the same order, so the
    same numbers up to the compiler's choice of fused multiply-adds."""
    x, w, b, dy = _make(shape, False, torch.float32, seed=3)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, shape[1]):
            torch.set_num_threads(threads)
            runs.append(_kernel_run(x, w, b, dy, act=act, save=save))
    finally:
        torch.set_num_threads(old)
    for name, a, b_ in zip(("y", "mean", "var", "dx", "dgamma", "dbeta"), *runs, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6, msg=name)
