# Every target a person, a hook or CI runs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help  ## list the targets
help:
	@grep -E '^\.PHONY: [a-z-]+ +## ' $(MAKEFILE_LIST) | sed -E 's/^\.PHONY: ([a-z-]+) +## (.*)/  \1\t\2/' | expand -t 18

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

.PHONY: install  ## create .venv, build the Rust core (release) and install the package with dev tools
install: $(PY)
	$(PY) -m pip install -q -e '.[dev]'

.PHONY: build-dev  ## rebuild the Rust core into .venv after a Rust change (maturin develop --release)
build-dev: $(PY)
	$(VENV)/bin/maturin develop --release --quiet

.PHONY: format  ## format Rust and Python sources
format:
	cargo fmt
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

.PHONY: lint  ## ruff, mypy --strict, stubtest, cargo fmt --check, clippy -D warnings
lint:
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest llm_queue_dispatcher._core --allowlist stubtest-allowlist.txt
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

.PHONY: test-rust  ## Rust unit and property tests
test-rust:
	cargo test --quiet

.PHONY: test-python  ## the pytest suite (benches run as smoke tests, timing off)
test-python:
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: test  ## Rust tests, then the pytest suite
test: test-rust test-python

.PHONY: bench  ## pytest-benchmark with timing on
bench:
	$(PY) -m pytest benches --benchmark-enable --benchmark-only -q

.PHONY: docs  ## build the documentation site into site/ (mkdocs --strict, as the tests do)
docs:
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

.PHONY: docs-serve  ## serve the documentation site on 127.0.0.1:8000, rebuilt on every change
docs-serve:
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

COMPARE_ARGS ?=

.PHONY: bench-compare  ## side by side with heapq, a brute force and the TS library (COMPARE_ARGS=--quick ...)
bench-compare:
	$(PY) benches/compare.py $(COMPARE_ARGS)

REDIS_COMPARE_ARGS ?=

.PHONY: bench-redis  ## RedisStorage, the dispatcher and the shared limiter beside BullMQ 5 on one redis-server (REDIS_COMPARE_ARGS=--quick ...)
bench-redis:
	$(PY) benches/redis_compare.py $(REDIS_COMPARE_ARGS)

.PHONY: all  ## install, lint and test
all: install lint test
