"""dead_letter: invalid records reach the dead-letter topic at least once, and no commit
passes a copy the broker has not acknowledged. Against real brokers, one of them paused
(SIGSTOP) to stand for a slow or unreachable partition leader."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from broker.embedded_broker import EmbeddedBroker
from ingest.dead_letter import DeadLetterQueue
from testkit.processes import Topics, produce, read_topic, wait_until

pytestmark = [pytest.mark.broker]


class Paused:
    """The broker process stopped (SIGSTOP) inside the block, running again after it."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.pid = broker.process.pid

    def __enter__(self) -> Paused:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *_exc) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def second_broker(tmp_path):
    with EmbeddedBroker(log_path=tmp_path / "second-broker.log") as running:
        yield running


class SourceOffsets:
    """The distinct source offsets on a DLQ topic, read by one consumer as the topic grows
    (reading a large topic from the start at every check is slow on a busy machine)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.offsets: set[bytes] = set()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}", "log_level": 2})
        self._consumer.assign([TopicPartition(topic, 0, 0)])

    def read(self) -> int:
        for message in self._consumer.consume(5000, 0.5):
            if message.error() is None:
                self.offsets.add(dict(message.headers())["dlq.source.offset"])
        return len(self.offsets)

    def close(self) -> None:
        self._consumer.close()


def consumed_messages(bootstrap: str, topic: str, count: int) -> list:
    """Real Message objects, as the poll loop sees them."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}", "auto.offset.reset": "earliest"}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages: list = []
    deadline = time.monotonic() + 20
    while len(messages) < count and time.monotonic() < deadline:
        messages.extend(m for m in consumer.consume(count, 0.5) if m.error() is None)
    consumer.close()
    assert len(messages) == count
    return messages


def test_an_unacknowledged_copy_holds_its_offset_until_the_broker_has_it(topics: Topics, second_broker):
    topics.create(input_partitions=1)
    produce(topics.bootstrap, topics.input, [(0, f"junk {i}".encode(), 1_700_000_000_000) for i in range(3)])
    messages = consumed_messages(topics.bootstrap, topics.input, 3)
    producer = Producer({"bootstrap.servers": second_broker.bootstrap_servers, "linger.ms": 5, "log_level": 2})
    producer.produce("dlq", b"warm-up")  # the DLQ broker known to the producer first
    assert producer.flush(10) == 0
    dead_letters = DeadLetterQueue(producer, "dlq", "test-host", lambda: False)
    with Paused(second_broker):
        for message in messages[1:]:
            assert dead_letters.copy(message, "not valid JSON")
        assert producer.flush(1.0) > 0  # the broker is not answering
        assert dead_letters.holds() == {0: 1}
    assert producer.flush(20) == 0
    assert dead_letters.holds() == {}
    copies = [m for m in read_topic(second_broker.bootstrap_servers, "dlq") if m.value() != b"warm-up"]
    assert sorted(dict(m.headers())["dlq.source.offset"] for m in copies) == [b"1", b"2"]
    assert {dict(m.headers())["dlq.reason"] for m in copies} == {b"not valid JSON"}


def test_a_full_queue_waits_for_room_and_gives_up_only_when_stopping(topics: Topics, second_broker):
    topics.create(input_partitions=1)
    produce(topics.bootstrap, topics.input, [(0, f"junk {i}".encode(), 1_700_000_000_000) for i in range(30)])
    messages = consumed_messages(topics.bootstrap, topics.input, 30)
    producer = Producer(
        {
            "bootstrap.servers": second_broker.bootstrap_servers,
            "queue.buffering.max.messages": 5,
            "linger.ms": 5,
            "log_level": 2,
        }
    )
    producer.produce("dlq", b"warm-up")
    assert producer.flush(10) == 0
    stop = threading.Event()
    dead_letters = DeadLetterQueue(producer, "dlq", "test-host", stop.is_set)
    outcomes: list[bool] = []
    with Paused(second_broker):
        worker = threading.Thread(target=lambda: outcomes.extend(dead_letters.copy(m, "junk") for m in messages))
        worker.start()
        time.sleep(3)  # far longer than one produce attempt: still waiting, not raising
        assert worker.is_alive() and outcomes.count(True) < 30
    worker.join(30)
    assert outcomes == [True] * 30  # every copy queued once the broker answered again
    assert producer.flush(20) == 0 and dead_letters.holds() == {}
    with Paused(second_broker):
        with pytest.raises(BufferError):
            for _ in range(10):
                producer.produce("dlq", b"filler")  # fill the queue again
        stop.set()
        assert dead_letters.copy(messages[0], "junk") is False  # stopping: gives up at once
        assert dead_letters.holds() == {0: 0}  # ...and its offset stays held
    producer.flush(20)


