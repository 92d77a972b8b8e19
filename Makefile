# `make train` and `make test` each create .venv with python3 when it is missing, install what they need,
# then run. torch is pinned to 2.13.0: its CPU build lies on this project's machines for Python 3.11.
PYTHON ?= python3
VENV := .venv
ARGS ?=

.PHONY: train test test-fast clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.installed-base: $(VENV)/bin/python pyproject.toml
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(VENV)/bin/pip install --quiet "torch==2.13.0"
	$(VENV)/bin/pip install --quiet -e ".[test,hf,wandb,mlflow,gcs]"
	$(VENV)/bin/pip install --quiet "jax[tpu]==$$($(VENV)/bin/python -c 'import jax; print(jax.__version__)')"
	touch $@

train: $(VENV)/.installed-base
	$(VENV)/bin/sft-sharded train $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check sft_sharded tests benchmarks
	$(VENV)/bin/python -m pytest -q -n 2 --dist worksteal --durations=25 tests

test-fast: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
