# efficient-attn: the two commands. Each makes its own .venv and installs itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= quick
STAMP  := $(VENV)/.installed
# glibc malloc tuned so that XLA's large buffers are reused, not page-faulted anew on every call
# (efficient_attn/allocator.py says why and what it measured); the experiments re-exec with it anyway.
export GLIBC_TUNABLES := glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1

.PHONY: test test-slow test-all reproduce bench-peers install clean list

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## make test: the test suite (the CI command), on two worker processes. Tests marked slow (the
## 64K tier of the scale test, the further shapes of parametrized engine tests: conftest.tiered)
## are left to `make test-slow`; `make test-all` runs both.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow" tests

## make test-slow: only the slow tests, in one process (the 64K compiles need the memory).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

## make test-all: every test, slow ones included.
test-all: test test-slow

## make reproduce: every experiment of the preset (PRESET=quick|cpu|lra), then results/README.md.
reproduce: $(STAMP)
	$(PY) experiments/reproduce.py --preset $(PRESET)

## make bench-peers: the exact benchmark against the JAX peers (tokamax, memory-efficient-attention,
## ringattention): installs the optional extra `peers` into its own venv (.venv-peers: the peers pull
## in packages the test environment does not have), runs the peers preset into results/exact/peers/
## (about 10 minutes on 2 cores; run it alone, it times kernels).
PEERS_VENV ?= .venv-peers
bench-peers:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet -e ".[peers]"
	$(PEERS_VENV)/bin/python experiments/bench_exact.py --preset peers

list: $(STAMP)
	$(VENV)/bin/efficient-attn list

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache build *.egg-info
