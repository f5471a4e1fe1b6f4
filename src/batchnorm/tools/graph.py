"""The model's ``torch.fx`` graph with BN layers as leaves: what the whole-model tools read to
find conv → BN and BN → activation pairs inside custom ``forward``s (residual blocks, shortcuts).
"""

from __future__ import annotations

from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase


class BNLeafTracer(fx.Tracer):
    """torch.fx's tracer, with every BN-like layer kept as one ``call_module`` node (this
    package's layers are not under ``torch.nn``, so fx would trace into them)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _NormBase) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph | None:
    """The graph, or None when the model does not trace (data-dependent control flow, untraceable
    ops): the tools then fall back to ``nn.Sequential`` adjacency."""
    try:
        return BNLeafTracer().trace(model)
    except Exception:
        return None
