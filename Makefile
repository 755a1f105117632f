# Two entry points: `make quickstart` and `make test`. Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
WORK ?= scpretrain_work

.PHONY: venv bench-venv annbatch-venv quickstart test lint clean

# The installed packages are compiled on every core at once, not one file at a time by pip (about
# 30 s less on two cores). As under pip, files that do not compile (torch's helpers written for
# Python 3.12) are skipped quietly.
COMPILE = -m compileall -qq -j 0

$(BIN)/scpretrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to a release the project's range admits (a CPU wheel where one is
	# available locally; GPU machines install their CUDA build of a release in range instead)
	$(BIN)/python -m pip install -q --no-compile "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	$(BIN)/python $(COMPILE) $(VENV)/lib || true
	touch $@

venv: $(BIN)/scpretrain

# The benchmarks' peers (tiledbsoma-ml, CellTypist) pin older libraries (scikit-learn < 1.8), so
# they live in their own environment and never constrain the core one.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/bin/scpretrain: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q --no-compile "torch==2.13.0"
	$(BENCH_VENV)/bin/python -m pip install -q --no-compile -e ".[dev,bench]"
	$(BENCH_VENV)/bin/python $(COMPILE) $(BENCH_VENV)/lib || true
	touch $@

bench-venv: $(BENCH_VENV)/bin/scpretrain

# annbatch (a loader peer) needs Python >= 3.12: a venv of its own, without torch; `bench loader
# --loaders annbatch` runs it through bench/annbatch_child.py
PYTHON312 ?= $(shell command -v python3.12 || ls ~/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)
ANNBATCH_VENV := .venv-annbatch
$(ANNBATCH_VENV)/bin/python:
	$(PYTHON312) -m venv $(ANNBATCH_VENV)
	$(ANNBATCH_VENV)/bin/python -m pip install -q "annbatch[zarrs]==0.3.1"

annbatch-venv: $(ANNBATCH_VENV)/bin/python

quickstart: venv
	$(BIN)/scpretrain quickstart --work-dir $(WORK)

# Three pytest workers, a test module each at a time, the longest first (tests/integration/
# conftest.py): most integration tests wait on process start-ups and Ray, so three keep the two
# cores busy (TEST_WORKERS=0: one process). The package is compiled first: an editable install
# is not, and where PYTHONDONTWRITEBYTECODE is set each of the many processes the tests start
# (Ray's workers and actors, CLI runs) would compile every module it imports again.
TEST_WORKERS ?= 3
test: venv
	$(BIN)/python -m compileall -q scpretrain_dist
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check scpretrain_dist tests

clean:
	rm -rf $(WORK)
