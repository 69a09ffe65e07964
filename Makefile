# Quickstart: `make run` (main job on the built-in default), `make test` (whole suite). Each installs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# OpenMP threads that spin while waiting make small-model CPU runs 10-40x slower whenever anything else runs
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run test test-slow bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: any other spec pulls a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,scale,kernels]"
	touch $(STAMP)

install: $(STAMP)

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/safeprune run --out runs/default $(RUN_ARGS)

test: install
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/step.py

clean:
	rm -rf $(VENV) build *.egg-info runs
