# sagaline developer / CI entry points.  `make test` is what CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTHON  ?= python3
PYTEST_ARGS ?=

.PHONY: venv services promtool deploy-check test unit integration lint typecheck format demo bench bench-web clean distclean

venv: $(STAMP)

# Create the virtualenv with a Python >= 3.10 (PYTHON, then python3.1x candidates).
$(BIN)/python:
	@py=""; \
	for c in $(PYTHON) python3.13 python3.12 python3.11 python3.10 python3; do \
	  if command -v $$c >/dev/null 2>&1 && \
	     $$c -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
	    py=$$c; break; \
	  fi; \
	done; \
	if [ -z "$$py" ]; then echo "error: need python >= 3.10 (set PYTHON=...)" >&2; exit 1; fi; \
	echo "creating $(VENV) with $$(command -v $$py) ($$($$py -V 2>&1))"; \
	if ! $$py -m venv $(VENV); then \
	  rm -rf $(VENV); \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "python venv module unavailable; installing python3-venv" >&2; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  fi; \
	  $$py -m venv $(VENV); \
	fi

# (Re)install only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[all,test,bench-peers]'
	@touch $@

services:
	@bash scripts/ensure-services.sh
	@bash scripts/ensure-chromium.sh

promtool:
	@bash scripts/ensure-promtool.sh

# deploy/: alert rules through promtool (checked and unit-tested), Kubernetes manifests
# against the Kubernetes schemas, offline (tests/unit/test_deploy.py).
deploy-check: venv promtool
	SAGALINE_REQUIRE_PROMTOOL=1 $(BIN)/pytest tests/unit/test_deploy.py $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check sagaline tests examples bench
	$(BIN)/ruff format --check sagaline tests examples bench

typecheck: venv
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix sagaline tests examples bench
	$(BIN)/ruff format sagaline tests examples bench

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv services
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# Each step runs only if the previous one succeeded; any failure fails the target.
# One pytest run: unit and plugin tests are collected (and run) before integration tests.
test: venv services promtool
	$(BIN)/ruff check sagaline tests examples bench
	$(BIN)/ruff format --check sagaline tests examples bench
	$(BIN)/mypy
	SAGALINE_REQUIRE_PROMTOOL=1 $(BIN)/pytest tests/unit tests/plugin tests/integration --durations=30 $(PYTEST_ARGS)

demo: venv
	$(BIN)/sagaline demo

# The figures against plain Celery, then the dashboard's and the API's server time.
bench: venv services
	$(BIN)/python -m bench
	$(BIN)/python -m bench.web

# The dashboard's and the API's server time on a million sagas (PostgreSQL).
bench-web: venv services
	$(BIN)/python -m bench.web

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info .sagaline
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
