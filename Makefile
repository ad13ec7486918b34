# aidx: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# CPU build of PyTorch (lies on the CI machines' disk; a plain `torch` pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
# Test processes (pytest-xdist; a file's tests stay together, so module fixtures run once):
# two halve the suite's time on the 2-core machine, most of it spent waiting on peers. Files go
# out in the order tests/conftest.py gives them (the longest first), not by their test counts.
TEST_WORKERS ?= 2

.PHONY: run test lint typecheck format bench system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The serving install: no torch, no MONAI.
$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	touch $@

# Tests need the training extras too (CPU torch first, so the range in [train] is satisfied).
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_CPU)"
	$(PIP) install --quiet -e ".[dev,train]"
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(VENV)/bin/aidx serve --demo

system-deps:
	bash scripts/install-system-deps.sh

# The viewers' own loading code (OHIF 3.13, Cornerstone3D 5.14) that tests/viewers runs in Node,
# pinned by its lock file.
VIEWER_HARNESS := tests/viewers/node
$(VIEWER_HARNESS)/node_modules/.installed: $(VIEWER_HARNESS)/package-lock.json
	npm ci --prefix $(VIEWER_HARNESS) --no-audit --no-fund --loglevel=error
	touch $@

test: system-deps $(VENV)/.installed-test $(VIEWER_HARNESS)/node_modules/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-test
	$(PY) benchmarks/phantom.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache aidx-data build *.egg-info
