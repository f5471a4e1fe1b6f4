"""Percentiles of pre-activations over training, for any model (the paper's Figure 1(b, c)).

Ioffe & Szegedy (2015, Section 4.1) plot the 15th, 50th and 85th percentiles of the input to a
typical sigmoid of the last hidden layer over training: drifting without BN, stable with it.
:class:`ActivationTracker` records the same curves for every nonlinearity of any model.

By default it watches the *input* of every activation module (``nn.Sigmoid``, ``nn.ReLU``,
``nn.Tanh``, ``nn.GELU``, ``nn.LeakyReLU``, ...) through a forward pre-hook — the pre-activation
``Wx + b`` or ``BN(Wx)``. Models that call ``torch.sigmoid`` / ``F.relu`` in ``forward`` have no
such module: name the layers instead (``layers=["fc3"]``); a named activation module is
recorded at its input, any other named module at its output.

Memory is bounded: at its first call each layer draws a fixed random subset of ``units``
features (seeded, the same for the whole run), and of those values at most ``max_values`` per
recorded step are kept. Percentiles use ``torch.quantile`` (linear interpolation) in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ActivationTracker", "ACTIVATIONS"]

# Modules whose input is a pre-activation.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
)


class ActivationTracker:
    """Record percentiles of pre-activations per layer while a model trains.

    Use as a context manager (hooks are removed on exit, also on an exception)::

        with ActivationTracker(model, every=50) as tracker:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y); ...
        tracker.results()

    A *step* is one forward call of ``model`` in training mode (``model.training``); eval-mode
    calls are not counted or recorded unless ``train_only=False``. Steps 0, every, 2·every, ...
    are recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        percentiles: Sequence[float] = (15, 50, 85),
        every: int = 1,
        *,
        units: int = 64,  # features sampled per layer (fixed for the run)
        max_values: int = 4096,  # values kept per layer and recorded step
        keep_values: bool = False,  # also store the sampled values (memory: steps × max_values)
        train_only: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (record each n-th step), got {every!r}")
        for name, value in (("units", units), ("max_values", max_values)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        qs = [float(p) for p in percentiles]
        if not qs or any(not 0.0 <= p <= 100.0 for p in qs):
            raise ValueError(f"percentiles must be numbers in [0, 100], got {list(percentiles)!r}")
        self.model = model
        self.percentiles = qs
        self.every = every
        self.units = units
        self.max_values = max_values
        self.keep_values = keep_values
        self.train_only = train_only
        self.seed = seed
        self.targets = _select_layers(model, layers)  # name -> (module, "input" | "output")
        self.step = 0
        self._recording = False
        self._handles: list[Any] = []
        self._unit_index: dict[str, Tensor] = {}
        self._gen = torch.Generator().manual_seed(seed)
        self._records: dict[str, dict[str, list]] = {
            name: {"steps": [], "percentiles": [], "mean": [], "std": [], "values": []}
            for name in self.targets
        }

    # ------------------------------------------------------------------ hooks
    def attach(self) -> ActivationTracker:
        """Register the hooks (``__enter__`` does this)."""
        if self._handles:
            raise RuntimeError("ActivationTracker is already attached; use one `with` block")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._begin_step))
            self._handles.append(self.model.register_forward_hook(self._end_step))
            for name, (module, where) in self.targets.items():
                if where == "input":
                    hook = module.register_forward_pre_hook(self._input_hook(name))
                else:
                    hook = module.register_forward_hook(self._output_hook(name))
                self._handles.append(hook)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this tracker registered; safe to call twice."""
        while self._handles:
            self._handles.pop().remove()
        self._recording = False

    def __enter__(self) -> ActivationTracker:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _begin_step(self, module: nn.Module, args: Any) -> None:
        if self.train_only and not module.training:
            self._recording = False
            return
        self._recording = self.step % self.every == 0
        self._current = self.step
        self.step += 1

    def _end_step(self, module: nn.Module, args: Any, output: Any) -> None:
        self._recording = False

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if self._recording and args and isinstance(args[0], Tensor):
                self._record(name, args[0])

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._recording and isinstance(output, Tensor):
                self._record(name, output)

        return hook

    # ------------------------------------------------------------------ recording
    def _record(self, name: str, x: Tensor) -> None:
        rec = self._records[name]
        if rec["steps"] and rec["steps"][-1] == self._current:
            return  # a module called twice in one step: keep its first call
        values = self.sample(name, x)
        v64 = values.double()
        q = torch.tensor(self.percentiles, dtype=torch.float64) / 100.0
        rec["steps"].append(self._current)
        rec["percentiles"].append(torch.quantile(v64, q).tolist())
        rec["mean"].append(v64.mean().item())
        rec["std"].append(v64.std(correction=0).item())
        if self.keep_values:
            rec["values"].append(values)

    def sample(self, name: str, x: Tensor) -> Tensor:
        """The values of ``x`` this tracker keeps for layer ``name``: fixed units, ≤ max_values."""
        flat = x.detach().reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().reshape(-1, 1)
        idx = self._unit_index.get(name)
        if idx is None or int(idx.max()) >= flat.shape[1]:
            n = min(self.units, flat.shape[1])
            idx = torch.randperm(flat.shape[1], generator=self._gen)[:n].sort().values
            self._unit_index[name] = idx
        values = flat[:, idx.to(flat.device)].reshape(-1)
        if values.numel() > self.max_values:  # evenly spaced over (example, unit) pairs
            keep = torch.linspace(0, values.numel() - 1, self.max_values).round().long()
            values = values[keep.to(values.device)]
        return values.float().cpu().clone()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, as tensors and plain data (a checkpoint that loads with
        ``torch.load(weights_only=True)``), so an interrupted run can go on recording."""
        return {
            "step": self.step,
            "records": {n: {k: list(v) for k, v in r.items()} for n, r in self._records.items()},
            "unit_index": dict(self._unit_index),
            "generator": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a tracker on the same layers."""
        if set(state["records"]) != set(self._records):
            raise ValueError(
                f"the saved tracker watched layers {sorted(state['records'])}, this one "
                f"{sorted(self._records)}; create it with the same model and layers"
            )
        self.step = int(state["step"])
        self._records = {n: {k: list(v) for k, v in r.items()} for n, r in state["records"].items()}
        self._unit_index = dict(state["unit_index"])
        self._gen.set_state(state["generator"])

    # ------------------------------------------------------------------ output
    def results(self) -> dict[str, Any]:
        """JSON-ready: ``{"percentiles": [...], "every": n, "layers": {name: {...}}}``."""
        layers = {}
        for name, rec in self._records.items():
            idx = self._unit_index.get(name)
            layers[name] = {
                "where": self.targets[name][1],
                "module": type(self.targets[name][0]).__name__,
                "units": idx.tolist() if idx is not None else [],
                "steps": list(rec["steps"]),
                "percentiles": [list(p) for p in rec["percentiles"]],
                "mean": list(rec["mean"]),
                "std": list(rec["std"]),
            }
        return {"percentiles": list(self.percentiles), "every": self.every, "layers": layers}

    def values(self, name: str) -> list[Tensor]:
        """Sampled values per recorded step of layer ``name`` (needs ``keep_values=True``)."""
        if name not in self._records:
            raise ValueError(f"unknown layer {name!r}; tracked layers: {list(self._records)}")
        if not self.keep_values:
            raise ValueError("values were not kept; create the tracker with keep_values=True")
        return list(self._records[name]["values"])


def _select_layers(
    model: nn.Module, layers: Sequence[str] | None
) -> dict[str, tuple[nn.Module, str]]:
    modules = dict(model.named_modules())
    if layers is None:
        found = {n: (m, "input") for n, m in modules.items() if isinstance(m, ACTIVATIONS)}
        if not found:
            kinds = ", ".join(a.__name__ for a in ACTIVATIONS[:5])
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear | nn.Conv2d)]
            raise ValueError(
                f"{type(model).__name__} has no activation modules ({kinds}, ...) to watch; "
                f"pass layers=[names of modules whose output is a pre-activation], "
                f"e.g. layers={linear[:3]}"
            )
        return found
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a list of module names, got the string {layers!r}; use [{layers!r}]"
        )
    missing = [n for n in layers if n not in modules or n == ""]
    if missing:
        available = [n for n in modules if n][:20]
        raise ValueError(f"no modules named {missing} in the model; available: {available}")
    return {
        n: (modules[n], "input" if isinstance(modules[n], ACTIVATIONS) else "output")
        for n in layers
    }
