"""Fixtures that start real things: the brokers and the processor as a subprocess.

One embedded broker (Tansu) serves the whole session (it starts in well under a
second); every test gets its own topics and consumer group, so tests cannot see each
other. Apache Kafka (`broker/apache_kafka.py`, assembled by `make kafka`) the same
way: one node per session (per xdist worker), started by the first test that needs
it, and a 3-node cluster per module that asks for one (`kafka_cluster3`).

A test marked `both_brokers` that takes `topics` runs twice, as `[tansu]` and
`[kafka]` (the second also marked `kafka`): the same test body proves a guarantee on
both brokers. `topics.broker` says which one a run is on.

Without Java or the assembled Kafka the Kafka tests skip, saying why; under `CI` that
is a failure (.ci/run assembles Kafka), as a missing Debian tool is (`require_tool`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.apache_kafka import KafkaCluster, missing_reason
from broker.embedded_broker import EmbeddedBroker
from testkit.processes import ROOT, ProcessorProcess, Topics, new_topics, require_kafka


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that selected no test proves nothing: fail it (pytest's own status 5 is
    lost behind `make`, which reports every failure as 2)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if not hasattr(session.config, "workerinput"):  # once, from xdist's controller
            sys.stderr.write("pytest ran no tests: check the -k, -m or path given; this counts as a failure\n")


def pytest_report_header(config: pytest.Config) -> str:
    reason = missing_reason()
    return f"Apache Kafka tests: {'skipped: ' + reason if reason else 'on'}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`both_brokers` tests run once per broker, through the `broker_kind` fixture."""
    if not metafunc.definition.get_closest_marker("both_brokers"):
        return
    if "broker_kind" not in metafunc.fixturenames:  # it would run on Tansu alone, silently
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: both_brokers needs the topics fixture")
    kinds = ["tansu", pytest.param("kafka", marks=pytest.mark.kafka)]
    metafunc.parametrize("broker_kind", kinds, indirect=True)


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as running:  # a free port, never 29092
        yield running


@pytest.fixture(scope="session")
def kafka_node(tmp_path_factory) -> Iterator[KafkaCluster]:
    """One Apache Kafka node (KRaft, broker and controller) for the session."""
    require_kafka()
    with KafkaCluster(tmp_path_factory.mktemp("kafka-node"), nodes=1) as cluster:
        print(f"Apache Kafka node ready in {cluster.start_seconds:.1f}s")
        yield cluster


@pytest.fixture(scope="module")
def kafka_cluster3(tmp_path_factory) -> Iterator[KafkaCluster]:
    """Three Apache Kafka nodes (static quorum; RF 3, min.insync.replicas=2 by default)
    for one module: tests in it may kill and restart nodes, and must leave every node
    running with its replicas in sync (`wait_for_full_isr`) for the next test."""
    require_kafka()
    with KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"), nodes=3) as cluster:
        print(f"Apache Kafka 3-node cluster ready in {cluster.start_seconds:.1f}s")
        yield cluster


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest) -> str:
    """The broker a `both_brokers` test runs on, "tansu" or "kafka" (other tests: "tansu")."""
    return getattr(request, "param", "tansu")


@pytest.fixture
def running_broker(broker_kind: str, request: pytest.FixtureRequest) -> EmbeddedBroker | KafkaCluster:
    """The session's broker of `broker_kind`, started on first use."""
    return request.getfixturevalue("kafka_node" if broker_kind == "kafka" else "broker")


@pytest.fixture
def topics(broker_kind: str, running_broker: EmbeddedBroker | KafkaCluster) -> Topics:
    """A test's own names on the session's broker (on each broker, for `both_brokers` tests)."""
    return new_topics(running_broker.bootstrap_servers, broker_kind, -1 if broker_kind == "kafka" else 1)


@pytest.fixture
def start_processor(tmp_path) -> Iterator:
    started: list[ProcessorProcess] = []

    def start(env: dict[str, str], script: Path = ROOT / "kafka_processor.py") -> ProcessorProcess:
        processor = ProcessorProcess(env, tmp_path / f"processor-{len(started)}.log", script)
        started.append(processor)
        return processor

    yield start
    for processor in started:
        processor.stop_quietly()
