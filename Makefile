# nanoseek: two commands do all the set-up (see README.md).
#   make run   create/refresh .venv, install, run the main job
#   make test  create/refresh .venv, install with dev extras, lint + tests
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEVSTAMP:= $(VENV)/.installed-dev

.PHONY: run test test-slow lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build lies on this machine's disk; a bare `torch` pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(DEVSTAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(STAMP)

run: $(STAMP)
	$(BIN)/nanoseek inspect --all
	$(BIN)/nanoseek speedrun --out runs/speedrun

test: $(DEVSTAMP)
	$(BIN)/ruff check nanoseek tests benchmarks
	$(BIN)/ruff format --check nanoseek tests benchmarks
	$(BIN)/python -m pytest

test-slow: $(DEVSTAMP)
	$(BIN)/python -m pytest -m slow

lint: $(DEVSTAMP)
	$(BIN)/ruff check --fix nanoseek tests benchmarks
	$(BIN)/ruff format nanoseek tests benchmarks

bench: $(DEVSTAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
