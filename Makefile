# Two commands for people: `make run` (the whole pipeline, embedded broker) and
# `make test`. Each makes its own virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run broker test lint bench clean native

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# The native parser (native/login_columns.c), built next to the modules that import it.
# Without a C compiler the pipeline still runs, in pure Python (slower): warn, go on.
# (The test suite checks that it is built.)
NATIVE := .native-built
$(NATIVE): native/login_columns.c setup.py $(BIN)/.installed
	@if $(BIN)/python setup.py --quiet build_ext --inplace; then touch $@; \
	else echo "warning: native parser not built (needs a C compiler and Python headers): pure Python" >&2; fi

native: $(NATIVE)  ## build the native parser (needs a C compiler and the Python headers)

run: $(BIN)/.installed $(NATIVE)  ## broker + generator + processor + monitor; Ctrl-C stops all
	$(BIN)/python local_stack.py

broker: $(BIN)/.installed $(NATIVE)  ## broker + generator only (two-terminal flow)
	$(BIN)/python local_stack.py --broker-only

test: $(BIN)/.installed $(NATIVE)  ## lint, then every test (unit and real-broker integration)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(BIN)/.installed $(NATIVE)  ## throughput and memory figures (see README, Performance)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .local-stack .pytest_cache .ruff_cache build $(NATIVE) _login_columns*.so
