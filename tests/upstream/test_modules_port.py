"""Port of PyTorch's ModuleInfo tests (``test/test_modules.py``) for BatchNorm1d/2d/3d.

The module inputs are those of ``module_inputs_torch_nn_BatchNorm{1,2,3}d`` and the error inputs
those of ``module_error_inputs_torch_nn_BatchNorm1d_2d_3d`` in
``torch/testing/_internal/common_modules.py`` (torch 2.13). The ModuleInfo entries are
``train_and_eval_differ=True`` with floating dtypes (float32, float64); their skips only concern
MPS and the AOT-autograd suites, none of which runs here. CUDA-only tests
(``test_multiple_device_transfer``, ``test_cpu_gpu_parity``) are not ported.

Upstream has no ModuleInfo for ``LazyBatchNorm*d``; every generic test below also runs on the lazy
class with the same inputs (constructor without ``num_features``), the way upstream treats
``LazyConv*d``, and the lazy-specific checks port ``_check_lazy_norm``,
``_check_lazy_norm_pickle`` and ``_check_lazy_batchnorm_state`` of ``test/test_lazy_modules.py``.

Upstream has no reference function for BatchNorm; ``test_forward`` and
``test_forward_state_updates`` add one (float64 math written here) so the outputs and the running
statistics are checked, not only computed.

Where upstream loops over the module inputs inside one test, each (class, input) pair is its own
test case here, so one failing input does not hide the others.
"""

from __future__ import annotations

import inspect
import io
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy
from torch.testing import assert_close, make_tensor

DIMS = [1, 2, 3]
DTYPES = [torch.float32, torch.float64]

dim_p = pytest.mark.parametrize("dim", DIMS, ids=[f"{d}d" for d in DIMS])
lazy_p = pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
training_p = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
dtype_p = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small shapes gain nothing from intra-op threads, and on a busy 2-core runner OpenMP
    oversubscription makes this file ~10x slower; the previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- module inputs
@dataclass(frozen=True)
class ModuleInput:
    """Constructor arguments (as for the non-lazy class) and the forward input's shape."""

    desc: str
    args: tuple[Any, ...]
    shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


MODULE_INPUTS: dict[int, list[ModuleInput]] = {
    1: [
        ModuleInput("affine", (10,), (4, 10)),
        ModuleInput("3d_input", (5,), (4, 5, 3)),
        ModuleInput("affine_simple_average", (10, 1e-3, None), (4, 10)),
        ModuleInput("not_affine", (10, 1e-3, 0.3, False), (4, 10)),
        ModuleInput("not_tracking_stats", (10, 1e-3, 0.3, True, False), (4, 10)),
        ModuleInput("3d_input_not_affine", (5, 1e-3, 0.3, False), (4, 5, 3)),
        ModuleInput("zero_batch", (5, 1e-3, 0.3, False), (0, 5, 9)),
        ModuleInput("affine_not_bias", (10,), (4, 10), {"bias": False}),
    ],
    2: [
        ModuleInput("", (3,), (2, 3, 6, 6)),
        ModuleInput("2d_simple_average", (3, 1e-3, None), (2, 3, 6, 6)),
        ModuleInput("momentum", (3, 1e-3, 0.8), (2, 3, 6, 6)),
        ModuleInput("not_affine", (3, 1e-3, 0.8, False), (2, 3, 6, 6)),
        ModuleInput("not_tracking_stats", (3, 1e-3, 0.8, True, False), (2, 3, 6, 6)),
        ModuleInput("zero_batch", (5, 1e-3, 0.3, False), (0, 5, 2, 2)),
        ModuleInput("affine_not_bias", (3,), (2, 3, 6, 6), {"bias": False}),
    ],
    3: [
        ModuleInput("", (3,), (2, 3, 4, 4, 4)),
        ModuleInput("3d_simple_average", (3, 1e-3, None), (2, 3, 4, 4, 4)),
        ModuleInput("momentum", (3, 1e-3, 0.7), (2, 3, 4, 4, 4)),
        ModuleInput("not_affine", (3, 1e-3, 0.7, False), (2, 3, 4, 4, 4)),
        ModuleInput("not_tracking_stats", (3, 1e-3, 0.7, True, False), (2, 3, 4, 4, 4)),
        ModuleInput("zero_batch", (5, 1e-3, 0.3, False), (0, 5, 2, 2, 2)),
        ModuleInput("affine_not_bias", (3,), (2, 3, 4, 4, 4), {"bias": False}),
    ],
}

