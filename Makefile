# The two Quickstart commands (README): `make demo` and `make test`.
PY ?= python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-slow lint format

install:
	$(PY) -m pip install -q -e '.[dev]'

demo: install
	mlflow run . --env-manager local

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
