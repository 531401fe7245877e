"""Several processors in one consumer group, against the real broker: the same windows,
byte for byte, as one processor, whatever their number and whoever dies.

These are the scale-out scenarios: 1, 2 and 3 processors over one backlog; members
SIGKILLed (the merger among them) while a fresh one joins; idle partitions; a live
stream shared by two processors, each window published soon after it ends.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from testkit.oracle import expected_windows
from testkit.processes import Topics, aligned_past, latest_by_key, produce, read_topic, wait_until
from testkit.workloads import login_workload

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def oracle_input(records):
    return [(value, kafka_ms) for _, value, kafka_ms in records]


def run_topics(topics: Topics, name: str) -> Topics:
    """Same input and DLQ, an output (and partials topic) and group of this run's own."""
    return Topics(topics.bootstrap, topics.input, f"{topics.output}-{name}", topics.dlq, f"{topics.group}-{name}")


def every_window(run: Topics, expected: dict, timeout: float) -> dict[str, bytes]:
    return wait_until(
        lambda: (got := latest_by_key(run.bootstrap, run.output)) and len(got) >= len(expected) and got,
        timeout,
        message=f"{len(expected)} windows on {run.output}",
    )


def as_values(published: dict[str, bytes]) -> dict[str, dict]:
    return {key: json.loads(value) for key, value in published.items()}


def test_one_two_and_three_processors_publish_the_same_bytes(topics, start_processor):
    topics.create(input_partitions=6)
    records = login_workload(aligned_past(20), seconds=600, count=30_000, partitions=6, seed=5)
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows(oracle_input(records))
    assert len(expected) in (20, 21)
    outputs = {}
    for count in (1, 2, 3):
        run = run_topics(topics, f"n{count}")
        # Small batches: the backlog lasts long enough for every member to join and share it.
        processors = [start_processor(run.env(CONSUME_BATCH_SIZE="50")) for _ in range(count)]
        outputs[count] = every_window(run, expected, 120)
        for processor in processors:
            code, _ = processor.terminate()
            assert code == 0, processor.log()
        assert as_values(outputs[count]) == expected, f"{count} processor(s)"
        mergers = [p for p in processors if "this processor is now the merger" in p.log()]
        assert mergers, "nobody merged"
        if count > 1:
            assert any("assigned partitions" in p.log() for p in processors), "the partitions were never shared"
    assert outputs[1] == outputs[2] == outputs[3]  # byte for byte
    invalid = [value for _, value, _ in records if not value or not value.startswith(b"{")]
    dead_lettered = {m.value() for m in read_topic(topics.bootstrap, topics.dlq)}
    assert set(invalid) <= dead_lettered


def kill_mid_stream_while_a_fresh_one_joins(topics: Topics, start_processor, env: dict) -> tuple[int, int, list]:
    """Three processors; SIGKILL the first to be given partitions as soon as it has them
    (its share of the backlog half read, its parts half published), start a fresh one,
    then SIGKILL whoever publishes the first window, as it does. Returns the number of
    windows on the output at each kill, and the survivors."""
    processors = [start_processor(env) for _ in range(3)]
    first = wait_until(
        lambda: next((p for p in processors if "assigned partitions" in p.log()), None), 60, 0.01, "an assignment"
    )
    first.kill()
    at_first_kill = len(latest_by_key(topics.bootstrap, topics.output))
    alive = [p for p in processors if p is not first] + [start_processor(env)]
    merger = wait_until(
        lambda: next((p for p in alive if "published window" in p.log()), None), 90, 0.01, "a first window"
    )
    merger.kill()
    at_second_kill = len(latest_by_key(topics.bootstrap, topics.output))
    survivors = [p for p in alive if p is not merger]
    return at_first_kill, at_second_kill, survivors


def test_members_killed_mid_stream_while_a_fresh_one_joins_change_nothing(topics, start_processor):
    topics.create(input_partitions=6)
    records = login_workload(aligned_past(25), seconds=600, count=60_000, partitions=6, seed=8)
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows(oracle_input(records))
    env = topics.env(CONSUME_BATCH_SIZE="20")
    at_first_kill, at_second_kill, survivors = kill_mid_stream_while_a_fresh_one_joins(topics, start_processor, env)
    assert at_first_kill < len(expected), "the first kill came after the work"
    published = every_window(topics, expected, 150)
    assert as_values(published) == expected, (at_first_kill, at_second_kill)
    assert len(published) == len(expected)
    for survivor in survivors:
        code, _ = survivor.terminate()
        assert code == 0, survivor.log()


def test_idle_partitions_hold_no_window(topics, start_processor):
    topics.create(input_partitions=6)
    records = [r for r in login_workload(aligned_past(10), seconds=180, count=3000, partitions=3, seed=3)]
    produce(topics.bootstrap, topics.input, records)  # partitions 3, 4 and 5 stay empty
    expected = expected_windows(oracle_input(records))
    processors = [start_processor(topics.env()) for _ in range(2)]
    assert as_values(every_window(topics, expected, 60)) == expected
    for processor in processors:
        assert processor.terminate()[0] == 0


class OutputTail:
    """Reads the output topic as it grows, noting when each window was first seen."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "tail", "auto.offset.reset": "earliest", "log_level": 2}
        )
        self._consumer.assign([TopicPartition(topic, 0, 0)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(100, 0.1):
                if message.error() is None:
                    self.first_seen.setdefault(message.key().decode(), time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def test_a_live_stream_shared_by_two_processors_publishes_every_window_on_time(topics, start_processor):
    """5-second windows, 2 s of lateness: every window, the last one included, is on
    the output topic within lateness + 3 s of its end."""
    from datetime import UTC, datetime

    topics.create(input_partitions=6)
    window, lateness = 5, 2
    env = topics.env(WINDOW_SECONDS=str(window), ALLOWED_LATENESS_SECONDS=str(lateness))
    processors = [start_processor(env) for _ in range(2)]
    for processor in processors:
        processor.wait_for_log("assigned", timeout=30)
    time.sleep(4)  # both members in the group
    tail = OutputTail(topics.bootstrap, topics.output)
    sent: list[tuple[int, bytes, int]] = []
    started = time.time()
    index = 0
    while time.time() - started < 10:
        now = time.time()
        batch = []
        for _ in range(10):
            record = {"device_type": "android", "locale": "RU", "app_version": "1", "device_id": f"d{index}"}
            record["timestamp"] = int(now)
            batch.append((index % 6, json.dumps(record).encode(), int(now * 1000)))
            index += 1
        produce(topics.bootstrap, topics.input, batch)
        sent += batch
        time.sleep(0.2)
    windows = {int(value["timestamp"]) // window * window for value in map(lambda r: json.loads(r[1]), sent)}
    last_end = max(windows) + window
    wait_until(lambda: len(tail.first_seen) >= len(windows), last_end + lateness + 10 - time.time(), message="all")
    tail.close()
    for start in sorted(windows):
        key = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        latency = tail.first_seen[key] - (start + window)
        assert latency <= lateness + 3, f"window {key} published {latency:.1f}s after its end"
    published = {key: json.loads(value) for key, value in latest_by_key(topics.bootstrap, topics.output).items()}
    assert sum(v["message_count"] for v in published.values()) == len(sent)
    for processor in processors:
        assert processor.terminate()[0] == 0
