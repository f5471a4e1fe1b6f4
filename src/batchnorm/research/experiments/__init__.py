"""The paper's experiments, runnable as ``batchnorm reproduce NAME``.

``EXPERIMENTS`` maps a CLI name to the module implementing it. Each module defines

- ``Config``: a dataclass; every field has a default and ``metadata={"help": ...}`` and
  becomes a ``--kebab-case`` CLI option; ``Config.quick()`` returns the CI-sized config;
- ``run(cfg, out, *, resume=False, overwrite=False, quiet=False) -> dict``: trains, writes the run directory
  (see :mod:`batchnorm.research.engine.runner`) and returns the summary (also in summary.json);
- ``report(summary, run_dir) -> ReportSections``: what ``report.html`` shows for it
  (see :mod:`batchnorm.research.engine.report`).

To add one: write the module, then add one line to ``EXPERIMENTS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "fig1": "batchnorm.research.experiments.fig1",
    "lenet": "batchnorm.research.experiments.lenet",
    "ablation": "batchnorm.research.experiments.ablation",
    "claims": "batchnorm.research.experiments.claims",
    "diagnose": "batchnorm.research.experiments.diagnose",
    "small-batch": "batchnorm.research.experiments.small_batch",
}


def load_experiment(name: str) -> ModuleType:
    """Import the module registered as ``name``; ValueError listing the known names otherwise."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}"
        )
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "load_experiment"]
