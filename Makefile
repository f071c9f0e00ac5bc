# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first, so that the project's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build onto a CPU-only machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo evolve-demo test lint schema bench clean

# setup.py and the C source too: the editable install builds the native kernel in place.
$(BIN)/.installed: pyproject.toml setup.py mergekitlite/_native.c $(wildcard mergekitlite/kernels/*.c mergekitlite/kernels/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m mergekitlite.demo
	@echo "Next: make evolve-demo  searches the weights of recipes/demo.yaml instead of guessing them (CMA-ES, ~2 min)"

# Search the demo recipe's weights (mergekitlite evolve) and compare with the hand recipe on held-out metrics.
evolve-demo: setup
	$(BIN)/python demo/evolve/run_demo.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/mergekitlite schema --check
	$(BIN)/mergekitlite evolve-schema --check
	MERGEKITLITE_REQUIRE_NATIVE=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

schema: setup
	$(BIN)/mergekitlite schema
	$(BIN)/mergekitlite evolve-schema

clean:
	rm -rf $(VENV) .cache merged evolve .pytest_cache build mergekitlite/*.so
