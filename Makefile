# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench bench-peers system-deps venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'torch==2.13.0'  # the CPU build; a bare 'torch' would pull a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[dev,triton,torch,transformers]'
	@touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/install-system-deps.sh

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP) system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP) system-deps
	@set -e; for f in bench/*.py; do echo "== $$f"; $(PY) $$f; done

# LMCache 0.5.6 in a venv of its own (its pinned CUDA stack stays out of ours): --no-deps plus the
# pure-Python packages its token database and disk backend import, then the same data through both.
PEERS ?= .venv-peers
LMCACHE_NEEDS := cachetools msgspec aiofile aiohttp pyzmq psutil py-cpuinfo cryptography numba sortedcontainers transformers
bench-peers: $(STAMP) system-deps
	@test -x $(PEERS)/bin/python || python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q 'torch==2.13.0'
	$(PEERS)/bin/python -m pip install -q -e . $(LMCACHE_NEEDS)
	$(PEERS)/bin/python -m pip install -q --no-deps 'lmcache==0.5.6'
	$(PY) bench/kv_engine.py --lmcache-python $(PEERS)/bin/python

clean:
	rm -rf $(VENV) $(PEERS) .pytest_cache
