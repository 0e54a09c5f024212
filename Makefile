# The two Quickstart commands (README): `make demo` and `make test` (everything CI runs but
# `slow`); `make test-fast` while editing, `make test-slow` for the long tests.
PY ?= python
# Run serially, the suite keeps about one core busy (imports, process start-up, servers): two
# pytest workers keep both busy. A module stays on one worker, so its shared fixtures start once.
TEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-fast test-slow lint format mlproject

install:
	$(PY) -m pip install -q -e '.[dev,spark,pretrained]'

demo: install
	mlflow run . --env-manager local

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_PARALLEL)

# tests/code and tests/data: pure logic, project files, layout, data; no servers, a few minutes.
test-fast: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_PARALLEL) tests/code tests/data

test-slow: install
	$(PY) -m pytest -m slow

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# MLproject is rendered from the config dataclasses; a test fails when it is out of date.
mlproject:
	$(PY) entrypoints/_common.py
