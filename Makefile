# Two user-facing commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
# Busy-waiting OpenMP threads collapse 5-20x when processes share 2 cores (tests spawn several).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast install lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel on disk; any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ann]'
	touch $(STAMP)

install: $(STAMP)

BACKEND ?= accelerate
demo: $(STAMP)
	$(BIN)/python -m snag_dist.demo --out runs/demo --backend $(BACKEND)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Unit tier for the edit-test loop: no multi-process (dist), Ray (ray) or slow tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not dist and not ray" tests

lint: $(STAMP)
	$(BIN)/ruff check snag_dist tests benchmarks tuning

clean:
	rm -rf runs .pytest_cache
