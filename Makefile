# make run   - the service on its embedded default (SQLite, no Redis), with a demo key and curl
# make test  - the test suite (needs PostgreSQL and Redis; see README)
# make bench - the benchmark suite, one table (PostgreSQL, Redis, wrk; under 10 minutes)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo 'Installing; the first time this builds llama.cpp (about 10 minutes on 2 cores).'
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e '.[dev,local]' -e './clients/python[webhooks]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python manage.py serve

test: setup
	scripts/test

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/suite.py $(BENCH_ARGS)
