"""assignment: which partitions this processor owns and where each is read from. The
faults a broker will not make on cue (a failed read of the committed offsets at an
assignment) are injected at the client boundary (tests/fake_kafka.py), with the
processor's own poll loop, timer and merger turning over them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from broker.pipeline_topics import Published
from config import build_settings
from core.window_value import iso_utc
from kafka_processor import Processor
from testkit.oracle import expected_windows
from testkit.processes import ROOT
from tests.fake_kafka import FakeClients, FakeCluster, Faults

W = 30
NOW = 1_800_000_000 - 1_800_000_000 % W


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def login(t: int) -> bytes:
    return json.dumps(
        {"device_type": "iOS", "locale": "RU", "device_id": "d", "ip": "1.1.1.1", "timestamp": t}
    ).encode()


def test_an_idle_partition_whose_committed_offset_could_not_be_read_still_catches_up():
    """Partition 1 is idle, read to its end by an earlier run (committed there). If the
    committed offsets cannot be read at assignment and nobody asks again, nothing ever
    says where partition 1 is read from: it never counts as caught up, and every window
    waits for it."""
    clock = Clock(NOW + 100.0)
    faults = Faults(committed_fails=1.0)
    cluster = FakeCluster(clock, faults)
    settings = build_settings({"KAFKA_BOOTSTRAP_SERVERS": "fake:9", "INPUT_TOPIC": "in", "WINDOW_SECONDS": str(W)})
    for topic, count in (("in", 2), (settings.output_topic, 1), (settings.dlq_topic, 1), (settings.partials_topic, 1)):
        cluster.create_topic(topic, count)
    for t in (NOW - 60, NOW - 50):
        cluster.append("in", 1, None, login(t), timestamp_ms=t * 1000)
    cluster.committed[(settings.consumer_group_id, "in", 1)] = 2  # an earlier run read it all
    cluster.append("in", 0, None, login(NOW - 20), timestamp_ms=(NOW - 20) * 1000)
    processor = Processor(settings, clients=FakeClients(cluster), clock=clock, monotonic=clock)
    processor.resume_from(Published(NOW - 30, 2))  # the earlier run published up to NOW - 30
    processor.start_consuming()
    processor.merger.subscribe()
    processor.poll_once(0)  # assigned: the committed offsets cannot be read
    faults.committed_fails = 0.0
    for _ in range(20):
        clock.now += 0.5
        processor.poll_once(0)
        processor.closer.close_and_publish(0)
        processor.merger.turn(0)
    published = [json.loads(m.value()) for m in cluster.logs[settings.output_topic][0]]
    assert [(w["window_start"], w["message_count"]) for w in published] == [(iso_utc(NOW - W), 1)]


def test_with_offset_reset_latest_a_failed_committed_read_commits_nothing_unread():
    """`auto.offset.reset=latest`, and the committed offsets cannot be read at assignment.
    Partition 1 has a committed offset with records after it; the consumer fetches from
    there (librdkafka reads the commit itself), but until its first records come, the
    processor knew neither its committed offset nor a position, and guessed "latest":
    it marked it read to its end and committed the end before those records were
    aggregated. A crash then lost them."""
    clock = Clock(NOW + 100.0)
    faults = Faults(committed_fails=1.0)
    cluster = FakeCluster(clock, faults)
    settings = build_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "fake:9",
            "INPUT_TOPIC": "in",
            "WINDOW_SECONDS": str(W),
            "KAFKA_AUTO_OFFSET_RESET": "latest",
            "CONSUME_BATCH_SIZE": "3",  # partition 0's backlog fills the first batches
        }
    )
    for topic, count in (("in", 2), (settings.output_topic, 1), (settings.dlq_topic, 1), (settings.partials_topic, 1)):
        cluster.create_topic(topic, count)
    for i in range(12):
        cluster.append("in", 0, None, login(NOW + i), timestamp_ms=(NOW + i) * 1000)
    for i in range(6):
        cluster.append("in", 1, None, login(NOW + 1 + i), timestamp_ms=(NOW + 1 + i) * 1000)
    cluster.committed[(settings.consumer_group_id, "in", 0)] = 0
    cluster.committed[(settings.consumer_group_id, "in", 1)] = 2  # records 2..5 not counted yet
    commits: list[int] = []
    cluster.on_commit = lambda group, topic, partition, offset: (
        commits.append(offset) if (topic, partition) == ("in", 1) else None
    )
    processor = Processor(settings, clients=FakeClients(cluster), clock=clock, monotonic=clock)
    processor.resume_from(Published())
    processor.start_consuming()
    processor.merger.subscribe()
    for _ in range(3):  # partition 0's records come first; partition 1's end is already known
        clock.now += 0.1
        processor.poll_once(0)
        processor.closer.close_and_publish(0)
    assert all(offset <= 2 for offset in commits), f"committed {commits} before records 2..5 were read"


def kip848_member(cluster: FakeCluster, clock: Clock, clients: FakeClients | None = None, **environ: str) -> Processor:
    settings = build_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "fake:9",
            "INPUT_TOPIC": "in",
            "WINDOW_SECONDS": str(W),
            "KAFKA_GROUP_PROTOCOL": "consumer",
            **environ,
        }
    )
    processor = Processor(settings, clients=clients or FakeClients(cluster), clock=clock, monotonic=clock)
    processor.resume_from(Published())
    processor.start_consuming()
    processor.merger.subscribe()
    return processor


def kip848_cluster(clock: Clock, partitions: int = 4) -> FakeCluster:
    cluster = FakeCluster(clock)
    settings = build_settings({"INPUT_TOPIC": "in"})
    for topic, count in (
        ("in", partitions),
        (settings.output_topic, 1),
        (settings.dlq_topic, 1),
        (settings.partials_topic, 1),
    ):
        cluster.create_topic(topic, count)
    return cluster


def test_under_kip848_a_new_groups_latest_starts_are_handed_over_incrementally():
    """`KAFKA_AUTO_OFFSET_RESET=latest` is applied by the processor, which assigned the
    end offsets inside the rebalance callback with `assign()`. A KIP-848 member may only
    change its assignment incrementally there: librdkafka answers `assign()` with an
    error (_STATE), which stopped the processor at its first assignment."""
    clock = Clock(NOW + 100.0)
    cluster = kip848_cluster(clock)
    for partition in range(4):  # the backlog a `latest` group must not read
        cluster.append("in", partition, None, login(NOW - 60), timestamp_ms=(NOW - 60) * 1000)
    member = kip848_member(cluster, clock, KAFKA_AUTO_OFFSET_RESET="latest")
    member.poll_once(0)
    assert sorted(member.aggregator.partition_summary()) == [0, 1, 2, 3]
    for partition in range(4):
        cluster.append("in", partition, None, login(NOW + 1), timestamp_ms=(NOW + 1) * 1000)
    for _ in range(3):
        clock.now += 0.5
        member.poll_once(0)
    assert member.stats.records == 4, "read from the end: only the records written after the start"


def test_under_kip848_a_member_that_joins_takes_only_the_change(caplog):
    """The first member keeps the partitions the group leaves it, with their open windows
    (only the revoked ones are dropped and rebuilt); its log says what it lost, and no
    "assigned partitions none" for the empty assignment that follows."""
    clock = Clock(NOW + 100.0)
    cluster = kip848_cluster(clock)
    first = kip848_member(cluster, clock)
    first.poll_once(0)
    for partition in range(4):
        cluster.append("in", partition, None, login(NOW + 1), timestamp_ms=(NOW + 1) * 1000)
    first.poll_once(0)
    assert first.aggregator.open_window_count() == 4
    caplog.set_level(logging.INFO)
    caplog.clear()
    second = kip848_member(cluster, clock)
    second.poll_once(0)
    first.poll_once(0)
    assert sorted(first.aggregator.partition_summary()) == [0, 1]
    assert sorted(second.aggregator.partition_summary()) == [2, 3]
    assert first.aggregator.open_window_count() == 2, "the kept partitions' windows are not rebuilt"
    lines = [r.getMessage() for r in caplog.records if "assigned" in r.getMessage() or "revoked" in r.getMessage()]
    assert "partition(s) 2,3 revoked; their open windows dropped, to be rebuilt from committed offsets" in lines
    assert [line for line in lines if line.startswith("assigned")] == [
        "assigned partitions 2,3 (2 of 4 partitions) of in; the other processors of group login-aggregator own the rest"
    ], "the first member's rebalance gave it nothing new: no 'assigned partitions none' line"


# A real consumer whose group coordinator is unreachable (a closed port): librdkafka hands
# it one error after another, served by consume() on this thread, as it serves rebalances.
# Its first callbacks ask `topic_partition_count` of the client named on the command line.
_CALLBACK_ASKING_A_CLIENT = textwrap.dedent(
    """
    import os, socket, sys, time
    from confluent_kafka import Consumer, KafkaException, Producer
    from broker.kafka_io import topic_partition_count

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    config = {"bootstrap.servers": "127.0.0.1:%d" % closed.getsockname()[1], "log_level": 0,
              "reconnect.backoff.ms": 20, "reconnect.backoff.max.ms": 20}
    closed.close()
    producer = Producer(config)
    consumer = None
    served = []

    def on_error(error):
        served.append(error.code())
        if len(served) <= 3:
            try:
                topic_partition_count(consumer if sys.argv[1] == "consumer" else producer, "x", timeout=0.01)
            except KafkaException:
                pass  # no broker: the request times out, as it may in a rebalance

    consumer = Consumer({**config, "group.id": "g", "error_cb": on_error})
    consumer.subscribe(["x"])
    deadline = time.monotonic() + 10
    while len(served) < 10 and time.monotonic() < deadline:
        consumer.consume(10, 0.2)
    print("callbacks served:", len(served), flush=True)
    os._exit(0)  # not close(): leaving a group whose coordinator never answered waits
    """
)


@pytest.mark.parametrize("asked", ["consumer", "producer"])
def test_a_consumer_callback_that_asks_its_own_consumer_for_metadata_aborts_the_process(asked):
    """Why `InputAssignment` asks the producer for the input's partition count: with the
    real client, a callback (an assignment, or here an error) that calls list_topics() on
    its own consumer clears confluent-kafka's call state, and the next callback that
    consume() serves aborts the process, exit -6, one line from C: the crash seen when a
    broker came back from an outage. The same request made of another client is harmless.
    tests/fake_kafka.py refuses such nested calls for every processor test run on it."""
    result = subprocess.run(
        [sys.executable, "-c", _CALLBACK_ASKING_A_CLIENT, asked],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if asked == "consumer":
        assert result.returncode == -6, result.stdout + result.stderr
        assert "CallState_get: Assertion `cs != NULL' failed" in result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "callbacks served: " in result.stdout
        assert int(result.stdout.split("callbacks served: ")[1]) >= 10


def test_a_partition_handed_back_is_not_taken_as_read_to_its_end_by_its_old_cached_end():
    """librdkafka keeps a partition's cached end offset when the partition is taken away
    and answers it, unchanged, when it comes back, until its first fetch is answered. A
    member that got back a partition another member had read on since (its commit past
    that old end) took it for read to its end at once, and its timer closed the open
    window without the records after the commit: under KIP-848 on Kafka, where partitions
    move back and forth, the chaos test's windows came out short by one partition's share
    (2026-12-07, seed 1: 1250 of 1500)."""
    clock = Clock(NOW + 1.0)
    cluster = kip848_cluster(clock, partitions=2)
    records: list[tuple[bytes, int]] = []

    def write(partition: int, t: int) -> None:
        cluster.append("in", partition, None, login(t), timestamp_ms=t * 1000)
        records.append((login(t), t * 1000))

    def run(members: tuple[Processor, ...], until: float) -> None:
        """Every loop of every member turns, each half second of the clock."""
        while clock.now < until:
            for member in members:
                member.poll_once(0)
                member.closer.close_and_publish(0)
                member.merger.turn(0)
            clock.now += 0.5

    first = kip848_member(cluster, clock)
    for partition in (0, 1):
        write(partition, NOW + 1)
    run((first,), NOW + 2)  # partition 1's end, as of now, cached: 1
    second_clients = FakeClients(cluster)
    second = kip848_member(cluster, clock, second_clients)
    run((first, second), NOW + 3)  # partition 1 moves to the second member
    for t in (NOW + 3, NOW + 4, NOW + 5):
        write(1, t)  # which reads it on, to offset 4
    write(0, NOW + W + 1)
    write(1, NOW + W + 1)
    run((first, second), NOW + W + 20)  # the first window is published
    # The second member stops (SIGKILL) before its session ends, partition 1 is written to
    # and read by nobody; the first member carries on, past the second window's grace.
    for t in (NOW + W + 21, NOW + W + 22):
        write(1, t)
    run((first,), NOW + 2 * W + 8)
    # Its session over, the group gives partition 1 back to the first member, whose cached
    # end of it is still 1, from before: at or before the second member's commit.
    assert cluster.committed[(first.settings.consumer_group_id, "in", 1)] >= 1
    for client in second_clients.made:
        if hasattr(client, "expire"):
            client.expire()
    run((first,), NOW + 2 * W + 10)  # the second window is due since NOW + 2 * W + 5
    output = cluster.logs[first.settings.output_topic][0]
    published = {m.key().decode(): json.loads(m.value()) for m in output}  # the latest per window
    assert published == expected_windows(records, window=W, now=clock.now)


def test_a_partition_handed_back_with_nothing_written_since_is_read_to_its_end_at_once():
    """The other side of the case above: a partition comes back with nothing written to
    it since this member cached its end (here it is empty), so no record comes to show
    that a fetch was answered, and the cached end never moves. The broker's listed end,
    not past the cached one, says it is current: the partition is read to its end and
    the window closes on time, not when its next record comes."""
    clock = Clock(NOW + 1.0)
    cluster = kip848_cluster(clock, partitions=2)
    first = kip848_member(cluster, clock)
    cluster.append("in", 0, None, login(NOW + 1), timestamp_ms=(NOW + 1) * 1000)
    for _ in range(4):
        clock.now += 0.5
        first.poll_once(0)  # both read to their ends (1 and 0), cached
    second_clients = FakeClients(cluster)
    second = kip848_member(cluster, clock, second_clients)
    for _ in range(2):
        first.poll_once(0)  # partition 1 revoked
        second.poll_once(0)  # ... and assigned here
    for client in second_clients.made:
        if hasattr(client, "expire"):
            client.expire()
    # Partition 1 comes back: cached end 0, no position (no record comes). The first
    # window is due at NOW + W + 5; partition 1 holds it while not read to its end.
    while clock.now < NOW + W + 7:
        first.poll_once(0)
        first.closer.close_and_publish(0)
        first.merger.turn(0)
        clock.now += 0.5
    output = cluster.logs[first.settings.output_topic][0]
    assert [json.loads(m.value())["message_count"] for m in output] == [1]
