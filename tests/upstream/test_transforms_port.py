"""PyTorch's program transforms and tools on batch-norm layers: each must give torch.nn's numbers.

Covers ``torch.jit.trace`` / ``script`` (+ save/load), ``torch.fx`` (+ conv-BN ``fuse``), ONNX
export (legacy TorchScript exporter and the dynamo exporter, run with onnxruntime when installed),
``torch.compile`` (aot_eager, inductor; ``fullgraph=True``), ``torch.export``, double backward,
forward-mode AD, ``torch.func`` (vmap, grad, jacrev, jacfwd, hessian), batched gradients,
``torch.utils.checkpoint``, in-place ops and ``resize_`` on the output, and ``inference_mode``.

Every test takes the ``impl`` fixture: ``impl.name == "torch"`` is the control (the test itself is
right), ``"batchnorm"`` the package. The model under test is built from ``impl``'s layers with the
weights, biases and running statistics of a plain eager ``torch.nn`` model, and compared with that
model run eagerly (float64 unless said otherwise) on the same inputs: outputs, gradients with
respect to the input and every parameter, and running_mean / running_var / num_batches_tracked.
Where torch.nn's behaviour is itself a choice (checkpoint recomputation updates the running
statistics twice, ``resize_`` refuses an output that requires grad, vmap refuses unbatched running
statistics in training), the test records what torch.nn does and requires the same.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap
from torch.utils.checkpoint import checkpoint

F64 = torch.float64
MODES = pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
LAYERS = pytest.mark.parametrize(
    "name,shape",
    [("BatchNorm1d", (4, 3)), ("BatchNorm1d", (4, 3, 2)), ("BatchNorm2d", (2, 3, 2, 2))],
    ids=["1d_NC", "1d_NCL", "2d"],
)
X_SHAPE = (4, 3, 8, 8)  # input of _net

pytestmark = [  # torch 2.13 deprecates TorchScript and the legacy ONNX exporter, loudly
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _has(module: str) -> bool:
    """Whether ``module`` is installed (without importing it)."""
    return importlib.util.find_spec(module) is not None


def _randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> Tensor:
    """A fixed normal sample, independent of the global RNG state (same values in any dtype)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _inputs(n: int, shape: tuple[int, ...] = X_SHAPE, dtype: torch.dtype = F64) -> list[Tensor]:
    """``n`` different inputs (scaled and shifted so the batch statistics are not trivial)."""
    return [_randn(shape, 100 + i, dtype) * 1.5 + 0.3 for i in range(n)]


def _net(bn1d: Any, bn2d: Any) -> nn.Sequential:
    """Conv2d → BN2d → ReLU → BN1d on (N, C, L) → Linear → BN1d on (N, C); input (4, 3, 8, 8)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        bn2d(4),
        nn.ReLU(),
        nn.Flatten(2),
        bn1d(4),
        nn.Flatten(),
        nn.Linear(144, 5),
        bn1d(5),
    )


def _conv_bn(bn1d: Any, bn2d: Any) -> nn.Sequential:
    """Conv2d → BN2d → ReLU, the ONNX / gradient-penalty model."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn2d(4), nn.ReLU())


def _randomize(ref: nn.Module) -> None:
    """Give every torch.nn BN layer of ``ref`` non-trivial γ, β and running statistics."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(3)


def _pair(
    build: Callable[[Any, Any], nn.Module],
    impl: SimpleNamespace,
    train: bool,
    dtype: torch.dtype = F64,
) -> tuple[nn.Module, nn.Module]:
    """(model from ``impl``'s layers, eager torch.nn reference) with identical state."""
    ref = build(nn.BatchNorm1d, nn.BatchNorm2d)
    _randomize(ref)
    model = build(impl.BatchNorm1d, impl.BatchNorm2d)
    model.load_state_dict(ref.state_dict())
    return model.to(dtype).train(train), ref.to(dtype).train(train)


def _layer_pair(
    impl: SimpleNamespace,
    name: str,
    train: bool,
    channels: int = 3,
    affine: bool = True,
    track: bool = True,
    dtype: torch.dtype = F64,
) -> tuple[nn.Module, nn.Module]:
    """(``impl``'s layer ``name``, torch.nn's) with identical state."""
    kw = {"affine": affine, "track_running_stats": track}
    ref = getattr(nn, name)(channels, **kw)
    _randomize(ref)
    layer = getattr(impl, name)(channels, **kw)
    layer.load_state_dict(ref.state_dict())
    return layer.to(dtype).train(train), ref.to(dtype).train(train)


def _close(actual: Tensor, expected: Tensor, tol: float = 1e-9, what: str = "") -> None:
    """max |actual − expected| ≤ tol · max(1, max |expected|); same shape and dtype; no NaN."""
    assert isinstance(actual, Tensor), f"{what}: got {type(actual).__name__}, not a tensor"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach(), expected.detach()
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    scale = max(1.0, e.abs().max().item())
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol:.0e} * {scale:.3g}"


