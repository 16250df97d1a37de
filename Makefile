# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RETOUCH := $(VENV)/bin/retouch

# Real components, quiet and offline: no telemetry, project-local Prefect home.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_HOME ?= $(CURDIR)/.prefect
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(RETOUCH) demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check core flows monitoring tests bench
	$(VENV)/bin/ruff format --check core flows monitoring tests bench

clean:
	rm -rf artifacts mlruns/mlflow.db mlruns/artifacts monitoring/out .prefect
