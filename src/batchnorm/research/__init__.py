"""The research workbench: the paper's experiments, their data, the one training engine, and
the ``batchnorm`` command (``python -m batchnorm``).

It is kept apart from the core library (``batchnorm``: op, layers, tools, diagnostics), which
depends on torch alone. This part needs the ``experiments`` extra::

    pip install "batchnorm[experiments]"

Layout: :mod:`.engine` (run directory, checkpoints, metrics log, sampler, training loop,
reports and figures), :mod:`.data` (IDX files, MNIST / Fashion-MNIST / digits sources,
augmentation), :mod:`.experiments` (one module per experiment: a config, a model, and what to
measure), :mod:`.cli`.
"""

from __future__ import annotations

import importlib.util

# import name -> distribution name, for the message below
_EXTRA = {
    "matplotlib": "matplotlib", "tqdm": "tqdm", "numpy": "numpy", "sklearn": "scikit-learn",
    "PIL": "pillow",
}  # fmt: skip


def missing_extras() -> list[str]:
    """Distributions of the ``experiments`` extra that are not installed."""
    return [dist for mod, dist in _EXTRA.items() if importlib.util.find_spec(mod) is None]


def require_extras() -> None:
    """ImportError naming what is missing and the one command that installs it."""
    missing = missing_extras()
    if missing:
        raise ImportError(
            f"the batchnorm research workbench needs {', '.join(missing)}; install them with "
            f'pip install "batchnorm[experiments]"'
        )


require_extras()
