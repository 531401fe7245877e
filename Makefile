# Two commands for people: `make run` (the whole pipeline, embedded broker) and
# `make test`. Each makes its own virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run broker test lint bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

run: $(BIN)/.installed  ## broker + generator + processor + monitor; Ctrl-C stops all
	$(BIN)/python local_stack.py

broker: $(BIN)/.installed  ## broker + generator only (two-terminal flow)
	$(BIN)/python local_stack.py --broker-only

test: $(BIN)/.installed  ## lint, then every test (unit and real-broker integration)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(BIN)/.installed  ## throughput and memory figures (see README, Performance)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .local-stack .pytest_cache .ruff_cache
