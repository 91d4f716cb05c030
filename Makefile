# The two commands a new user needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv demo test test-fast lint clean

venv:
	@bash scripts/setup_venv.sh

demo: venv
	$(VENV)/bin/adsfm-pipeline

lint: venv
	$(PY) -m ruff check training parallel export serving launch tests bench
	$(PY) -m mypy training parallel export serving launch

test: venv lint
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: venv
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
