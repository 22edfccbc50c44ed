# Quickstart targets; each sets up .venv itself (Python 3.11 and the package index are all it needs).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the package metadata changes.
.install-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

.install-stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $@ .install-stamp

install: .install-stamp
install-test: .install-stamp-test

demo: .install-stamp
	$(BIN)/sdjax demo --out out/demo

test: .install-stamp-test
	$(BIN)/python -m pytest -q --durations=15

test-slow: .install-stamp-test
	$(BIN)/python -m pytest -q -m slow

lint: .install-stamp-test
	$(BIN)/ruff check sdjax tests bench configs
	$(BIN)/ruff format --check sdjax tests bench configs
	shellcheck launch/*.sh launch/*.sbatch .ci/run
