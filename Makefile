# The two commands a new user needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PACKAGES := contract training parallel export serving launch
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
SHELL := /bin/bash

.PHONY: venv demo test test-fast lint clean

venv:
	@bash scripts/setup_venv.sh

demo: venv
	$(VENV)/bin/adsfm-pipeline

# ruff; mypy over the packages as adsfm.* (through a tree of links, since mypy cannot follow the editable
# install's import hook); the import contracts of .importlinter (the layers of ../shared/DESIGN.md).
lint: venv
	$(PY) -m ruff check $(PACKAGES) tests bench scripts
	@mkdir -p $(VENV)/typecheck/adsfm && for p in $(PACKAGES); do ln -sfn $(CURDIR)/$$p $(VENV)/typecheck/adsfm/$$p; done
	set -o pipefail; MYPYPATH=$(VENV)/typecheck $(PY) -m mypy --explicit-package-bases $(addprefix -p adsfm.,$(PACKAGES)) \
		| sed 's#^$(VENV)/typecheck/adsfm/##'
	$(VENV)/bin/lint-imports

test: venv lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
