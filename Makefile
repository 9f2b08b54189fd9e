# Two entry points for a fresh machine: `make run` (set up, run the main job on the
# embedded defaults) and `make test` (set up, lint, run every test). Both install into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MODLOSS_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup run test lint bench clean

$(BIN)/modloss: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[sweep,dev]"
	touch $@

setup: $(BIN)/modloss

run: setup
	$(BIN)/modloss train --model 256-M-4-H --lam 0.95 --epochs 3 --subset 10000 --out runs/quickstart

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
