# tally — two commands: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench screenshot stop clean

install: $(BIN)/tally

# The lock file pins every transitive package so a fresh install resolves the same set.
$(BIN)/tally: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $@

demo: install
	$(BIN)/tally demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Three workers on two cores: most of a test's time is waiting on PostgreSQL, the
# sandbox and the processes it starts (two workers kept one core busy).
test: install lint
	$(BIN)/pytest -n 3 --dist loadgroup -q

bench: install
	$(BIN)/python benchmarks/metering.py
	$(BIN)/python benchmarks/push.py
	$(BIN)/python benchmarks/reconcile.py

# PNGs of the demo's finance review and reconciliation pages in docs/img, taken with
# Debian's chromium (apt-get install chromium); not part of `make test`.
screenshot: install
	$(BIN)/tally demo
	$(BIN)/python scripts/screenshot.py

# The embedded PostgreSQL and the demo's sandbox outlive `make demo`; this stops them.
stop:
	@if [ -x $(BIN)/tally ]; then $(BIN)/tally stop; else echo "no $(BIN)/tally: nothing to stop"; fi

# Stop first: deleting .tally under a running PostgreSQL leaves it serving deleted files.
clean: stop
	rm -rf $(VENV) .tally *.egg-info
