# `make train` and `make test` each create .venv with python3 when it is missing, install what they need,
# then run. torch is pinned to 2.13.0: its CPU build lies on this project's machines for Python 3.11.
PYTHON ?= python3
VENV := .venv
ARGS ?=

.PHONY: train test test-fast clean system-test-deps

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

# tests/test_slurm.py starts a one-node SLURM (Debian's slurm-wlm and munge); installed where this runs as
# root with apt (CI, the development VMs), else that test skips.
system-test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; fi

train: $(VENV)/.installed-base
	$(VENV)/bin/sft-sharded train $(ARGS)

test: $(VENV)/.installed-test system-test-deps
	$(VENV)/bin/ruff check sft_sharded tests benchmarks
	$(VENV)/bin/python -m pytest -q -n 2 --dist worksteal --durations=25 tests

test-fast: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
