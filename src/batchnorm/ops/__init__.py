"""The BN op: the paper's equations (``reference``, the tests' oracle), the C++ kernels
(``native``) and the one path that chooses between them and PyTorch's kernel (``op``)."""

from .op import get_backend, set_backend

__all__ = ["get_backend", "set_backend"]
