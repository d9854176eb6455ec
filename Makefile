# vibe-serve: every target creates .venv and installs on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Local Ray: no token auth, no usage stats, quiet log dedup.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_DEDUP_LOGS ?= 0
export TOKENIZERS_PARALLELISM ?= false
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: install test test-unit test-gpu test-multinode lint run bench bench-placement bench-runtime \
        bench-serving bench-kv bench-prefix bench-structured bench-migration bench-quantized chaos model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on disk; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# pytest exit code 5 means "no tests collected": for a test command that is a failure, said plainly.
define run_pytest
	@$(PY) -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests for '$(1)'" >&2; exit 1; fi; exit $$rc
endef

# Test processes (pytest-xdist): each runs whole modules (--dist loadfile), so a module's Ray cluster is its own and
# at most PYTEST_WORKERS clusters run at once. The Ray tests wait on actors and HTTP about half the time: two
# processes on 2 cores take about 3/4 of one's time. PYTEST_WORKERS=0 runs them in this process, one at a time.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	$(call run_pytest,-q -m "not gpu" $(XDIST) tests)

test-unit: $(STAMP)
	$(call run_pytest,-q -m "not gpu and not ray" $(XDIST) tests)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

test-multinode: $(STAMP)
	bash scripts/test_multinode.sh

lint: $(STAMP)
	$(PY) -m ruff check placement service deploy load_tests tests scripts examples

# The app is built here first: `serve run` keeps waiting on an app whose build failed (the reason only in Ray's logs).
run: $(STAMP)
	$(PY) -m deploy.check deploy/config.yaml
	$(VENV)/bin/serve run deploy/config.yaml

bench: $(STAMP)
	$(PY) -m load_tests.compare --out bench --drift

bench-placement: $(STAMP)
	$(PY) -m placement.bench --out bench

bench-runtime: $(STAMP)
	$(PY) -m service.bench_runtime --out bench

bench-serving: $(STAMP)
	$(PY) -m load_tests.bench_serving --out bench

bench-kv: $(STAMP)
	$(PY) -m load_tests.kv_paging --out bench

bench-prefix: $(STAMP)
	$(PY) -m load_tests.prefix_cache --out bench

bench-structured: $(STAMP)
	$(PY) -m load_tests.structured_overhead --out bench

bench-migration: $(STAMP)
	$(PY) -m service.bench_migration --out bench

bench-quantized: $(STAMP)
	$(PY) -m service.bench_quantized --out bench

chaos: $(STAMP)
	$(PY) -m load_tests.chaos --out bench

model: $(STAMP)
	$(PY) -m deploy.build_default_model

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
