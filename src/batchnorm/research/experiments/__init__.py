"""The paper's experiments, runnable as ``batchnorm reproduce NAME``.

``EXPERIMENTS`` maps a CLI name to the module implementing it. An experiment is a config, a
model and what to measure; the engine (:func:`batchnorm.research.engine.launch.run_experiment`)
does the rest. Each module defines

- ``NAME`` and ``Config``: a dataclass deriving from ``engine.config.RunConfig`` (and
  ``DataConfig`` / ``DeviceConfig`` for the shared options); every field has a default and
  ``metadata={"help": ...}`` and becomes a ``--kebab-case`` option; ``Config.quick()`` is the
  CI-sized run;
- ``load(cfg) -> Data``: the data (``engine.data``); it fails before anything is written;
- ``arms(cfg, data) -> list[Arm]``: the networks to train and what to measure on them;
- ``summarize(cfg, data, results) -> dict``: summary.json from each arm's result;
- ``plot(summary, out)``, ``report(summary, run_dir) -> ReportSections`` and
  ``describe(summary) -> str``: the figures, its part of report.html, the terminal lines;
- ``run(cfg, out, *, resume=False, overwrite=False, quiet=False) -> dict``: one line calling
  ``run_experiment`` with the module itself.

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
    "imagenet": "batchnorm.research.experiments.imagenet",
}


def load_experiment(name: str) -> ModuleType:
    """Import the module registered as ``name``; ValueError listing the known names otherwise."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}"
        )
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "load_experiment"]
