# The commands a newcomer needs: `make run`, `make ctl ARGS=list` and `make test`. They set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# make run's own folder: its spool, and the INI file naming it, which `make ctl` (retailpulse-ctl) reads too.
VAR ?= var
SPOOL_DIR ?= $(VAR)/spool
CONFIG ?= $(VAR)/retail-pulse.ini
STORE_MASTER ?= data/stores.csv
PORT ?= 8080
# The sample images in data/images/, served so that the README's first job has something to measure.
IMAGES_PORT ?= 8081

.PHONY: run ctl test test-fast test-powerloss clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' 'setuptools>=68' wheel
	@# Wheels of every dependency, so that tests/test_install.py can install the package into a fresh venv
	@# as an operator does, without reaching the network during the tests.
	$(BIN)/pip wheel --quiet --wheel-dir $(VENV)/wheelhouse .
	touch $@

# The API and the daemon as two processes on the local spool and the bundled sample store master, both
# named in $(CONFIG), written here at each start (an installed service reads
# /etc/retail-pulse/retail-pulse.ini instead); and the sample images on 127.0.0.1:$(IMAGES_PORT). Ctrl-C
# stops all three. Local development: downloads may reach local image servers (never set that in production).
run: $(BIN)/.installed
	@umask 077 && mkdir -p $(SPOOL_DIR) && chmod 700 $(SPOOL_DIR)
	@umask 077 && printf '%s\n' "# Written by 'make run' at each start; 'make ctl ARGS=list' reads it too." \
	  "[common]" "spool_dir = $(abspath $(SPOOL_DIR))" "[daemon]" "store_master = $(abspath $(STORE_MASTER))" \
	  "[download]" "allow_private_addresses = true" "[api]" "port = $(PORT)" > $(CONFIG)
	@echo "make run: settings in $(CONFIG) (spool $(SPOOL_DIR)); sample images on http://127.0.0.1:$(IMAGES_PORT)/;" \
	  "look at the spool with: make ctl ARGS=list"
	@trap 'kill $$daemon $$images 2>/dev/null; wait' EXIT INT TERM; \
	$(BIN)/python -m http.server --bind 127.0.0.1 --directory data/images $(IMAGES_PORT) >/dev/null 2>&1 & images=$$!; \
	$(BIN)/python -m daemon --config $(CONFIG) & daemon=$$!; \
	$(BIN)/python -m webapi --config $(CONFIG)

# retailpulse-ctl on make run's spool: make ctl ARGS=list, make ctl ARGS='show 1', make ctl ARGS='cancel 2'
ctl: $(BIN)/.installed
	@$(BIN)/retailpulse-ctl --config $(CONFIG) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The inner loop: everything but the browser, Dask, nginx, install, power-loss and slow tests (about a minute
# on 2 cores).
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m 'not (browser or dask or nginx or install or slow or powerloss)'

# Power cuts on lazyfs, a FUSE filesystem that keeps only what was fsynced (tests/test_power_loss.py): the
# sweep over a job's whole life, live cuts and fsync failures, against whatever this checkout holds. Another
# run: make test-powerloss POWERLOSS_SEED=7. A failing sweep saves its run; one cut of it again:
# make test-powerloss POWERLOSS_RUN=tests/artifacts/powerloss/seed-7 POWERLOSS_CUT=123
export POWERLOSS_SEED POWERLOSS_RUN POWERLOSS_CUT POWERLOSS_RESTARTS
test-powerloss: $(BIN)/.installed
	$(BIN)/python -m pytest -m powerloss tests/test_power_loss.py

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info