# module_error_inputs_torch_nn_BatchNorm1d_2d_3d: input shapes by class
ERROR_INPUT_SHAPES: dict[int, tuple[int, ...]] = {1: (2, 10), 2: (2, 10, 5, 5), 3: (2, 10, 4, 4, 4)}

# One test per (class, module input), where upstream loops over the inputs inside one test.
CASES = [(dim, mi) for dim in DIMS for mi in MODULE_INPUTS[dim]]
case_p = pytest.mark.parametrize(
    ("dim", "mi"), CASES, ids=[f"{dim}d-{mi.desc or 'default'}" for dim, mi in CASES]
)


def _module_cls(impl: SimpleNamespace, dim: int, lazy: bool) -> type[nn.Module]:
    """The class under test; skips the test when the impl lacks the lazy class."""
    cls = getattr(impl, f"{'Lazy' if lazy else ''}BatchNorm{dim}d")
    if cls is None:
        pytest.skip(f"{impl.name} has no LazyBatchNorm{dim}d yet")
    return cls


def _build(impl: SimpleNamespace, dim: int, lazy: bool, mi: ModuleInput, **extra: Any) -> nn.Module:
    """Instantiate as upstream does; a lazy class gets the arguments without ``num_features``."""
    cls = _module_cls(impl, dim, lazy)
    args = mi.args[1:] if lazy else mi.args
    return cls(*args, **mi.kwargs, **extra)


def _make_input(mi: ModuleInput, dtype: torch.dtype, requires_grad: bool = False) -> Tensor:
    """``make_tensor`` as in upstream's ``make_input`` (values uniform in [-9, 9])."""
    return make_tensor(mi.shape, device="cpu", dtype=dtype, requires_grad=requires_grad)


