# Two commands matter: `make reproduce` (the main job) and `make test` (the suite).
# Both set themselves up: a local .venv with torch==2.13.0 installed first (the CPU
# wheel on disk here; any other spec would pull a multi-GB CUDA build), then the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow lint bench reproduce clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m batchnorm.ops  # compile the C++ kernels now (~1 min), not inside the first test
	touch $(STAMP)

setup: $(STAMP)

test: lint  # lint (ruff, ruff format, mypy) first: CI runs `make test`
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# mypy checks the core (src/batchnorm minus research/), as configured in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/run.py

reproduce: $(STAMP)
	bash scripts/reproduce.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
