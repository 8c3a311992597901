# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; the engine needs no GPU. Override for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
ARCH ?= qwen3_moe
MODEL ?= .tiny/$(ARCH)
# Tiny models run best single-threaded per process (no intra-op thread oversubscription).
export OMP_NUM_THREADS ?= 1

.PHONY: setup run test bench browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# `make run` installs only what serving needs (the `serve` extra), not the test extra
$(VENV)/.installed-serve: $(BIN)/python pyproject.toml setup.py
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[serve]"
	touch $@

# Debian's Chromium for the dashboard's browser test (Playwright drives it; no browser download).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will say it is skipped"; }

$(MODEL)/config.json: | $(VENV)/.installed-serve
	$(BIN)/eaas make-tiny $(MODEL) --arch $(ARCH)

# The main job: a tiny checkpoint served with its expert servers in separate processes.
run: $(VENV)/.installed-serve $(MODEL)/config.json
	$(BIN)/eaas serve $(MODEL) --host $(HOST) --port $(PORT)

test: setup browser
	$(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_actors.py
	$(BIN)/python benchmarks/bench_transport.py
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .tiny .pytest_cache test-artifacts
