"""The paper's experiments, runnable as ``batchnorm reproduce NAME``.

``EXPERIMENTS`` maps a CLI name to the module implementing it. Each module defines

- ``Config``: a dataclass; every field has a default and ``metadata={"help": ...}`` and
  becomes a ``--kebab-case`` CLI option; ``Config.quick()`` returns the CI-sized config;
- ``run(cfg, out, *, resume=False, overwrite=False, quiet=False) -> dict``: trains, writes the run directory
  (see :mod:`batchnorm.experiments.runner`) and returns the summary (also in summary.json);
- ``report(summary, run_dir) -> ReportSections``: what ``report.html`` shows for it
  (see :mod:`batchnorm.experiments.report`).

To add one: write the module, then add one line to ``EXPERIMENTS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "fig1": "batchnorm.experiments.fig1",
    "lenet": "batchnorm.experiments.lenet",
    "ablation": "batchnorm.experiments.ablation",
    "claims": "batchnorm.experiments.claims",
    "diagnose": "batchnorm.diagnostics.diagnose",
    "small-batch": "batchnorm.experiments.small_batch",
}


def load_experiment(name: str) -> ModuleType:
    """Import the module registered as ``name``; ValueError listing the known names otherwise."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}"
        )
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "load_experiment"]
