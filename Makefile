# Two commands for people: `make run` (the whole pipeline, embedded broker) and
# `make test`. Each makes its own virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run broker kafka kafka-if-possible test test-fast test-chaos test-schedules test-broker-failures lint bench clean

# requirements.txt names ./native, the native parser (native/login_columns.c) as a
# local package: pip compiles and installs it with the rest. pip rebuilds and
# reinstalls a local directory on every install, so the stamp depends on the native
# sources too: editing login_columns.c reinstalls it on the next make.
# Without a C compiler the install still succeeds and the pipeline runs in pure
# Python (slower): warn, go on. (The test suite checks that it is installed.)
$(BIN)/.installed: requirements.txt requirements-dev.txt native/pyproject.toml native/setup.py native/login_columns.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@$(BIN)/python -I -c "import _login_columns" 2>/dev/null || echo "warning: native parser not built" \
		"(needs a C compiler and the Python headers): pure Python" >&2
	touch $@

# PROCESSORS=3 make run: three processors in one consumer group (scale-out, failover:
# kill one, and the others carry on while the dashboard says so).
PROCESSORS ?= 1

run: $(BIN)/.installed  ## broker + generator + processor(s) + monitor; r restarts a dead part; Ctrl-C stops all
	$(BIN)/python local_stack.py --processors $(PROCESSORS)

broker: $(BIN)/.installed  ## broker + generator only (the three-terminal flow)
	$(BIN)/python local_stack.py --broker-only

lint: $(BIN)/.installed  ## ruff: lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers (pytest-xdist), each with its own embedded broker: most of a broker test
# is waiting (a group join, a window closing), so two share the 2 cores well (17 min -> 10).
# A file's tests stay together on one worker.
test: lint kafka-if-possible  ## lint, then every test (unit and real-broker integration)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=40

test-fast: $(BIN)/.installed  ## the edit loop: unit tests only, no broker, no long runs (under a minute)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not broker and not slow"

# Apache Kafka for the tests (and by hand: python -m broker.apache_kafka), from Maven
# Central: the jars kafka/pom.xml names and what they need at run time, copied once into
# .kafka/libs (git-ignored; about 45 jars, 43 MB). The stamp makes a second run free
# and a changed pom fetch again. Needs Maven and Java 17; without them `make test`
# skips the Kafka tests and says why (CI does not: .ci/run runs this first).
KAFKA_HOME := .kafka
kafka: $(KAFKA_HOME)/.assembled  ## assemble Apache Kafka for the Kafka tests (Maven, once)

$(KAFKA_HOME)/.assembled: kafka/pom.xml
	@command -v mvn >/dev/null || { echo "make kafka: mvn not found (apt-get install maven)" >&2; exit 2; }
	@command -v java >/dev/null || { echo "make kafka: java not found (apt-get install openjdk-17-jre-headless)" >&2; exit 2; }
	@echo "assembling Apache Kafka from Maven Central into $(KAFKA_HOME)/libs (once)"
	rm -rf $(KAFKA_HOME)/libs $@
	mvn -q -B -f kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(KAFKA_HOME)/libs
	touch $@

# make test assembles Kafka where Java and Maven are (once; later runs cost nothing)
# and goes on without it where they are not: the Kafka tests then skip, saying why.
kafka-if-possible:
	@if command -v mvn >/dev/null && command -v java >/dev/null; then $(MAKE) --no-print-directory -s kafka; \
	else echo "no Java 17 and Maven here: the Apache Kafka tests will skip" >&2; fi

bench: $(BIN)/.installed  ## throughput and memory figures (see docs/performance.md)
	$(BIN)/python benchmarks/throughput.py

# _login_columns*.so and .native-built in the root: left by the in-place build of
# older trees (before native/ was a package); such a .so would shadow the installed one.
clean:
	rm -rf $(VENV) $(KAFKA_HOME) .local-stack .pytest_cache .ruff_cache build native/build native/*.egg-info _login_columns*.so .native-built

# Long runs, behind a flag of their own (not in `make test`):
#   make test-chaos                 the real-broker chaos test, 90 s of stream (CHAOS_SEED=N to change the schedule;
#                                   on Kafka under KIP-848, CHAOS_GROUP_PROTOCOL=classic for the classic protocol)
#   make test-schedules             10,000 seeded fault schedules (about 1 h 50 in one process;
#                                   FAULT_SCHEDULE_FIRST=5000 FAULT_SCHEDULES=5000 runs a half: 55 min each)
#   make test-broker-failures       every broker-failure test on the 3-node Kafka cluster: the kills of each role's
#                                   node, a rolling restart, two nodes of three lost (about 6 minutes)
CHAOS_SECONDS ?= 90
CHAOS_GROUP_PROTOCOL ?= consumer
test-chaos: $(BIN)/.installed
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_GROUP_PROTOCOL=$(CHAOS_GROUP_PROTOCOL) $(BIN)/python -m pytest tests/test_chaos.py

test-broker-failures: $(BIN)/.installed kafka
	BROKER_FAILURES=all $(BIN)/python -m pytest tests/test_broker_failures.py -s

FAULT_SCHEDULES ?= 10000
test-schedules: $(BIN)/.installed
	FAULT_SCHEDULES=$(FAULT_SCHEDULES) $(BIN)/python -m pytest tests/test_fault_schedules.py
