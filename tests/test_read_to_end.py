"""read_to_end: what the client and the broker answer about a partition's end, on the
real brokers.

ReadToEnd believes the client's cached end offsets (local calls, one per partition and
batch). These pin what it relies on when a partition comes back to a member: the cached
end outlives the revocation, and the broker's listed end says whether anything was
written since. How the processor copes is tested over the in-memory Kafka
(tests/test_assignment.py, the handed-back partition).
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from testkit.processes import Topics

pytestmark = pytest.mark.broker


def write(topics: Topics, count: int) -> None:
    producer = Producer({"bootstrap.servers": topics.bootstrap, "log_level": 2})
    for _ in range(count):
        producer.produce(topics.input, value=b"x", partition=0)
    assert producer.flush(15) == 0


@pytest.mark.both_brokers
def test_a_partition_assigned_again_answers_its_old_cached_end_until_its_first_fetch(topics):
    """Read to its end (50) and taken away. Assigned again with nothing written since: the
    listed end is not past the cached one (Kafka: 50; the embedded broker: its last
    batch's base + 1). Taken away, written to (150), assigned again from 120 (where
    another member committed): until the first fetch is answered the client says the end
    is 50 and has no position, so "the start (120) is at or past the end" would be
    believed; the listed end is past 50 on both brokers. After the fetch: 150."""
    topics.create(input_partitions=1)
    write(topics, 50)
    consumer = Consumer(
        {"bootstrap.servers": topics.bootstrap, "group.id": topics.group, "enable.auto.commit": False, "log_level": 2}
    )
    partition = TopicPartition(topics.input, 0)

    def cached_end() -> int:
        return consumer.get_watermark_offsets(partition, cached=True)[1]

    def listed_end() -> int:
        return consumer.get_watermark_offsets(partition, timeout=10)[1]

    try:
        consumer.assign([TopicPartition(topics.input, 0, 0)])
        read, deadline = 0, time.monotonic() + 30
        while read < 50 and time.monotonic() < deadline:
            read += len([m for m in consumer.consume(50, 0.5) if not m.error()])
        assert read == 50 and cached_end() == 50
        consumer.incremental_unassign([partition])
        consumer.incremental_assign([TopicPartition(topics.input, 0, 50)])
        assert cached_end() == 50 and listed_end() <= 50  # nothing written since
        consumer.incremental_unassign([partition])
        time.sleep(1)  # a fetch still waiting at the broker (fetch.wait.max.ms) would take the new end
        write(topics, 100)
        consumer.incremental_assign([TopicPartition(topics.input, 0, 120)])
        assert cached_end() == 50
        assert consumer.position([partition])[0].offset < 0
        assert listed_end() > 50  # written since
        deadline = time.monotonic() + 30
        while cached_end() != 150 and time.monotonic() < deadline:
            consumer.consume(10, 0.2)
        assert cached_end() == 150
    finally:
        consumer.close()
