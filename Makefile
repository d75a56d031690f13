# The two commands a newcomer needs: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SPOOL_DIR ?= var/spool
STORE_MASTER ?= data/stores.csv

.PHONY: run test test-fast clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' 'setuptools>=68' wheel
	@# Wheels of every dependency, so that tests/test_install.py can install the package into a fresh venv
	@# as an operator does, without reaching the network during the tests.
	$(BIN)/pip wheel --quiet --wheel-dir $(VENV)/wheelhouse .
	touch $@

# The API and the daemon as two processes on the local spool and the bundled sample store master (an
# installed service takes both from /etc/retail-pulse/retail-pulse.ini instead); Ctrl-C stops both.
# Local development: downloads may reach local image servers (never set that in production).
run: $(BIN)/.installed
	@mkdir -p $(SPOOL_DIR)
	@trap 'kill $$daemon 2>/dev/null; wait' EXIT INT TERM; \
	$(BIN)/python -m daemon --spool-dir $(SPOOL_DIR) --store-master $(STORE_MASTER) --allow-private-addresses true & daemon=$$!; \
	$(BIN)/python -m webapi --spool-dir $(SPOOL_DIR)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The inner loop: everything but the browser, Dask, nginx and install tests (about a minute on 2 cores).
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m 'not (browser or dask or nginx or install)'

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info
