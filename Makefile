# attrdist: `make demo` (set up + train the coconut recipe on the built-in demo data),
# `make test` (set up + run the test suite; this is what CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attrdist-installed
export TORCH_EXTENSIONS_DIR ?= $(or $(ATTRDIST_CACHE),$(HOME)/.cache/attrdist)/torch_extensions

.PHONY: setup demo test test-slow bench clean-runs

setup: $(STAMP)

# Pinned stack (requirements/lock.txt); torch 2.14.1 + torchvision 0.29.1 are the pair that works
# from this machine's local wheel mirror. DeepSpeed needs torch present at build time.
$(STAMP): requirements/base.txt requirements/test.txt requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/base.txt -r requirements/test.txt -c requirements/lock.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -c requirements/lock.txt deepspeed==0.19.8
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	$(PY) -m attrdist.train.shm_allreduce  # JIT-builds DeepSpeed's shared-memory all-reduce once (~25 s); gloo if it cannot
	touch $(STAMP)

demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no recipes/coconut.py

test: setup
	$(VENV)/bin/pytest -q -m "not slow"
	@if [ -d ../shared ]; then bash tests/without_shared.sh; else echo "no ../shared: the run above was the fresh-clone case"; fi

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

# every benchmark in bench/, one after the other (~30 min here); results in bench/results/, see BENCHMARKS.md
bench: setup
	$(PY) -m bench

clean-runs:
	rm -rf runs
