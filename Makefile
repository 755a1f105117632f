# Two entry points: `make quickstart` and `make test`. Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
WORK ?= scpretrain_work

.PHONY: venv bench-venv annbatch-venv quickstart test lint clean

# Python compiles each module the first time one of these commands imports it and keeps the
# bytecode (in .venv and the ignored __pycache__ folders), even where the environment asks it not
# to: the tests and the pipeline start many Python processes (Ray's workers and actors, CLI runs),
# each of which would otherwise compile everything it imports again. So pip compiles nothing up
# front (most of what it installs is never imported; half a minute less on two cores).
unexport PYTHONDONTWRITEBYTECODE

# ... but what the commands, Ray's processes and the tests all import is compiled once here, in two
# processes (one per core), before the test workers, Ray's processes and the quickstart start at
# once and each compile the same modules. That includes what torch imports on first use, not on
# `import torch`: an optimizer (torch._dynamo, sympy), DDP (torch.distributed's tensor and FSDP
# packages); and MLflow's SQL store.
WARM_RAY := torch torch._dynamo torch.distributed.fsdp ray.train.torch ray.train.v2._internal.execution.controller \
	ray.dashboard.agent ray.dashboard.dashboard ray._private.runtime_env.agent.main ray.util.state \
	scpretrain_dist.train.pretrain scpretrain_dist.pseudolabel.pool
# (what needs torch last, when the other process has compiled it)
WARM_REST := mlflow.pyfunc mlflow.store.tracking.sqlalchemy_store matplotlib.pyplot tiledbsoma zarr anndata faiss \
	sklearn.linear_model sklearn.svm scpretrain_dist.cli scpretrain_dist.pipeline scpretrain_dist.evaluate.protocols \
	scpretrain_dist.evaluate.figures scpretrain_dist.serve.annotate scpretrain_dist.serve.server
# (torch._dynamo makes the folder of torch's compiler cache on import: inside the venv, not in /tmp)
IMPORT = TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(VENV)/torchinductor \
	$(BIN)/python -W ignore -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
WARM_UP = $(IMPORT) $(WARM_RAY) & ray=$$!; $(IMPORT) $(WARM_REST) && wait $$ray

$(BIN)/scpretrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to a release the project's range admits (a CPU wheel where one is
	# available locally; GPU machines install their CUDA build of a release in range instead)
	$(BIN)/python -m pip install -q --no-compile "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	$(WARM_UP)
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
	touch $@

bench-venv: $(BENCH_VENV)/bin/scpretrain

# annbatch (a loader peer) needs Python >= 3.12: a venv of its own, without torch; `bench loader
# --loaders annbatch` runs it through bench/annbatch_child.py
# (the first that runs: a pyenv shim named python3.12 exists even where it has no 3.12 to run)
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" 2>/dev/null && { command -v "$$p"; break; }; done)
ANNBATCH_VENV := .venv-annbatch
$(ANNBATCH_VENV)/bin/python:
	@test -n "$(PYTHON312)" || { echo "annbatch needs Python 3.12: none found (give one: make annbatch-venv PYTHON312=/path/to/python3.12)"; exit 2; }
	$(PYTHON312) -m venv $(ANNBATCH_VENV)
	$(ANNBATCH_VENV)/bin/python -m pip install -q "annbatch[zarrs]==0.3.1"

annbatch-venv: $(ANNBATCH_VENV)/bin/python

quickstart: venv
	$(BIN)/scpretrain quickstart --work-dir $(WORK)

# Three pytest workers, a test module each at a time, the longest first (tests/integration/
# conftest.py): most integration tests wait on process start-ups and Ray, so three keep the two
# cores busy (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 3
test: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check scpretrain_dist tests

clean:
	rm -rf $(WORK)
