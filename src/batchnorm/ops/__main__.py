"""``python -m batchnorm.ops``: build (or find) the C++ kernels now, not on first use.

``make setup`` runs it; ``-v`` shows the compiler's output.
"""

import sys

from .native import load

print(
    "batchnorm C++ kernels:",
    "ready"
    if load(verbose="-v" in sys.argv) is not None
    else "unavailable (torch's kernel is used)",
)