def _loss_weights(y: Tensor) -> Tensor:
    """Fixed random weights, so the loss Σ w·y has non-trivial gradients through batch stats."""
    return _randn(tuple(y.shape), 7, y.dtype)


def _run(
    fn: Callable[[Tensor], Tensor],
    module: nn.Module,
    x: Tensor,
    names: list[str],
) -> dict[str, Tensor | None]:
    """Output of ``fn(x)`` and the gradients of Σ w·y w.r.t. x and ``module``'s ``names``."""
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    assert not missing, f"parameters {missing} not found in {type(module).__name__}"
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)
    leaves = [xg] + [params[n] for n in names]
    grads = torch.autograd.grad((y * _loss_weights(y)).sum(), leaves, allow_unused=True)
    out: dict[str, Tensor | None] = {"output": y.detach(), "grad x": grads[0]}
    out.update({f"grad {n}": g for n, g in zip(names, grads[1:], strict=True)})
    return out


def _compare(
    got: dict[str, Tensor | None],
    want: dict[str, Tensor | None],
    tol: float = 1e-9,
) -> None:
    """Every entry of ``want`` (a _run result of the reference) is matched; no gradient lost."""
    for key, w in want.items():
        g = got[key]
        assert w is not None, f"{key}: the reference has no gradient (a bug in the test)"
        assert g is not None, f"{key}: no gradient"
        _close(g, w, tol, key)


def _assert_state(module: nn.Module, ref: nn.Module, tol: float = 1e-9) -> None:
    """running_mean / running_var / num_batches_tracked of every BN layer equal the reference's."""
    got = dict(module.named_buffers())
    for name, want in ref.named_buffers():
        assert name in got, f"buffer {name} missing (has {sorted(got)})"
        if want.dtype == torch.long:
            assert int(got[name]) == int(want), f"{name}: {int(got[name])} != {int(want)}"
        else:
            _close(got[name], want, tol, name)


def _names(ref: nn.Module) -> list[str]:
    """Parameter names of the reference (the same in a traced / scripted / exported copy)."""
    return [n for n, _ in ref.named_parameters()]


# --------------------------------------------------------------------------------------------
# TorchScript: trace, script, save / load
# --------------------------------------------------------------------------------------------


@MODES
def test_jit_trace_new_inputs(impl: SimpleNamespace, train: bool) -> None:
    """A traced model run on inputs it was not traced with gives eager torch.nn's output, grads
    and running stats (no constants baked from the trace input, no uninitialised memory)."""
    model, ref = _pair(_net, impl, train)
    x0, x1, x2 = _inputs(3)
    traced = torch.jit.trace(model, (x0,), check_trace=False)
    ref(x0)  # tracing ran the model once on x0 (in training: one running-stat update)
    _assert_state(traced, ref)
    for x in (x1, x2):
        _compare(_run(traced, traced, x, _names(ref)), _run(ref, ref, x, _names(ref)))
        _assert_state(traced, ref)


def test_jit_trace_no_grad_eval(impl: SimpleNamespace) -> None:
    """Traced under ``torch.no_grad()`` in eval, the traced model computes new inputs right."""
    model, ref = _pair(_net, impl, False)
    x0, x1, x2 = _inputs(3)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x0,), check_trace=False)
        for x in (x1, x2):
            _close(traced(x), ref(x), what="output")
    _assert_state(traced, ref)


@MODES
def test_jit_script_save_load(impl: SimpleNamespace, train: bool, tmp_path: Path) -> None:
    """``torch.jit.script`` gives eager numbers; so does the module after ``jit.save``/``load``."""
    model, ref = _pair(_net, impl, train)
    x0, x1 = _inputs(2)
    scripted = torch.jit.script(model)
    _compare(_run(scripted, scripted, x0, _names(ref)), _run(ref, ref, x0, _names(ref)))
    _assert_state(scripted, ref)
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    assert loaded.training == train
    _compare(_run(loaded, loaded, x1, _names(ref)), _run(ref, ref, x1, _names(ref)))
    _assert_state(loaded, ref)


