# Quickstart: `make run` (main job on the built-in default), `make test` (whole suite). Each installs first.
# Installs are reproducible: `make install` takes the exact versions in constraints.txt (the ones the suite last
# passed with). Upgrades are deliberate: `make upgrade-check` installs the newest versions pyproject.toml allows into
# a scratch venv (.venv-upgrade), shows what changed against constraints.txt and runs the suite there; if it passes,
# `make constraints VENV=.venv-upgrade` rewrites constraints.txt from that venv: commit it, then `make install`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UPGRADE_VENV := .venv-upgrade
CONSTRAINTS := constraints.txt
EXTRAS := .[dev,scale,kernels]
# torch first, pinned: any other spec pulls a multi-GB CUDA build on CPU machines.
TORCH := torch==2.13.0
PYTEST_ARGS ?=
# parallel test workers (pytest-xdist), one test file at a time per worker: a module's fixtures (multi-rank runs,
# tiny pipelines) are built once and its subprocess launches never compete with each other; XDIST= runs one process
XDIST ?= -n auto --dist loadfile
# OpenMP threads that spin while waiting make small-model CPU runs 10-40x slower whenever anything else runs
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run test test-slow bench upgrade-check constraints clean

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --upgrade pip setuptools
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) $(TORCH)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --no-build-isolation -e "$(EXTRAS)"
	touch $(STAMP)

install: $(STAMP)

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/safeprune run --out runs/default $(RUN_ARGS)

# the layer contracts ([tool.importlinter] in pyproject.toml), then the suite; $(1) is the venv
define run_suite
	if grep -q '^\[tool\.importlinter\]' pyproject.toml; then $(1)/bin/lint-imports; fi
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(1)/bin/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)
endef

test: install
	$(call run_suite,$(VENV))

test-slow: install
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/step.py

# newest allowed versions, no constraints (torch stays pinned: see TORCH); downloads ~2.6 GB into a fresh venv and
# rebuilds the C++ extension in place (same torch, so .venv keeps working)
upgrade-check:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(UPGRADE_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --no-build-isolation -e "$(EXTRAS)" $(TORCH)
	$(UPGRADE_VENV)/bin/python -m pip freeze --all --exclude-editable | sed -e 's/^\(torch==[^+]*\)+.*/\1/' \
		> $(UPGRADE_VENV)/newest.txt
	grep -v '^#' $(CONSTRAINTS) > $(UPGRADE_VENV)/pinned.txt
	@echo "== $(CONSTRAINTS) (-) against the newest allowed versions (+):"
	@diff -u $(UPGRADE_VENV)/pinned.txt $(UPGRADE_VENV)/newest.txt | grep '^[-+][^-+]' || echo "(no change)"
	$(call run_suite,$(UPGRADE_VENV))

# rewrite constraints.txt from a venv (VENV=.venv-upgrade to promote a passing upgrade-check); keeps the header
constraints:
	test -x $(VENV)/bin/python
	{ grep '^#' $(CONSTRAINTS); $(VENV)/bin/python -m pip freeze --all --exclude-editable \
		| sed -e 's/^\(torch==[^+]*\)+.*/\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) build *.egg-info runs