@pytest.mark.slow
def test_a_flood_of_invalid_records_while_the_broker_is_paused_loses_nothing(tmp_path, start_processor):
    """The processor's own broker stops answering mid-flood; the producer queue is tiny,
    so the DLQ copies hit back-pressure. The processor must wait, not crash, and every
    invalid record must end up on the DLQ."""
    count = 5_000
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        tag = uuid.uuid4().hex[:8]
        topics = Topics(broker.bootstrap_servers, f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}")
        topics.create(input_partitions=1)
        now_ms = int(time.time() * 1000)
        produce(topics.bootstrap, topics.input, [(0, f"junk {i}".encode(), now_ms) for i in range(count)])
        processor = start_processor(topics.env(KAFKA_PRODUCER_QUEUE_BUFFERING_MAX_MESSAGES="10"))
        copies = SourceOffsets(topics.bootstrap, topics.dlq)
        wait_until(lambda: copies.read() >= 100, 60, message="first DLQ copies")
        with Paused(broker):
            time.sleep(8)  # longer than the old single flush(5.0) retry
            assert processor.process.poll() is None, processor.log()
        wait_until(lambda: copies.read() >= count, 120, message="every invalid record on the DLQ")
        copies.close()
        code, seconds = processor.terminate()
        assert code == 0, processor.log()
        assert "crashed" not in processor.log()


def test_the_processor_commits_past_an_invalid_record_only_once_its_copy_is_stored(topics: Topics, second_broker):
    """The DLQ's partition leader (here a second broker, paused) does not answer while the
    windows' leader does: every window is published, but the input offset of the invalid
    record is not committed until its copy is acknowledged."""
    from config import build_settings
    from kafka_processor import Processor

    topics.create(input_partitions=1)
    start = int(time.time()) - 600
    start -= start % 30
    login = b'{"device_type": "android", "locale": "RU", "app_version": "1", "device_id": "d", "timestamp": %d}'
    produce(
        topics.bootstrap,
        topics.input,
        [(0, login % (start + 1), start * 1000), (0, b"junk", start * 1000)]
        + [(0, login % (start + 30 * i + 1), start * 1000) for i in (1, 2)],
    )
    processor = Processor(build_settings(topics.env()))
    dlq_producer = Producer(
        {"bootstrap.servers": second_broker.bootstrap_servers, "linger.ms": 5, "message.timeout.ms": 0, "log_level": 2}
    )
    dlq_producer.produce("dlq", b"warm-up")
    assert dlq_producer.flush(10) == 0
    # The poll loop copies to it and the window closer holds offsets for it: one queue.
    dead_letters = DeadLetterQueue(dlq_producer, "dlq", "test-host", processor.stop_requested.is_set)
    processor.dead_letters = processor.checkpoint.dead_letters = dead_letters
    exit_code: list[int] = []
    runner = threading.Thread(target=lambda: exit_code.append(processor.run()))
    try:
        with Paused(second_broker):
            runner.start()
            wait_until(lambda: len(read_topic(topics.bootstrap, topics.output)) >= 3, 60, message="3 windows")
            time.sleep(2)  # several commit turns
            assert committed_offset(topics) == 1  # held at the invalid record
        wait_until(lambda: dlq_producer.flush(0.5) == 0, 30, message="the DLQ copy acknowledged")
        wait_until(lambda: committed_offset(topics) == 4, 30, message="the commit past the invalid record")
    finally:
        processor.stop_requested.set()
        runner.join(30)
    assert exit_code == [0]
    copies = [m for m in read_topic(second_broker.bootstrap_servers, "dlq") if m.value() == b"junk"]
    assert [dict(m.headers())["dlq.source.offset"] for m in copies] == [b"1"]


def committed_offset(topics: Topics) -> int:
    consumer = Consumer({"bootstrap.servers": topics.bootstrap, "group.id": topics.group, "log_level": 2})
    try:
        return consumer.committed([TopicPartition(topics.input, 0)], timeout=10)[0].offset
    finally:
        consumer.close()
