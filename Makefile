# fiddler-batch: `make run` sets up .venv and runs the embedded job; `make test` sets up .venv and runs the tests.

PYTHON ?= python3
VENV ?= .venv
# Installed first and on its own, so that pip never picks a torch build for us.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test schemas clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

run: install
	$(BIN)/fiddler-batch run jobs/eval.yaml

test: install
	$(BIN)/python -m pytest

schemas: install
	$(BIN)/fiddler-batch schema

clean:
	rm -rf out
