# `make train` and `make test` do all set-up on a fresh machine (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that install together here (CUDA build, runs on CPU too); override for
# another machine, e.g. `make TORCH="torch torchvision" test`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,slurm
export OMP_NUM_THREADS ?= 2

.PHONY: help install train test test-fast lint format bench clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project

train: install  ## train the embedded default (MDEQ on the digits)
	$(PY) train.py $(ARGS)

test: install  ## the full test suite, slow tests included (what CI runs)
	$(PY) -m pytest $(ARGS)

test-fast: install  ## skip the slow end-to-end tests
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: install  ## ruff lint + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: install  ## solver benchmark (add torchdeq for side-by-side ratios: pip install -e '.[bench]')
	$(PY) bench/solvers.py $(ARGS)

clean:
	rm -rf $(VENV) outputs logs .pytest_cache .ruff_cache