def _config(mi: ModuleInput) -> dict[str, Any]:
    """Constructor arguments resolved against torch.nn.BatchNorm2d's signature (the spec)."""
    bound = inspect.signature(nn.BatchNorm2d).bind(*mi.args, **mi.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _tols(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for a comparison against the float64 reference."""
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-7}


# ----------------------------------------------------------------------------- reference
def _default_state(cfg: dict[str, Any]) -> dict[str, Any]:
    """State of a fresh (or freshly materialized) layer, in float64."""
    c = cfg["num_features"]
    state: dict[str, Any] = {
        "weight": None,
        "bias": None,
        "running_mean": None,
        "running_var": None,
        "nbt": 0,
    }
    if cfg["affine"]:
        state["weight"] = torch.ones(c, dtype=torch.float64)
        if cfg["bias"]:
            state["bias"] = torch.zeros(c, dtype=torch.float64)
    if cfg["track_running_stats"]:
        state["running_mean"] = torch.zeros(c, dtype=torch.float64)
        state["running_var"] = torch.ones(c, dtype=torch.float64)
    return state


def _module_state(m: nn.Module) -> dict[str, Any]:
    """The module's parameters and buffers as float64 copies."""

    def get(name: str) -> Tensor | None:
        t = getattr(m, name, None)
        return None if t is None else t.detach().to(torch.float64).clone()

    nbt = m.num_batches_tracked
    return {
        "weight": get("weight"),
        "bias": get("bias"),
        "running_mean": get("running_mean"),
        "running_var": get("running_var"),
        "nbt": None if nbt is None else int(nbt),
    }


def _randomize(m: nn.Module) -> None:
    """Give γ, β and the running statistics non-trivial values."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
        if m.bias is not None:
            m.bias.uniform_(-1.0, 1.0)
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)


def _reference(
    x: Tensor, cfg: dict[str, Any], state: dict[str, Any], training: bool
) -> tuple[Tensor, dict[str, Any]]:
    """Batch normalization (Ioffe & Szegedy, Alg. 1) and torch.nn's running-stat update, float64.

    Returns the output and the state after the call.
    """
    x64 = x.detach().to(torch.float64)
    c = x.shape[1]
    red = [0, *range(2, x.dim())]
    n = x.numel() // c if c else 0
    view = [1, c] + [1] * (x.dim() - 2)
    trs = cfg["track_running_stats"]
    new = dict(state)
    if training or not trs:
        mean = x64.mean(red) if n else torch.zeros(c, dtype=torch.float64)
        var = x64.var(red, unbiased=False) if n else torch.ones(c, dtype=torch.float64)
    else:
        mean, var = state["running_mean"], state["running_var"]
    y = (x64 - mean.view(view)) / torch.sqrt(var.view(view) + cfg["eps"])
    if state["weight"] is not None:
        y = y * state["weight"].view(view)
    if state["bias"] is not None:
        y = y + state["bias"].view(view)
    if training and trs:
        new["nbt"] = state["nbt"] + 1
        f = cfg["momentum"] if cfg["momentum"] is not None else 1.0 / new["nbt"]
        if n > 0:  # an empty batch leaves the statistics as they were
            unbiased = var * n / (n - 1)
            new["running_mean"] = (1 - f) * state["running_mean"] + f * mean
            new["running_var"] = (1 - f) * state["running_var"] + f * unbiased
    return y, new


def _assert_state(m: nn.Module, state: dict[str, Any], dtype: torch.dtype, what: str) -> None:
    """Buffers of ``m`` equal the reference state."""
    got = _module_state(m)
    for name in ("running_mean", "running_var"):
        if state[name] is None:
            assert getattr(m, name) is None, f"{what}: {name} should be None"
        else:
            assert getattr(m, name).dtype == dtype, f"{what}: {name} dtype"
            assert_close(got[name], state[name], **_tols(dtype), msg=f"{what}: {name}")
    if state["running_mean"] is not None:
        assert got["nbt"] == state["nbt"], f"{what}: num_batches_tracked {got['nbt']}"


def _recording_new(original: Any, log: list[dict[str, Any]]) -> Any:
    """A ``__new__`` that records its (requires_grad, device, dtype) arguments, then creates."""
    names = ("requires_grad", "device", "dtype")

    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        log.append({**dict(zip(names, args, strict=False)), **kwargs})
        return original(cls, *args, **kwargs)

    return new


def _expected_repr(name: str, c: int, cfg: dict[str, Any]) -> str:
    """torch.nn's ``_NormBase.extra_repr`` format."""
    return (
        f"{name}({c}, eps={cfg['eps']}, momentum={cfg['momentum']}, "
        f"affine={cfg['affine']}, bias={cfg['affine'] and cfg['bias']}, "
        f"track_running_stats={cfg['track_running_stats']})"
    )


def _assert_params_and_buffers_are(m: nn.Module, device: str, dtype: torch.dtype) -> None:
    """Upstream ``_assert_module_parameters_and_buffer_are``: device, and floating dtypes."""
    for kind, items in (("Parameter", m.named_parameters()), ("Buffer", m.named_buffers())):
        for name, t in items:
            assert t.device == torch.device(device), f"{kind} {name} is on {t.device}"
            if t.dtype.is_floating_point:
                assert t.dtype == dtype, f"{kind} {name} is {t.dtype}, expected {dtype}"


def _expected_names(cfg: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Parameter and buffer names torch.nn gives a layer built with ``cfg``."""
    params = set()
    if cfg["affine"]:
        params = {"weight", "bias"} if cfg["bias"] else {"weight"}
    bufs = {"running_mean", "running_var", "num_batches_tracked"}
    return params, bufs if cfg["track_running_stats"] else set()


# ----------------------------------------------------------------------------- TestModule
@dtype_p
@training_p
@lazy_p
@case_p
def test_forward(
    impl: SimpleNamespace,
    dim: int,
    mi: ModuleInput,
    lazy: bool,
    training: bool,
    dtype: torch.dtype,
) -> None:
    """Port of ``TestModule.test_forward`` (plus a float64 reference for the output)."""
    torch.manual_seed(0)
    cfg = _config(mi)
    m = _build(impl, dim, lazy, mi)
    m.to("cpu").to(dtype)
    m.train(training)
    x = _make_input(mi, dtype)
    out = m(x)
    assert out.shape == x.shape and out.dtype == dtype, mi.desc
    ref, _ = _reference(x, cfg, _default_state(cfg), training)
    assert_close(out.to(torch.float64), ref, **_tols(dtype), msg=f"{mi.desc}: output")
    # === Use the method call and verify the parameters and buffers ===
    if dtype == torch.float32:
        m.float()
    else:
        m.double()
    m(x)
    _assert_params_and_buffers_are(m, "cpu", dtype)


@dtype_p
@lazy_p
@case_p
def test_forward_state_updates(
    impl: SimpleNamespace, dim: int, mi: ModuleInput, lazy: bool, dtype: torch.dtype
) -> None:
    """Multiple calls: running stats and num_batches_tracked after 3 training steps, then eval."""
    torch.manual_seed(1)
    cfg = _config(mi)
    m = _build(impl, dim, lazy, mi).to(dtype)
    state = _default_state(cfg)
    for step in range(3):
        if step == (1 if lazy else 0):  # a lazy layer has its tensors after the first call
            _randomize(m)
            state = _module_state(m)
        x = _make_input(mi, dtype)
        out = m(x)
        ref, state = _reference(x, cfg, state, training=True)
        what = f"{mi.desc} step {step}"
        assert_close(out.to(torch.float64), ref, **_tols(dtype), msg=f"{what}: output")
        _assert_state(m, state, dtype, what)
    assert m.eval() is m and not m.training
    x = _make_input(mi, dtype)
    out = m(x)
    ref, after = _reference(x, cfg, state, training=False)
    assert_close(out.to(torch.float64), ref, **_tols(dtype), msg=f"{mi.desc}: eval output")
    _assert_state(m, after, dtype, f"{mi.desc} eval")
    assert after["nbt"] == state["nbt"]


@dtype_p
@training_p
@lazy_p
@case_p
def test_factory_kwargs(
    impl: SimpleNamespace,
    dim: int,
    mi: ModuleInput,
    lazy: bool,
    training: bool,
    dtype: torch.dtype,
) -> None:
    """Port of ``TestModule.test_factory_kwargs``: device/dtype reach every param and buffer."""
    cfg = _config(mi)
    want_params, want_bufs = _expected_names(cfg)
    if lazy:
        # Uninitialized{Parameter,Buffer} must be created with the factory kwargs.
        calls: dict[str, list[dict[str, Any]]] = {"param": [], "buffer": []}
        with pytest.MonkeyPatch.context() as mp:
            for kind, cls in (("param", UninitializedParameter), ("buffer", UninitializedBuffer)):
                mp.setattr(cls, "__new__", _recording_new(cls.__new__, calls[kind]))
            m = _build(impl, dim, lazy, mi, device="cpu", dtype=dtype)
            m.train(training)
        assert len(calls["param"]) == len(want_params), (mi.desc, calls)
        assert len(calls["buffer"]) == len(want_bufs - {"num_batches_tracked"}), mi.desc
        for kw in calls["param"] + calls["buffer"]:
            assert kw.get("device") == "cpu" and kw.get("dtype") == dtype, (mi.desc, kw)
        m(_make_input(mi, dtype))  # materialize: the tensors keep the factory dtype
    else:
        m = _build(impl, dim, lazy, mi, device="cpu", dtype=dtype)
        m.train(training)
    assert {n for n, _ in m.named_parameters()} == want_params, mi.desc
    assert {n for n, _ in m.named_buffers()} == want_bufs, mi.desc
    _assert_params_and_buffers_are(m, "cpu", dtype)


@lazy_p
@case_p
def test_repr(impl: SimpleNamespace, dim: int, mi: ModuleInput, lazy: bool) -> None:
    """Port of ``TestModule.test_repr``; also checks the text equals torch.nn's format."""
    torch.manual_seed(2)
    cfg = _config(mi)
    m = _build(impl, dim, lazy, mi)
    name = f"{'Lazy' if lazy else ''}BatchNorm{dim}d"
    c = 0 if lazy else cfg["num_features"]
    assert repr(m) == str(m) == _expected_repr(name, c, cfg), repr(m)
    m(_make_input(mi, torch.float32))
    assert repr(m) == _expected_repr(f"BatchNorm{dim}d", cfg["num_features"], cfg), repr(m)


@dtype_p
@training_p
@lazy_p
@case_p
def test_pickle(
    impl: SimpleNamespace,
    dim: int,
    mi: ModuleInput,
    lazy: bool,
    training: bool,
    dtype: torch.dtype,
) -> None:
    """Port of ``TestModule.test_pickle`` (torch.save / torch.load, and plain pickle)."""
    torch.manual_seed(3)
    m = _build(impl, dim, lazy, mi)
    m.to(dtype)
    m.train(training)
    x = _make_input(mi, dtype)
    out = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(m))]
    for m_copy in copies:
        assert type(m_copy) is type(m) and m_copy.training == training, mi.desc
        sd, sd_copy = m.state_dict(), m_copy.state_dict()
        assert sd.keys() == sd_copy.keys(), mi.desc
        for k in sd:
            assert_close(sd_copy[k], sd[k], rtol=0, atol=0, msg=f"{mi.desc}: {k}")
        assert_close(m_copy(x), out, msg=f"{mi.desc}: output of the copy")


@lazy_p
@dim_p
def test_check_inplace_not_applicable(impl: SimpleNamespace, dim: int, lazy: bool) -> None:
    """``test_check_inplace`` selects modules with an ``inplace`` argument: BN must have none,
    and its constructor signature must be torch.nn's (names, kinds, defaults)."""
    cls = _module_cls(impl, dim, lazy)
    ref = getattr(nn, f"{'Lazy' if lazy else ''}BatchNorm{dim}d")
    params = inspect.signature(cls).parameters
    assert "inplace" not in params
    got = [(p.name, p.kind, p.default) for p in params.values()]
    want = [(p.name, p.kind, p.default) for p in inspect.signature(ref).parameters.values()]
    assert got == want


def _non_contiguous(t: Tensor) -> Tensor:
    """Upstream's ``_make_non_contiguous``: same values, every other element of a wider tensor."""
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    out.requires_grad = t.requires_grad
    return out


@dtype_p
@training_p
@lazy_p
@case_p
def test_non_contiguous_tensors(
    impl: SimpleNamespace,
    dim: int,
    mi: ModuleInput,
    lazy: bool,
    training: bool,
    dtype: torch.dtype,
) -> None:
    """Port of ``TestModule.test_non_contiguous_tensors``: same output and grads."""
    torch.manual_seed(4)
    x = _make_input(mi, dtype, requires_grad=True)
    m = _build(impl, dim, lazy, mi)
    m.to(dtype)
    m.train(training)
    default_out = m(x)
    grad_out = default_out.detach().clone().normal_()
    default_out.backward(grad_out, retain_graph=True)
    default_x_grad = x.grad.clone()
    default_param_grads = [p.grad.clone() for p in m.parameters()]

    nc_x, nc_grad = _non_contiguous(x), _non_contiguous(grad_out)
    if x.numel() > 0:
        assert not nc_x.is_contiguous() and not nc_grad.is_contiguous()
    for inp, g in product([x, nc_x], [grad_out, nc_grad]):
        inp.grad = None
        for p in m.parameters():
            p.grad = None
        out = m(inp)
        out.backward(g.clone(), retain_graph=True)
        what = f"{mi.desc} contiguous={inp.is_contiguous()},{g.is_contiguous()}"
        assert_close(out, default_out, msg=f"{what}: output")
        assert_close(inp.grad, default_x_grad, atol=1e-4, rtol=0, msg=f"{what}: input grad")
        for p, g0 in zip(m.parameters(), default_param_grads, strict=True):
            assert_close(p.grad, g0, msg=f"{what}: param grad")


def _run_check(
    checker: Any, m: nn.Module, x: Tensor, params: tuple[Tensor, ...], desc: str
) -> None:
    """Upstream's ``fn_to_gradcheck``: the parameters are gradcheck inputs and reach the module
    as its own tensors."""

    def fn(inp: Tensor, *_params: Tensor) -> Tensor:
        return m(inp)

    ok = checker(fn, (x, *params), check_batched_grad=True, fast_mode=True)
    assert ok, f"failed for {desc} ({[p.requires_grad for p in params]})"


@pytest.mark.parametrize("check", ["grad", "gradgrad"])
@training_p
@lazy_p
@case_p
def test_grad(
    impl: SimpleNamespace, dim: int, mi: ModuleInput, lazy: bool, training: bool, check: str
) -> None:
    """Port of ``TestModule.test_grad`` / ``test_gradgrad`` (float64; total and per-parameter
    derivatives; upstream's wrapper defaults: fast_mode and check_batched_grad on)."""
    torch.manual_seed(5)
    checker = torch.autograd.gradcheck if check == "grad" else torch.autograd.gradgradcheck
    m = _build(impl, dim, lazy, mi)
    m.to(torch.float64)
    m.train(training)
    x = _make_input(mi, torch.float64, requires_grad=True)
    if lazy:  # lazy modules need to see an input before gradcheck
        with torch.no_grad():
            m(x)
    params = tuple(m.parameters())
    _run_check(checker, m, x, params, mi.desc)  # total derivative
    for p in params:
        p.requires_grad_(False)
    for p in params:  # partial derivatives, one parameter at a time
        p.requires_grad_(True)
        _run_check(checker, m, x, params, mi.desc)
        p.requires_grad_(False)


@dtype_p
@training_p
@lazy_p
@case_p
def test_memory_format(
    impl: SimpleNamespace,
    dim: int,
    mi: ModuleInput,
    lazy: bool,
    training: bool,
    dtype: torch.dtype,
) -> None:
    """Port of ``TestModule.test_memory_format``: channels_last(_3d) input gives the same output
    (and grads in training) in the input's memory format; the module's format does not matter."""
    torch.manual_seed(6)
    x0 = _make_input(mi, dtype, requires_grad=True)
    if x0.dim() == 4:
        fmts = [torch.contiguous_format, torch.channels_last]
    elif x0.dim() == 5:
        fmts = [torch.contiguous_format, torch.channels_last_3d]
    else:
        fmts = [torch.contiguous_format]
    module_fmts = [torch.preserve_format, *fmts]
    m = _build(impl, dim, lazy, mi)
    m.to(dtype)
    m.train(training)
    desired = m(x0)
    if training:
        params = tuple(m.parameters())
        ref_grad_out = torch.rand_like(desired)
        ref_grads = torch.autograd.grad((desired,), (x0, *params), (ref_grad_out,))

    def check_format(t: Tensor, in_fmt: torch.memory_format, what: str) -> None:
        if t.dim() in (4, 5) and in_fmt != torch.contiguous_format:
            assert t.is_contiguous(memory_format=in_fmt), f"{what} lost {in_fmt}"
        else:
            assert t.is_contiguous(), f"{what} is not contiguous"

    for in_fmt in fmts:
        x = x0.detach().clone().to(memory_format=in_fmt).requires_grad_(True)
        for mod_fmt in module_fmts:
            m.to(memory_format=mod_fmt)
            out = m(x)
            what = f"{mi.desc} input={in_fmt} module={mod_fmt}"
            assert_close(out, desired, msg=f"{what}: output")
            check_format(out, in_fmt, f"{what}: output")
            if training:
                params = tuple(m.parameters())
                grads = torch.autograd.grad(
                    (out,), (x, *params), (torch.empty_like(out).copy_(ref_grad_out),)
                )
                for i, (g, g0) in enumerate(zip(grads, ref_grads, strict=True)):
                    assert_close(g, g0, msg=f"{what}: grad {i}")
                    check_format(g, in_fmt, f"{what}: grad {i}")


@lazy_p
@case_p
def test_if_train_and_eval_modes_differ(
    impl: SimpleNamespace, dim: int, mi: ModuleInput, lazy: bool
) -> None:
    """Port of ``TestModule.test_if_train_and_eval_modes_differ`` (train only): BN's entry says
    ``train_and_eval_differ=True``, so forward must read ``training``; and the outputs differ."""
    torch.manual_seed(7)
    m = _build(impl, dim, lazy, mi)
    m.train(True)
    delattr(m, "training")
    with pytest.raises(AttributeError, match="'training'"):
        m(_make_input(mi, torch.float32))

    cfg = _config(mi)
    m = _build(impl, dim, lazy, mi)
    x = _make_input(mi, torch.float32)
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    if cfg["track_running_stats"] and x.numel() > 0:
        assert not torch.allclose(y_train, y_eval), mi.desc
    else:  # without running stats both modes normalize with the batch statistics
        assert_close(y_train, y_eval, msg=mi.desc)


@lazy_p
@case_p
def test_device_ctx_init(impl: SimpleNamespace, dim: int, mi: ModuleInput, lazy: bool) -> None:
    """Port of ``TestModule.test_device_ctx_init``: under ``torch.device('meta')`` parameters and
    buffers are meta tensors with the CPU ones' metadata."""
    m_cpu = _build(impl, dim, lazy, mi)
    with torch.device("meta"):
        m = _build(impl, dim, lazy, mi)
    pairs = list(zip(m.parameters(), m_cpu.parameters(), strict=True)) + list(
        zip(m.buffers(), m_cpu.buffers(), strict=True)
    )
    assert pairs, mi.desc
    for p_meta, p_cpu in pairs:
        if is_lazy(p_meta):
            continue
        assert p_meta.is_meta, mi.desc
        assert (p_meta.shape, p_meta.dtype, p_meta.stride(), p_meta.requires_grad) == (
            p_cpu.shape,
            p_cpu.dtype,
            p_cpu.stride(),
            p_cpu.requires_grad,
        ), mi.desc


@pytest.mark.parametrize("eps", [-1.0, 0.0])
@lazy_p
@dim_p
def test_errors(impl: SimpleNamespace, dim: int, lazy: bool, eps: float) -> None:
    """Port of ``TestModule.test_errors`` with ``module_error_inputs_torch_nn_BatchNorm1d_2d_3d``:
    constructing with eps <= 0 works; the (training-mode) forward raises ValueError."""
    mi = ModuleInput("eps", (10,), ERROR_INPUT_SHAPES[dim], {"eps": eps})
    m = _build(impl, dim, lazy, mi)
    with pytest.raises(ValueError, match="eps must be positive"):
        m(_make_input(mi, torch.float32))


@pytest.mark.parametrize("eps", [-1.0, 0.0])
@lazy_p
@dim_p
def test_errors_eval_eps(impl: SimpleNamespace, dim: int, lazy: bool, eps: float) -> None:
    """Companion of ``test_errors`` for eval mode (torch.nn.functional.batch_norm's rule):
    eps < 0 raises ValueError, eps == 0 is accepted and divides by sqrt(running_var)."""
    torch.manual_seed(8)
    mi = ModuleInput("eps", (10,), ERROR_INPUT_SHAPES[dim], {"eps": eps})
    m = _build(impl, dim, lazy, mi).eval()
    x = _make_input(mi, torch.float32)
    if eps < 0:
        with pytest.raises(ValueError, match="eps must be non-negative"):
            m(x)
        return
    cfg = _config(mi)
    state = _default_state(cfg)
    if not lazy:
        _randomize(m)
        state = _module_state(m)
    ref, _ = _reference(x, cfg, state, training=False)
    assert_close(m(x).to(torch.float64), ref, **_tols(torch.float32))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not_affine"])
@training_p
@lazy_p
@dim_p
def test_zero_batch(
    impl: SimpleNamespace, dim: int, lazy: bool, training: bool, affine: bool
) -> None:
    """The ``zero_batch`` inputs on their own: N=0 gives an empty output, backward gives an empty
    input grad and zero parameter grads; running stats keep their values, and a training call
    still counts in num_batches_tracked (torch.nn's behaviour)."""
    torch.manual_seed(9)
    shape = {1: (0, 5, 9), 2: (0, 5, 2, 2), 3: (0, 5, 2, 2, 2)}[dim]
    mi = ModuleInput("zero_batch", (5, 1e-3, 0.3, affine), shape)
    m = _build(impl, dim, lazy, mi)
    m.train(training)
    if not lazy:
        _randomize(m)
    before = _module_state(m) if not lazy else _default_state(_config(mi))
    x = torch.randn(shape, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.numel() == 0
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} has no grad"
        assert_close(p.grad, torch.zeros_like(p), msg=name)
    after = _module_state(m)
    assert_close(after["running_mean"], before["running_mean"])
    assert_close(after["running_var"], before["running_var"])
    assert after["nbt"] == (1 if training else 0)


# ----------------------------------------------------------------------------- test_lazy_modules
LAZY_SHAPES: dict[int, list[tuple[int, ...]]] = {
    1: [(16, 3, 6), (16, 6)],
    2: [(16, 3, 6, 7)],
    3: [(16, 3, 6, 7, 8)],
}


@dim_p
def test_lazy_norm(impl: SimpleNamespace, dim: int) -> None:
    """Port of ``TestLazyModules.test_lazy_batchnorm{1,2,3}d`` (``_check_lazy_norm``): the lazy
    layer infers num_features, becomes the impl's BatchNorm class, and matches a fresh one."""
    lazy_cls = _module_cls(impl, dim, lazy=True)
    cls = _module_cls(impl, dim, lazy=False)
    torch.manual_seed(10)
    for shape, affine, trs in product(LAZY_SHAPES[dim], [False, True], [False, True]):
        lazy_module = lazy_cls(affine=affine, track_running_stats=trs)
        if affine:
            assert isinstance(lazy_module.weight, UninitializedParameter)
            assert isinstance(lazy_module.bias, UninitializedParameter)
        if trs:
            assert isinstance(lazy_module.running_mean, UninitializedBuffer)
            assert isinstance(lazy_module.running_var, UninitializedBuffer)

        x = torch.randn(shape)  # upstream uses ones; random values also test the statistics
        lazy_output = lazy_module(x)
        assert isinstance(lazy_module, cls) and not isinstance(lazy_module, lazy_cls)
        if affine or trs:  # torch.nn infers it only when there is a tensor to materialize
            assert lazy_module.num_features == shape[1]

        module = cls(shape[1], affine=affine, track_running_stats=trs)
        expected = module(x)
        assert_close(lazy_output, expected)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            want, got = getattr(module, name), getattr(lazy_module, name)
            if want is None:
                assert got is None, name
            else:
                assert not is_lazy(got) and got.shape == want.shape, name
                assert_close(got, want, msg=name)


@dim_p
def test_lazy_norm_pickle(impl: SimpleNamespace, dim: int) -> None:
    """Port of ``TestLazyModules.test_lazy_batchnorm{1,2,3}d_pickle``."""
    lazy_cls = _module_cls(impl, dim, lazy=True)
    cls = _module_cls(impl, dim, lazy=False)
    for shape, affine, trs in product(LAZY_SHAPES[dim], [False, True], [False, True]):
        module = pickle.loads(pickle.dumps(lazy_cls(affine=affine, track_running_stats=trs)))
        assert isinstance(module, lazy_cls)
        if affine:
            assert isinstance(module.weight, UninitializedParameter)
            assert isinstance(module.bias, UninitializedParameter)
        if trs:
            assert isinstance(module.running_mean, UninitializedBuffer)
            assert isinstance(module.running_var, UninitializedBuffer)

        module(torch.ones(shape))  # fully materialized
        module = pickle.loads(pickle.dumps(module))
        assert not isinstance(module, lazy_cls) and isinstance(module, cls)
        if affine:
            assert not isinstance(module.weight, UninitializedParameter)
            assert not isinstance(module.bias, UninitializedParameter)
        if trs:
            assert not isinstance(module.running_mean, UninitializedBuffer)
            assert not isinstance(module.running_var, UninitializedBuffer)


@dim_p
def test_lazy_norm_state(impl: SimpleNamespace, dim: int) -> None:
    """Port of ``TestLazyModules.test_lazy_batchnorm{1,2,3}d_state`` (``_check_lazy_batchnorm_
    state``), plus: the first call after loading uses the loaded state and becomes the BN class."""
    lazy_cls = _module_cls(impl, dim, lazy=True)
    cls = _module_cls(impl, dim, lazy=False)
    torch.manual_seed(11)
    module = cls(10)
    _randomize(module)
    lazy_module = lazy_cls(affine=True, track_running_stats=True)
    lazy_module.load_state_dict(module.state_dict())
    assert not lazy_module.has_uninitialized_params()
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(lazy_module, name).shape == (10,), name
        assert_close(getattr(lazy_module, name), getattr(module, name), msg=name)

    x = torch.randn({1: (4, 10), 2: (2, 10, 3, 3), 3: (2, 10, 2, 3, 3)}[dim])
    module.eval()
    lazy_module.eval()
    assert_close(lazy_module(x), module(x))
    assert isinstance(lazy_module, cls) and not isinstance(lazy_module, lazy_cls)

    module = cls(10)
    with pytest.raises(RuntimeError, match="shape of an uninitialized"):
        module.load_state_dict(lazy_cls().state_dict())


def test_reference_is_not_trivial(impl: SimpleNamespace) -> None:
    """Sanity check of this file's reference: it matches the impl's functional ``batch_norm``
    and a wrong eps or momentum is detected (so the comparisons above can fail)."""
    torch.manual_seed(12)
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 3 + 1
    mi = ModuleInput("", (3, 1e-3, 0.3), x.shape)
    cfg = _config(mi)
    state = _default_state(cfg)
    rm, rv = state["running_mean"].clone(), state["running_var"].clone()
    want = impl.batch_norm(x, rm, rv, state["weight"], state["bias"], True, 0.3, 1e-3)
    got, new = _reference(x, cfg, state, training=True)
    assert_close(got, want)
    assert_close(new["running_mean"], rm)
    assert_close(new["running_var"], rv)
    wrong, _ = _reference(x, {**cfg, "eps": 0.5}, state, training=True)
    assert not torch.allclose(wrong, want)
    _, wrong_state = _reference(x, {**cfg, "momentum": 0.1}, state, training=True)
    assert not torch.allclose(wrong_state["running_var"], rv)
    assert math.isfinite(float(got.abs().max()))