# --------------------------------------------------------------------------------------------
# torch.fx
# --------------------------------------------------------------------------------------------


@MODES
def test_fx_symbolic_trace(impl: SimpleNamespace, train: bool) -> None:
    """The ``symbolic_trace`` GraphModule gives eager output, gradients and running stats.

    The state is read from the traced model: a GraphModule keeps only the attributes its graph
    uses (torch.nn's BN is a leaf module and stays whole; a traced-through layer in eval does not
    read num_batches_tracked)."""
    model, ref = _pair(_net, impl, train)
    gm = torch.fx.symbolic_trace(model)
    for x in _inputs(2):
        _compare(_run(gm, gm, x, _names(ref)), _run(ref, ref, x, _names(ref)))
        _assert_state(model, ref)  # the GraphModule holds the model's very buffers


def test_fx_fuse_eval(impl: SimpleNamespace) -> None:
    """``torch.fx.experimental.optimization.fuse`` (conv/linear-BN folding) in eval: same output."""
    from torch.fx.experimental.optimization import fuse

    model, ref = _pair(_net, impl, False)
    fused = fuse(model)
    with torch.no_grad():
        for x in _inputs(2):
            _close(fused(x), ref(x), what="fused output")


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def _check_onnx(data: bytes, x: Tensor, want: Tensor) -> None:
    """The model has a BatchNormalization node; onnxruntime (if installed) computes ``want``
    (float64 eager torch.nn) to float32 accuracy."""
    if _has("onnx"):
        import onnx

        ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
        assert "BatchNormalization" in ops, f"no BatchNormalization node in {ops}"
    else:
        assert b"BatchNormalization" in data, "no BatchNormalization node in the exported bytes"
    if _has("onnxruntime"):
        import onnxruntime as ort

        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        _close(torch.from_numpy(out).double(), want, 5e-6, "onnxruntime output")


def test_onnx_export_legacy(impl: SimpleNamespace) -> None:
    """TorchScript-based exporter (``dynamo=False``) of Conv→BN→ReLU in eval.

    Constant folding is off: with it, the exporter folds torch.nn's BN into the Conv weights and
    the graph has no BatchNormalization node for either implementation.
    """
    pytest.importorskip(
        "onnx",
        reason="torch 2.13's legacy ONNX exporter imports onnx to write the model "
        "(torchscript_exporter.onnx_proto_utils._add_onnxscript_fn)",
    )
    model, ref = _pair(_conv_bn, impl, False, torch.float32)
    (x,) = _inputs(1, dtype=torch.float32)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, do_constant_folding=False)
    with torch.no_grad():
        _check_onnx(buf.getvalue(), x, ref.double()(x.double()))


def test_onnx_export_dynamo(impl: SimpleNamespace) -> None:
    """torch.export-based exporter (``dynamo=True``) of Conv→BN→ReLU in eval.

    ``optimize=False``: the onnxscript optimizer folds torch.nn's BN into the Conv otherwise.
    """
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    model, ref = _pair(_conv_bn, impl, False, torch.float32)
    (x,) = _inputs(1, dtype=torch.float32)
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    with torch.no_grad():
        _check_onnx(program.model_proto.SerializeToString(), x, ref.double()(x.double()))


# --------------------------------------------------------------------------------------------
# torch.compile, torch.export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,train",
    [
        ("aot_eager", True),
        ("aot_eager", False),
        pytest.param("inductor", True, marks=pytest.mark.slow),  # ~30 s: C++ codegen
    ],
    ids=["aot_eager-train", "aot_eager-eval", "inductor-train"],
)
def test_compile_fullgraph(impl: SimpleNamespace, backend: str, train: bool) -> None:
    """``torch.compile(fullgraph=True)``: one graph, eager output, grads and running stats, on
    the compiling call and on a second input that reuses the compiled code."""
    torch._dynamo.reset()
    model, ref = _pair(_net, impl, train)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for x in _inputs(2):
        _compare(_run(compiled, model, x, _names(ref)), _run(ref, ref, x, _names(ref)))
        _assert_state(model, ref)


