# Two commands matter: `make demo` (the whole pipeline on the embedded stack) and `make test`.
# Both create the virtual environment when it is missing and are safe to run again.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
export PYTHONPATH := $(CURDIR)/include
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv demo test test-fast stack-test lint bench lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(BIN)/python -m leukemia demo $(if $(DATA),--data $(DATA),)

# tools/test-services.sh installs PostgreSQL and Redis for the stack test when they are missing.
# Three pytest workers, one test file each at a time (module fixtures stay in one process): the
# DAG-level tests wait on subprocesses and servers much of the time, so three keep 2 cores busy.
# --no-loadscope-reorder: files in collection order, so tests/conftest.py FIRST (the waiting files)
# start at once (xdist otherwise hands out the files with the most tests first).
test: venv
	bash tools/test-services.sh
	$(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

# The training DAG on the production stack (PostgreSQL, Redis, two Celery workers with no shared
# disk, MLflow server, moto), started on loopback by the test; needs postgresql and redis-server.
stack-test: venv
	bash tools/test-services.sh
	$(BIN)/python -m pytest -m stack

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python bench/s3_sync.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/ceiling.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/artifacts.py
	$(BIN)/python bench/scale.py

# Regenerate constraints.txt from a fresh environment built from requirements.txt alone.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet -r requirements.txt
	{ echo "# Full lock of the resolved environment (Python 3.11, Linux x86_64), generated $$(date -u +%F) by:"; \
	  echo "#   make lock   (pip freeze of a fresh venv built from requirements.txt)"; \
	  echo "# Use: pip install -r requirements.txt -c constraints.txt"; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf data .airflow mlruns mlartifacts bench/out
