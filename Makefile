# `make train` and `make test` each create .venv with python3 when it is missing, install, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test test-fast clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/sft-sharded train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
