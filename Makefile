# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; the engine needs no GPU. Override for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000
MODEL ?= .tiny/qwen3_moe

.PHONY: setup run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/eaas run-default --model $(MODEL) --port $(PORT)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_actors.py

clean:
	rm -rf $(VENV) .tiny .pytest_cache
