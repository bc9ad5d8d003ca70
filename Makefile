# The two commands of the README. Each sets itself up: a virtual environment in .venv with the CPU build of
# PyTorch installed first (an unpinned torch would pull a multi-GB CUDA build), then this project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow setup lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## the main job end to end on embedded defaults (local Ray, MLflow sqlite, synthetic data)
	$(BIN)/h2ot demo $(ARGS)

test: $(STAMP)  ## the fast test suite
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)  ## end-to-end tests (Ray clusters, training); CI runs them too
	$(BIN)/python -m pytest -q -m slow $(ARGS) || test $$? -eq 5  # 5: no slow test collected

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/h2ot bench --json
