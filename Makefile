# attrdist: `make demo` (set up + train the coconut recipe on the built-in demo data),
# `make test` (set up + run the test suite; this is what CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attrdist-installed
DS_STAMP := $(VENV)/.attrdist-deepspeed
TEST_STAMP := $(VENV)/.attrdist-test
export TORCH_EXTENSIONS_DIR ?= $(or $(ATTRDIST_CACHE),$(HOME)/.cache/attrdist)/torch_extensions

.PHONY: setup setup-deepspeed setup-test demo test test-slow bench gpu-check gpu-wheels clean-runs

# `make setup`: the runtime (requirements/base.txt), all `make demo` needs. DeepSpeed and the test tools
# are extras on top of it: `make setup-deepspeed` (run.deepspeed, CPU DDP's shm all-reduce) and
# `make setup-test` (both extras plus requirements/test.txt: what `make test` and `make bench` use).
setup: $(STAMP)
setup-deepspeed: $(DS_STAMP)
setup-test: $(TEST_STAMP)

# Pinned stack (requirements/lock.txt); torch 2.14.1 + torchvision 0.29.1 are the pair that works
# from this machine's local wheel mirror.
$(STAMP): requirements/base.txt requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/base.txt -c requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# DeepSpeed needs torch present at build time (--no-build-isolation); its CPU shm kernel is JIT-built
# once here (~25 s); CPU DDP falls back to gloo, with the reason logged, where it cannot be.
$(DS_STAMP): $(STAMP) requirements/deepspeed.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -r requirements/deepspeed.txt -c requirements/lock.txt
	$(PY) -m pip check
	$(PY) -m attrdist.train.shm_allreduce
	touch $(DS_STAMP)

$(TEST_STAMP): $(DS_STAMP) requirements/test.txt
	$(PY) -m pip install -q -r requirements/test.txt -c requirements/lock.txt
	$(PY) -m pip check
	touch $(TEST_STAMP)

demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no recipes/coconut.py

test: setup-test
	$(VENV)/bin/pytest -q -m "not slow"
	@if [ -d ../shared ]; then bash tests/without_shared.sh; else echo "no ../shared: the run above was the fresh-clone case"; fi

test-slow: setup-test
	$(VENV)/bin/pytest -q -m slow

# every benchmark in bench/, one after the other (~30 min here); results in bench/results/, see BENCHMARKS.md
bench: setup-test
	$(PY) -m bench

# issue 21's one device script: the cuda tests, trainer vs bare loop, host sync, input feed, inference and
# torch.compile on one GPU (< 8 min on an H100); without CUDA the CPU-side parts at small sizes. bench/gpu.py.
gpu-check: setup-test
	$(PY) -m bench.gpu

# .whl/: the wheels a lent GPU machine without network lacks (bench/gpu_wheels.sh says how to install them there)
gpu-wheels:
	bash bench/gpu_wheels.sh

clean-runs:
	rm -rf runs
