# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv with Python 3.12 (megatron-core 0.19 needs it) and install the package with
# its dev extras once; the stamp file makes a second run install nothing. No pip cache: torch's
# wheels (a CUDA build, several GB) would otherwise lie on disk twice, and CI's disk ran out once.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-megatron-locmoe

# Python 3.12: $(PYTHON) if given; else pyenv's 3.12 interpreters (the pyenv shim only works with
# PYENV_VERSION set, so use the real binary); else python3.12 on PATH.
PYTHON ?= $(shell \
	root=$$(pyenv root 2>/dev/null); \
	for c in $$(ls -d $$root/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r) $$(command -v python3.12 2>/dev/null); do \
		if "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then echo "$$c"; break; fi; \
	done)

.PHONY: help venv demo test test-fast lint clean

help:
	@echo "make demo   - create .venv, install, run the simulated multi-node job on the CPU"
	@echo "make test   - create .venv, install, run the test suite (CPU, gloo)"
	@echo "make test-fast - the same without the tests marked slow (the cluster trainings)"
	@echo "make lint   - ruff"

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
		echo "error: Python 3.12 not found (megatron-core 0.19 needs it)." >&2; \
		echo "  Install it (e.g. 'pyenv install 3.12') or pass PYTHON=/path/to/python3.12." >&2; \
		exit 1; fi
	@if [ ! -x $(PY) ]; then echo "creating $(VENV) with $(PYTHON)"; "$(PYTHON)" -m venv $(VENV); fi
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron_locmoe.analysis.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)  # the edit-test loop: no multi-rank trainings (pyproject.toml's markers)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check megatron_locmoe tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
