# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first, so that the project's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build onto a CPU-only machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint schema bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m mergekitlite.demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/mergekitlite schema --check
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

schema: setup
	$(BIN)/mergekitlite schema

clean:
	rm -rf $(VENV) .cache merged .pytest_cache
