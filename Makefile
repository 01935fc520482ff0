# bloomq: `make run` starts the stack, `make test` runs the tests. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TINY_DIR ?= .models/tiny-bloom

.PHONY: install run test tiny bench redis-server clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,test]'
	touch $(STAMP)

install: $(STAMP)

# Install redis-server from the distribution when it is missing (needs root or sudo).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

run: install redis-server
	$(PY) scripts/stack.py

test: install redis-server
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# A tiny random BLOOM checkpoint to try the stack without downloading weights.
tiny: install
	$(PY) -m worker.tiny $(TINY_DIR)

# Benchmarks print tables and append them to bench/RESULTS.md; they never run in CI.
bench: install redis-server
	$(PY) bench/throughput.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
