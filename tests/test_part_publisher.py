"""part_publisher: parts and progress reach the partials topic whole, in order, and are
acknowledged only when they are. Faults a broker will not make on cue (a full queue at
the third piece, a refused or delayed delivery, a report arriving after a revoke) are
injected at the client boundary (tests/fake_kafka.py)."""

from __future__ import annotations

from aggregator import ClosedPart, ClosedParts
from ingest.part_publisher import PartPublisher
from merging.parts import decode_partial
from tests.fake_kafka import FakeCluster, FakeProducer, Faults

T0 = 1_800_000_000 - 1_800_000_000 % 30
W = 30
TOPIC = "partials"


def publisher(faults: Faults) -> tuple[PartPublisher, FakeProducer, FakeCluster]:
    cluster = FakeCluster(lambda: T0 + 1000.0, faults)
    cluster.create_topic(TOPIC, 1)
    producer = FakeProducer(cluster, {})
    return PartPublisher(producer, TOPIC, "host"), producer, cluster


def part(partition: int, start: int, pieces: int) -> ClosedPart:
    return ClosedPart(partition=partition, start=start, pieces=[b"piece-%d" % n for n in range(pieces)])


def on_topic(cluster: FakeCluster) -> list[bytes]:
    return [m.value() for m in cluster.logs[TOPIC][0]]


def test_a_full_queue_at_the_third_piece_leaves_the_part_unacknowledged_until_every_piece_is():
    faults = Faults(buffer_errors_at={3})
    parts, producer, cluster = publisher(faults)
    parts.add(ClosedParts(parts=[part(0, T0, 5)], progress={}, partition_count=1))
    parts.send()
    producer.flush()
    assert on_topic(cluster) == [b"piece-0", b"piece-1"]
    assert parts.take_acknowledged() == []  # two pieces of five are stored: not the part
    parts.send()  # the next turn goes on from the third piece
    producer.flush()
    assert on_topic(cluster) == [b"piece-%d" % n for n in range(5)]
    assert parts.take_acknowledged() == [(0, T0)]


def test_progress_goes_out_only_after_the_parts_it_covers_are_acknowledged():
    faults = Faults(deliveries=["refuse"])  # the part's only piece is refused once
    parts, producer, cluster = publisher(faults)
    parts.add(ClosedParts(parts=[part(0, T0, 1)], progress={0: T0 + W}, partition_count=1))
    for _ in range(3):  # timer turns
        parts.send()
        producer.flush()
    records = on_topic(cluster)
    assert records[0] == b"piece-0"  # produced again after the refusal...
    assert decode_partial(records[1]).closed_until == T0 + W  # ...and only then the progress
    assert parts.take_acknowledged() == [(0, T0)]


def test_a_later_part_of_a_partition_waits_for_the_one_before_it():
    faults = Faults(deliveries=["refuse"])
    parts, producer, cluster = publisher(faults)
    parts.add(ClosedParts(parts=[part(0, T0, 1), part(0, T0 + W, 1), part(1, T0, 1)], progress={}, partition_count=2))
    parts.send()
    producer.flush()  # partition 0's first part is refused; partition 1's goes through
    assert on_topic(cluster) == [b"piece-0"]
    assert parts.take_acknowledged() == [(1, T0)]
    parts.send()
    producer.flush()
    parts.send()
    producer.flush()
    assert parts.take_acknowledged() == [(0, T0), (0, T0 + W)]


def test_a_report_of_a_revoked_publication_never_acknowledges_a_new_one():
    faults = Faults(deliveries=["delay"])
    parts, producer, cluster = publisher(faults)
    parts.add(ClosedParts(parts=[part(0, T0, 1)], progress={}, partition_count=1))
    parts.send()
    producer.flush()  # not delivered yet: still in the producer's queue
    parts.clear()  # revoked
    parts.add(ClosedParts(parts=[part(0, T0, 1)], progress={}, partition_count=1))  # assigned again, rebuilt
    parts.send()
    faults.deliveries = ["ok", "refuse"]  # the old publication is stored, the new one refused
    producer.flush()
    assert parts.take_acknowledged() == []
    faults.deliveries = []
    parts.send()
    producer.flush()
    assert parts.take_acknowledged() == [(0, T0)]
