"""The BN op: reference equations, torch.library registration, compiled CPU kernels."""

from .library import get_backend, set_backend

__all__ = ["get_backend", "set_backend"]
