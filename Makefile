# Two commands do everything on a fresh machine:
#   make run   create .venv, install, fetch assets, run the pipeline on the default
#   make test  create .venv if needed, run the tests
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
# CI runs the slow tests (real SmolLM2-135M downloads) too; locally `make test-all`
PYTEST_MARKERS ?= $(if $(CI),,not slow)

.PHONY: install lock llamacpp postgres setup run compare test test-all lint clean

# pip's own find-links and index (where this machine's pip.conf or PIP_* set
# them: e.g. the folder holding the CPU build of torch) passed on to uv
PIP_SETTING = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p" | head -1)
UV_SOURCES = $(foreach f,$(call PIP_SETTING,find-links),--find-links $(f)) \
	$(foreach u,$(call PIP_SETTING,index-url),--index-url $(u))

$(STAMP): pyproject.toml requirements.lock infra/bootstrap.txt
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the installer (uv), then every distribution pinned with the sha256 of its
	# file (torch: the CPU build), each download checked before any code from it
	# runs; then the project itself
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r infra/bootstrap.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --require-hashes --no-deps \
		--compile-bytecode $(UV_SOURCES) -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# re-resolve pyproject.toml's dependencies in a throwaway venv and write
# requirements.lock (versions and sha256) from it; after a dependency change
lock:
	$(PYTHON) infra/lock.py --resolve

# llama.cpp's tools, built once per machine from the pinned source (cached under
# ~/.cache/saap/llama.cpp; 170 s alone with Ninja on 2 cores here). The
# module needs only the standard library, so it runs before .venv exists and
# `run`/`test` overlap it with the install (mostly downloads). Not with the
# stages: a build beside a PyTorch stage slows the stage about 4x, even niced
# or at SCHED_IDLE, and does half its own work (docs/bench_build_contention.md).
llamacpp:
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (Python 3.11)"; exit 1; }
	PYTHONPATH=$(CURDIR) $(PYTHON) -m saap.runtime.llamacpp

setup:
	$(MAKE) -j2 $(STAMP) llamacpp

run: setup
	$(BIN)/saap run

# the side-by-side comparison (docs/results.md); about 100 min on 2 cores (6 seeds)
compare: $(STAMP)
	$(BIN)/saap compare

# PostgreSQL's server binaries for the services tests (tests/services), from
# Debian's packages when absent and this is root; otherwise those tests say
# what to install
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q --no-install-recommends postgresql-15 || \
	    { apt-get update -q && apt-get install -y -q --no-install-recommends postgresql-15; }; \
	  else echo "tests/services need PostgreSQL's server: apt-get install postgresql-15"; fi; }

test: setup postgres
	$(BIN)/python -m pytest $(if $(PYTEST_MARKERS),-m "$(PYTEST_MARKERS)") tests

test-all: setup postgres
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
