# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first, so that the project's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build onto a CPU-only machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint schema bench clean

# setup.py and the C source too: the editable install builds the native kernel in place.
$(BIN)/.installed: pyproject.toml setup.py mergekitlite/_native.c
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
	MERGEKITLITE_REQUIRE_NATIVE=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

schema: setup
	$(BIN)/mergekitlite schema

clean:
	rm -rf $(VENV) .cache merged .pytest_cache build mergekitlite/*.so