@MODES
def test_export_program(impl: SimpleNamespace, train: bool) -> None:
    """``torch.export.export`` leaves the state alone; its ``module()`` gives eager numbers."""
    model, ref = _pair(_net, impl, train)
    x0, x1 = _inputs(2)
    ep = torch.export.export(model, (x0,))
    _assert_state(model, ref)  # export traces with fake tensors: no running-stat update
    mod = ep.module()
    _compare(_run(mod, mod, x1, _names(ref)), _run(ref, ref, x1, _names(ref)))
    _assert_state(mod, ref)


# --------------------------------------------------------------------------------------------
# higher-order and forward-mode AD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@MODES
@LAYERS
def test_double_backward(
    impl: SimpleNamespace,
    name: str,
    shape: tuple[int, ...],
    train: bool,
    affine: bool,
) -> None:
    """First and second derivatives w.r.t. input, γ and β: ``gradcheck`` / ``gradgradcheck``
    against finite differences, and a gradient and a Hessian-vector product equal torch.nn's."""
    layer, ref = _layer_pair(impl, name, train, affine=affine)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = _randn(shape, 3).requires_grad_(True)

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    # fast mode: checks a random projection of the Jacobian, so still fails on any wrong entry
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)

    def derivatives(mod: nn.Module) -> list[Tensor]:
        xg = _randn(shape, 3).requires_grad_(True)
        leaves = [xg, *(p for _, p in mod.named_parameters())]
        y = mod(xg)
        grads = torch.autograd.grad((y * _loss_weights(y)).sum(), leaves, create_graph=True)
        v = sum((g * _randn(tuple(g.shape), 10 + i)).sum() for i, g in enumerate(grads))
        # eval without affine: the gradient is a constant, its derivative zero
        if v.requires_grad:
            hvp = torch.autograd.grad(v, leaves, allow_unused=True)
        else:
            hvp = (None,) * len(leaves)
        hvp = [torch.zeros_like(t) if h is None else h for t, h in zip(leaves, hvp, strict=True)]
        return [*grads, *hvp]

    for i, (g, w) in enumerate(zip(derivatives(layer), derivatives(ref), strict=True)):
        _close(g, w, what=f"derivative {i}")


@MODES
def test_gradient_penalty(impl: SimpleNamespace, train: bool) -> None:
    """d/dθ ‖∂loss/∂x‖² through Conv→BN→ReLU (double backward) equals torch.nn's."""
    model, ref = _pair(_conv_bn, impl, train)
    (x,) = _inputs(1)

    def penalty(mod: nn.Module) -> tuple[Tensor, list[Tensor]]:
        xg = x.clone().requires_grad_(True)
        y = mod(xg)
        loss = (torch.tanh(y) * _loss_weights(y)).sum()
        (gx,) = torch.autograd.grad(loss, xg, create_graph=True)
        params = [p for _, p in mod.named_parameters()]
        return gx, list(torch.autograd.grad(gx.pow(2).sum(), params, allow_unused=True))

    gx, dps = penalty(model)
    gx_ref, dps_ref = penalty(ref)
    _close(gx, gx_ref, what="grad x")
    for n, g, w in zip(_names(ref), dps, dps_ref, strict=True):
        assert g is not None, f"{n}: no gradient of the penalty"
        _close(g, w, what=f"d penalty / d {n}")
    _assert_state(model, ref)


@MODES
@LAYERS
def test_forward_ad(impl: SimpleNamespace, name: str, shape: tuple[int, ...], train: bool) -> None:
    """Dual input and dual γ, β: the output tangent equals torch.nn's and a central difference."""
    layer, ref = _layer_pair(impl, name, train)
    x, tx = _randn(shape, 3), _randn(shape, 4)
    tw, tb = _randn((3,), 5), _randn((3,), 6)

    def jvp(mod: nn.Module) -> tuple[Tensor, Tensor | None]:
        with fwAD.dual_level():
            duals = {
                "weight": fwAD.make_dual(mod.weight.detach(), tw),
                "bias": fwAD.make_dual(mod.bias.detach(), tb),
            }
            out = functional_call(mod, duals, (fwAD.make_dual(x, tx),))
            primal, tangent = fwAD.unpack_dual(out)
        return primal, tangent

    y, t = jvp(layer)
    y_ref, t_ref = jvp(ref)
    assert t is not None, "no output tangent"
    _close(y, y_ref, what="primal")
    _close(t, t_ref, what="tangent")
    _assert_state(layer, ref)
    h = 1e-6
    with torch.no_grad():
        w, b = ref.weight.clone(), ref.bias.clone()
        plus = functional_call(ref, {"weight": w + h * tw, "bias": b + h * tb}, (x + h * tx,))
        minus = functional_call(ref, {"weight": w - h * tw, "bias": b - h * tb}, (x - h * tx,))
    _close(t, (plus - minus) / (2 * h), 1e-6, "tangent vs central difference")


