# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench system-deps venv clean

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

clean:
	rm -rf $(VENV) .pytest_cache
