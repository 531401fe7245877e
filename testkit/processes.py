"""What the real-broker tests and the benchmarks share: a test's own topics, producing
and reading records, the processor as a subprocess, waiting, and the tools a test needs.

Plain functions and classes, imported by name (`from testkit.processes import ...`);
the pytest fixtures that start brokers and processors live in tests/conftest.py and
use these. Not shipped in the image.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from broker.apache_kafka import missing_reason

ROOT = Path(__file__).resolve().parent.parent


def require_kafka() -> None:
    """Apache Kafka must be runnable here: in CI its absence is a failure, locally a skip."""
    reason = missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run must assemble it")
        pytest.skip(reason)


@dataclass
class Topics:
    """A test's own topic names and consumer group, plus the environment for the scripts."""

    bootstrap: str
    input: str
    output: str
    dlq: str
    group: str
    extra_env: dict[str, str] = field(default_factory=dict)
    broker: str = "tansu"  # or "kafka": the broker these topics are on
    # Of the topics `create` makes: -1 is the broker's default (3 on the 3-node cluster).
    replication_factor: int = 1

    @property
    def partials(self) -> str:
        """The internal topic of window parts: one per output topic, so tests never share it."""
        return f"{self.output}-partials"

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "INPUT_TOPIC": self.input,
            "OUTPUT_TOPIC": self.output,
            "DLQ_TOPIC": self.dlq,
            "PARTIALS_TOPIC": self.partials,
            "CONSUMER_GROUP_ID": self.group,
            # Faster than the project's 10 s default (config.CONSUMER_DEFAULTS): Tansu makes a
            # joining member wait about half of it.
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "CLOSE_INTERVAL_SECONDS": "0.2",
            **self.extra_env,
            **overrides,
        }

    def create(self, input_partitions: int = 4) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        factor = self.replication_factor
        futures = admin.create_topics(
            [
                NewTopic(self.input, input_partitions, factor),
                NewTopic(self.output, 1, factor),
                NewTopic(self.dlq, 1, factor),
            ]
        )
        for future in futures.values():
            future.result(10)


def new_topics(bootstrap: str, broker_kind: str = "tansu", replication_factor: int = 1) -> Topics:
    """Fresh topic and group names on the broker at `bootstrap`."""
    tag = uuid.uuid4().hex[:8]
    names = (f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}")
    return Topics(bootstrap, *names, broker=broker_kind, replication_factor=replication_factor)


def produce(bootstrap: str, topic: str, records: list[tuple[int, bytes | None, int]], key: bytes | None = None) -> None:
    """records: (partition, value, Kafka timestamp in ms)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "log_level": 2})
    for partition, value, timestamp_ms in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition, timestamp=timestamp_ms)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0, client: dict | None = None) -> list:
    """Every record of every partition of `topic`, read to the end (`client`: more
    librdkafka settings, TLS say)."""
    consumer = Consumer(
        {
            **(client or {}),
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "log_level": 2,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = sorted(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        waiting, records = set(partitions), []
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    records.append(message)
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    waiting.discard(message.partition())
        assert not waiting, f"could not read {topic} to its end"
        return records
    finally:
        consumer.close()


def latest_by_key(bootstrap: str, topic: str) -> dict[str, bytes]:
    """What a compacting consumer sees: the latest value per key."""
    return {m.key().decode(): m.value() for m in read_topic(bootstrap, topic)}


class ProcessorProcess:
    """kafka_processor.py as a real subprocess, its log kept for the test to read."""

    def __init__(self, env: dict[str, str], log_path: Path, script: Path = ROOT / "kafka_processor.py") -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process.poll() is None, f"processor exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {text!r} in the processor log:\n{self.log()}"
            time.sleep(0.1)

    def terminate(self, timeout: float = 20.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop_quietly(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def wait_until(condition, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def wait_for_windows(bootstrap: str, output: str, expected: dict[str, dict], timeout: float, context: str = ""):
    """Wait until the output's latest value per key is exactly `expected` (the oracle's
    windows); return it. On timeout, fail naming every window that differs as (expected,
    published message_count), then `context` (what the test did: a seed, its events)."""

    def published() -> dict[str, dict]:
        return {key: json.loads(value) for key, value in latest_by_key(bootstrap, output).items()}

    try:
        return wait_until(lambda: (p := published()) == expected and p, timeout, message="the oracle's windows")
    except AssertionError:
        now = published()
        wrong = {
            key: (expected.get(key, {}).get("message_count"), now.get(key, {}).get("message_count"))
            for key in sorted(set(expected) | set(now))
            if expected.get(key) != now.get(key)
        }
        raise AssertionError(f"windows (expected, published message_count) {wrong}; {context}") from None


def require_tool(binary: str, package: str) -> str:
    """A Debian tool a test needs: in CI its absence is a failure (.ci/run installs it), locally a skip."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is missing: .ci/run must install Debian's {package}")
        pytest.skip(f"{binary} is not installed (apt-get install {package})")
    return path


def aligned_past(minutes_ago: int, window: int = 30) -> int:
    """A window start `minutes_ago` minutes back: event times the wall clock has passed."""
    now = int(time.time()) - minutes_ago * 60
    return now - now % window


def published_backlog(topics: Topics, start_processor, seconds: int, count: int, seed: int, **env: str):
    """Produce `count` records over `seconds` of past event time, run the processor, and
    wait until every window is on the output topic. Returns (records, expected windows)."""
    from testkit.oracle import expected_windows
    from testkit.workloads import login_workload

    records = login_workload(aligned_past(15), seconds, count, 4, seed=seed)
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows([(value, ms) for _, value, ms in records])
    processor = start_processor(topics.env(**env))
    wait_until(lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected), 60, message="every window")
    return records, expected, processor


def run_script(script: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 60):
    """Run one of the project's scripts to completion, as a user would (no .env in `cwd`)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