# --------------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------------


@MODES
@LAYERS
def test_func_grad_jacobians_hessian(
    impl: SimpleNamespace,
    name: str,
    shape: tuple[int, ...],
    train: bool,
) -> None:
    """``torch.func`` grad / jacrev / jacfwd / hessian of the layer equal plain autograd on
    torch.nn's. Training uses track_running_stats=False: torch.nn's in-place running-stat update
    of a captured buffer is refused inside a grad transform."""
    layer, ref = _layer_pair(impl, name, train, track=not train)
    x, w = _randn(shape, 3), _randn(shape, 4)

    def scalar(mod: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda x: (torch.tanh(mod(x)) * w).sum()

    jac = torch.autograd.functional.jacobian
    _close(grad(scalar(layer))(x), jac(scalar(ref), x), what="grad")
    _close(jacrev(layer)(x), jac(ref, x), what="jacrev")
    _close(jacfwd(layer)(x), jac(ref, x), what="jacfwd")
    want = torch.autograd.functional.hessian(scalar(ref), x)
    _close(hessian(scalar(layer))(x), want, what="hessian")


@pytest.mark.parametrize(
    "case",
    ["eval", "train_untracked", "train_batched_buffers", "train_patched"],
)
@LAYERS
def test_vmap(impl: SimpleNamespace, name: str, shape: tuple[int, ...], case: str) -> None:
    """``vmap`` over a stack of batches equals a loop of eager torch.nn calls (output, input and
    parameter gradients, running stats), in the modes torch.func supports for batch norm: eval;
    training without running stats; training with running stats batched like the input
    (``functional_call`` with stacked buffers); training after
    ``torch.func.replace_all_batch_norm_modules_``."""
    train = case != "eval"
    layer, ref = _layer_pair(impl, name, train, track=case != "train_untracked")
    xs = _randn((3, *shape), 3)
    if case == "train_patched":
        torch.func.replace_all_batch_norm_modules_(layer)
        torch.func.replace_all_batch_norm_modules_(ref)
    if case == "train_batched_buffers":
        bufs = {n: torch.stack([b] * len(xs)) for n, b in layer.named_buffers()}
        ref_bufs = [{n: b.clone() for n, b in ref.named_buffers()} for _ in xs]

        def batched(v: Tensor) -> Tensor:
            return vmap(lambda b, x: functional_call(layer, b, (x,)))(bufs, v)

        def looped(v: Tensor) -> Tensor:
            return torch.stack(
                [functional_call(ref, b, (x,)) for b, x in zip(ref_bufs, v, strict=True)]
            )

        _compare(_run(batched, layer, xs, _names(ref)), _run(looped, ref, xs, _names(ref)))
        for i, rb in enumerate(ref_bufs):  # functional_call updated the passed buffers in place
            assert int(rb["num_batches_tracked"]) == 4
            for n, want in rb.items():
                _close(bufs[n][i], want, what=f"slice {i} {n}")
        return
    got = _run(vmap(layer), layer, xs, _names(ref))
    want = _run(lambda v: torch.stack([ref(x) for x in v]), ref, xs, _names(ref))
    _compare(got, want)
    _assert_state(layer, ref)


def test_vmap_train_unbatched_running_stats_raises(impl: SimpleNamespace) -> None:
    """torch.nn refuses vmap in training when running stats would be updated in place unbatched
    (torch.func docs, "Patching Batch Norm"); a silent update from several batches is wrong."""
    layer, ref = _layer_pair(impl, "BatchNorm2d", True)
    xs = _randn((3, 2, 3, 2, 2), 3)
    with pytest.raises(RuntimeError):
        vmap(ref)(xs)
    with pytest.raises(RuntimeError):
        vmap(layer)(xs)


@MODES
@LAYERS
def test_is_grads_batched(impl: SimpleNamespace, name: str, shape: tuple[int, ...], train: bool):
    """``autograd.grad(..., is_grads_batched=True)`` equals a loop of vector-Jacobian products."""
    layer, ref = _layer_pair(impl, name, train)
    x = _randn(shape, 3)
    vs = _randn((4, *shape), 4)

    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    got = torch.autograd.grad(y, [xg, *layer.parameters()], vs, is_grads_batched=True)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    loop = [torch.autograd.grad(yr, [xr, *ref.parameters()], v, retain_graph=True) for v in vs]
    for i, g in enumerate(got):
        assert g is not None, f"gradient {i}: none"
        _close(g, torch.stack([row[i] for row in loop]), what=f"batched gradient {i}")


# --------------------------------------------------------------------------------------------
# checkpoint, in-place ops, resize_, inference mode
# --------------------------------------------------------------------------------------------


@MODES
def test_checkpoint_non_reentrant(impl: SimpleNamespace, train: bool) -> None:
    """``checkpoint(use_reentrant=False)``: eager output and gradients; the running stats equal
    torch.nn's under checkpoint (its recomputation in backward updates them a second time)."""
    model, ref = _pair(_net, impl, train)
    ref_ckpt = copy.deepcopy(ref)
    (x,) = _inputs(1)

    def ckpt(mod: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda v: checkpoint(mod, v, use_reentrant=False)

    got = _run(ckpt(model), model, x, _names(ref))
    _compare(got, _run(ref, ref, x, _names(ref)))
    _compare(_run(ckpt(ref_ckpt), ref_ckpt, x, _names(ref)), got)
    _assert_state(model, ref_ckpt)


@pytest.mark.parametrize("shape", [(32, 64, 32, 32), (4, 3, 2, 2)], ids=["8MiB", "small"])
@MODES
def test_inplace_ops_on_output(impl: SimpleNamespace, shape: tuple[int, ...], train: bool):
    """``y = bn(x); y.add_(1); y.relu_()`` then backward, in float32: float64 torch.nn's output,
    gradients and running stats to float32 accuracy (the layer must not save its output for
    backward unless autograd guards it)."""
    layer, ref = _layer_pair(impl, "BatchNorm2d", train, channels=shape[1], dtype=torch.float32)
    ref.double()
    x = _randn(shape, 3, torch.float32) * 2 + 0.5

    def fn(mod: nn.Module) -> Callable[[Tensor], Tensor]:
        def run(v: Tensor) -> Tensor:
            y = mod(v)
            y.add_(1)
            y.relu_()
            return y

        return run

    got = _run(fn(layer), layer, x, ["weight", "bias"])
    want = _run(fn(ref), ref, x.double(), ["weight", "bias"])
    _compare({k: None if v is None else v.double() for k, v in got.items()}, want, 5e-6)
    _assert_state(layer.double(), ref, 5e-6)


@MODES
def test_resize_output(impl: SimpleNamespace, train: bool) -> None:
    """torch.nn: ``resize_`` on an output that requires grad raises; under no_grad the output is
    an ordinary contiguous tensor, so resizing keeps its values in memory order."""
    layer, ref = _layer_pair(impl, "BatchNorm2d", train)
    x0, x1 = _randn((2, 3, 4, 4), 3), _randn((2, 3, 4, 4), 4)
    for mod in (ref, layer):
        with pytest.raises(RuntimeError, match="resize"):
            mod(x0).resize_(10)
    with torch.no_grad():
        y, want = layer(x1), ref(x1).flatten()
        y.resize_(want.numel())
        _close(y, want, what="resized to numel")
        y.resize_(2 * want.numel())
        _close(y[: want.numel()], want, what="grown")
        y.resize_(2, 3)
        _close(y, want[:6].view(2, 3), what="shrunk")
    _assert_state(layer, ref)


@MODES
def test_inference_mode(impl: SimpleNamespace, train: bool) -> None:
    """A forward under ``torch.inference_mode()`` gives eager numbers and state, and leaves the
    buffers usable by a later ordinary training step (they must not become inference tensors)."""
    model, ref = _pair(_net, impl, train)
    x0, x1 = _inputs(2)
    with torch.inference_mode():
        y, y_ref = model(x0), ref(x0)
    _close(y, y_ref, what="output")
    _assert_state(model, ref)
    model.train()
    ref.train()
    _compare(_run(model, model, x1, _names(ref)), _run(ref, ref, x1, _names(ref)))
    _assert_state(model, ref)
