# fedbiomq: `make demo` and `make test` are the only set-up a fresh Debian machine needs.
# Each does its own idempotent set-up first (apt packages, .venv, torch 2.13.0 CPU, the project).

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.fedbiomq-installed
# gcc + headers build the broker plugin (broker/plugin/fbm_auth.c) into each federation workspace
APT_PKGS := mosquitto mosquitto-clients dataset-fashion-mnist gcc libc6-dev mosquitto-dev libmosquitto-dev libssl-dev chromium fonts-dejavu-core systemd
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup apt test test-slow test-all test-unit test-integration demo bench lint clean

setup: apt $(STAMP)

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# `make test`: everything but the tests marked slow (long chaos runs, the paper's studies, the
# container entry points), under 12 minutes on 2 cores; `make test-slow` runs those; CI runs both.
test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

test-unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m scripts.demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python benchmarks/codec.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
