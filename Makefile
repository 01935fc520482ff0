# bloomq: `make run` starts the stack, `make test` runs the tests. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TINY_DIR ?= .models/tiny-bloom

.PHONY: install run test test-fast docs docs-serve tiny bench bench-engine bench-peers bench-watchers bench-burst bench-priorities bench-gpu bench-parallel chaos bench-failover redis-server chromium wrk test-system clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,test,docs]'
	touch $(STAMP)

install: $(STAMP)

APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

# System packages the tests need, installed from the distribution when missing (needs root or sudo):
# redis-server for every end-to-end test, chromium for the browser tests (Playwright drives it; it cannot
# download its own browsers here), wrk for the intake benchmark.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server"; $(APT_INSTALL) redis-server >/dev/null; }

chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium"; $(APT_INSTALL) chromium >/dev/null; }

wrk:
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk"; $(APT_INSTALL) wrk >/dev/null; }

# Both system packages of the tests in one apt-get run (make test runs it beside the Python install).
test-system:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -z "$$missing" ] || { echo "installing$$missing"; $(APT_INSTALL) $$missing >/dev/null; }

run: install redis-server
	$(PY) scripts/stack.py

# Tests run in parallel, one process per core, in the units and order of tests/scheduling.py (each file
# whole in one process, the tests sharing a stack together, the fault tests one by one, costliest first).
# More processes than cores load the timing-sensitive fault tests (a Sentinel failover under load) past
# their deadlines, so TEST_PROCESSES=3 is a choice, not the default. PYTEST_ARGS='-n 0' runs them one by one.
TEST_PROCESSES ?= auto
test:
	@$(MAKE) --no-print-directory -j2 install test-system
	@$(MAKE) --no-print-directory docs
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

# The edit-test loop: unit tests only (no end-to-end stacks, none of the tests marked slow), under a minute.
test-fast: install redis-server
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n auto -m "not slow" --ignore=tests/e2e $(PYTEST_ARGS)

# The documentation site (docs/, mkdocs.yml) into site/, warnings as errors: every link and anchor is checked,
# and the API reference is rendered from the OpenAPI document a freshly built app serves.
DOCS_ENV = NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1
docs: install
	$(DOCS_ENV) $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: install
	$(DOCS_ENV) $(VENV)/bin/mkdocs serve --strict

# A tiny random BLOOM checkpoint to try the stack without downloading weights.
tiny: install
	$(PY) -m worker.model.tiny $(TINY_DIR)

# Benchmarks print tables and append them to bench/RESULTS.md; they never run in CI.
bench: install redis-server wrk
	$(PY) bench/throughput.py $(BENCH_ARGS)

# 1000 event streams and 200 long polls on running jobs: gevent (as configured) against the old gthread pool.
bench-watchers: install redis-server
	$(PY) bench/watchers.py $(BENCH_ARGS)

# Bursts of 16 and 64 simultaneous submissions: how they start (spread, prefills, time to first token).
bench-burst: install redis-server
	$(PY) bench/burst.py $(BENCH_ARGS)

# A batch filling the worker while interactive jobs arrive; two keys' batches side by side.
bench-priorities: install redis-server
	$(PY) bench/priorities.py $(BENCH_ARGS)

# The stack on the real GPU, the engine's decode step against the memory-bandwidth floor, HF generate, prefill.
bench-gpu: install redis-server
	$(PY) bench/gpu.py $(BENCH_ARGS)

# Tensor-parallel groups (CPU ranks here) and int8/int4 weights: the decode pass at batch 1, 8, 32 against the floor.
bench-parallel: install
	$(PY) bench/parallel.py $(BENCH_ARGS)

# The paged engine alone: token gaps while a long prompt joins, shared prefixes, KV use, host time per token.
bench-engine: install
	$(PY) bench/engine.py $(BENCH_ARGS)

# bloomq (engine in fp32 and bf16, the whole stack) against transformers, CTranslate2 and vLLM's CPU build on
# one checkpoint and workload; the peers install into venvs of their own under .models/peers.
bench-peers: install redis-server
	$(PY) bench/peers.py $(BENCH_ARGS)

# N = 1000 jobs while the worker is killed several times and Redis restarts once.
chaos: install redis-server
	$(PY) bench/chaos.py $(CHAOS_ARGS)

# N = 1000 jobs while the Sentinel-managed Redis master is killed twice; submit latency with WAIT on and off.
bench-failover: install redis-server
	$(PY) bench/failover.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts site docs/api/openapi.json
