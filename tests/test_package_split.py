"""The core library apart from the research workbench (issue 14, item 1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("matplotlib", "tqdm", "sklearn", "numba", "pandas", "scipy")


def _loaded_after(code: str) -> set[str]:
    """Top-level modules a fresh interpreter has loaded after running ``code``."""
    script = code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(out.stdout.split())


def test_import_and_a_training_step_load_no_plotting_progress_or_toolkit_module():
    code = textwrap.dedent(
        """
        import torch, batchnorm
        bn = batchnorm.BatchNorm2d(3)
        act = batchnorm.BatchNormAct2d(3, activation="silu")
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        act(bn(x)).sum().backward()
        batchnorm.fold_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn).eval())
        """
    )
    loaded = _loaded_after(code)
    assert "batchnorm" in loaded
    # torch.hub imports tqdm itself when it is installed: judge what batchnorm adds to torch
    added = loaded - _loaded_after("import torch")
    assert not added & set(EXTRAS), sorted(added & set(EXTRAS))
    # the control: the workbench does load them, so the check above can fail
    assert {"matplotlib", "sklearn"} <= _loaded_after(
        "from batchnorm.research.engine import plots, runner\n"
        "from batchnorm.research.data import sources\n"
        "plots.pyplot(); sources.load_dataset('digits')"
    )


def test_the_core_declares_torch_and_ninja_only():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["dependencies"]}
    assert core == {"torch", "ninja"}
    extra = meta["optional-dependencies"]["experiments"]
    for dist in ("matplotlib", "tqdm", "numpy", "scikit-learn", "pillow"):
        assert any(d.startswith(dist) for d in extra), dist


def test_core_modules_never_import_the_workbench():
    core = ROOT / "src" / "batchnorm"
    offenders = [
        str(p.relative_to(core))
        for p in core.rglob("*.py")
        if "research" not in p.parts and "research" in p.read_text() and p.name != "__main__.py"
    ]
    assert offenders == []


def test_python_m_batchnorm_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "batchnorm", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    import batchnorm

    assert batchnorm.__version__ in out.stdout


def test_missing_extras_get_one_clear_message(monkeypatch):
    import importlib.util

    import batchnorm.research as R

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a)
    )
    assert R.missing_extras() == ["tqdm"]
    with pytest.raises(ImportError, match=r'pip install "batchnorm\[experiments\]"'):
        R.require_extras()
