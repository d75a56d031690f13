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
	@# as an operator does, without reaching the network during the tests; with the Dask extra's, and
	@# setuptools, with which pip builds it from the source folder, as the steps of docs/operations.md and
	@# docs/scale-out.md do (tests/test_docs_commands.py).
	$(BIN)/pip wheel --quiet --wheel-dir $(VENV)/wheelhouse '.[dask]' 'setuptools>=68'
	touch $@

# The API and the daemon as two processes on the local spool and the bundled sample store master, both
# named in $(CONFIG), written here at each start (an installed service reads
# /etc/retail-pulse/retail-pulse.ini instead); and the sample images on 127.0.0.1:$(IMAGES_PORT), served by
# threads with a listen backlog of 1,024 (http.server's 5 dropped the SYNs of a job's parallel downloads, which
# then waited for retransmits). Ctrl-C stops all three, within seconds at any moment (tests/test_stopping.py):
# all three run in the background, where a shell starts them ignoring Ctrl-C, so that one still importing
# cannot die of it with a KeyboardInterrupt traceback; each takes Ctrl-C once it has its own handlers, and the
# trap stops them with SIGTERM whatever they had, then waits for all three. Exit status: the API's.
# Local development: downloads may reach local image servers (never set that in production).
run: $(BIN)/.installed
	@umask 077 && mkdir -p $(SPOOL_DIR) && chmod 700 $(SPOOL_DIR)
	@umask 077 && printf '%s\n' "# Written by 'make run' at each start; 'make ctl ARGS=list' reads it too." \
	  "[common]" "spool_dir = $(abspath $(SPOOL_DIR))" "[daemon]" "store_master = $(abspath $(STORE_MASTER))" \
	  "[download]" "allow_private_addresses = true" "[api]" "port = $(PORT)" > $(CONFIG)
	@echo "make run: settings in $(CONFIG) (spool $(SPOOL_DIR)); sample images on http://127.0.0.1:$(IMAGES_PORT)/;" \
	  "look at the spool with: make ctl ARGS=list"
	@trap 'kill $$api $$daemon $$images 2>/dev/null; wait; exit 130' INT TERM; \
	$(BIN)/python -c "$$SAMPLE_IMAGES_SERVER" $(IMAGES_PORT) data/images >/dev/null 2>&1 & images=$$!; \
	$(BIN)/python -m daemon --config $(CONFIG) & daemon=$$!; \
	$(BIN)/python -m webapi --config $(CONFIG) & api=$$!; \
	wait $$api; status=$$?; kill $$daemon $$images 2>/dev/null; wait; exit $$status

# http.server's own server, with room for a job's connections in its listen backlog.
define SAMPLE_IMAGES_SERVER
import functools, http.server, sys
http.server.ThreadingHTTPServer.request_queue_size = 1024
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
endef
export SAMPLE_IMAGES_SERVER

# retailpulse-ctl on make run's spool: make ctl ARGS=list, make ctl ARGS='show 1', make ctl ARGS='cancel 2'.
# For people: make cannot pass an exit status through (any failure is make's 2, after its own "Error" line),
# so scripts run .venv/bin/retailpulse-ctl --config var/retail-pulse.ini (0, 1: failed, 2: usage), as the README says.
ctl: $(BIN)/.installed
	@$(BIN)/retailpulse-ctl --config $(CONFIG) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The inner loop: everything but the browser, Dask, nginx, install, power-loss and slow tests (what takes
# seconds on purpose).
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
