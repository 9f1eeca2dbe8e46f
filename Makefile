# Two commands set everything up from nothing (only Python 3.11+ and pip needed):
#   make run    the local dev world and the sidecar
#   make test   lint, type-check and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-install when pyproject.toml or the pins change. The runtime dependencies are installed at
# the versions the image ships (deploy/constraints.txt), so the tests run on the code that is measured
# into PCR0; the dev and test tools are not pinned there and come at their newest.
PINS := --constraint deploy/constraints.txt

$(VENV)/.dev-installed: pyproject.toml deploy/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(PINS)
	touch $@

$(VENV)/.test-installed: pyproject.toml deploy/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,test]' $(PINS)
	touch $@

run: $(VENV)/.dev-installed
	$(BIN)/sidecar dev

lint: $(VENV)/.test-installed
	$(BIN)/ruff check sidecar plugins tests bench
	$(BIN)/ruff format --check sidecar plugins tests bench
	$(BIN)/mypy

test: $(VENV)/.test-installed
	$(MAKE) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

format: $(VENV)/.test-installed
	$(BIN)/ruff format sidecar plugins tests bench
	$(BIN)/ruff check --fix sidecar plugins tests bench

$(VENV)/.bench-installed: pyproject.toml deploy/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,test,bench]' $(PINS)
	touch $@

# Each script prints its ratios against a baseline measured in the same run (needs wrk on PATH).
BENCHES := server attestation kms egress passenger vault
bench: $(VENV)/.bench-installed
	for b in $(BENCHES); do $(BIN)/python bench/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
