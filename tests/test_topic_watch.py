"""broker/topic_watch.py: any of the pipeline's topics gone missing is created again.

Over the in-memory Kafka (tests/fake_kafka.py): which topics exist is the cluster's
logs. What `PipelineTopics.ensure` creates, and with which settings, is checked on the
real broker (tests/test_health.py, the broker restarted under a running processor)."""

from __future__ import annotations

import logging

import pytest

from broker.kafka_io import BrokerHealth
from broker.topic_watch import CHECK_SECONDS, GRACE_SECONDS, MissingTopics
from config import build_settings
from tests.fake_kafka import FakeCluster, FakeConsumer

SETTINGS = build_settings(
    {"INPUT_TOPIC": "in", "OUTPUT_TOPIC": "out", "DLQ_TOPIC": "dlq", "PARTIALS_TOPIC": "partials"}
)
SIZES = {"in": 2, "out": 1, "dlq": 1, "partials": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Topics:
    """Stands in for PipelineTopics: ensure() creates what is missing."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.ensured = 0

    def ensure(self) -> bool:
        self.ensured += 1
        for name, count in SIZES.items():
            self.cluster.create_topic(name, count)
        return True


def watch(clock: Clock):
    cluster = FakeCluster(clock)
    for name, count in SIZES.items():
        cluster.create_topic(name, count)
    health = BrokerHealth("fake:9", logging.getLogger("test"))
    topics = Topics(cluster)
    consumer = FakeConsumer(cluster, {"group.id": "g"})
    return MissingTopics(SETTINGS, consumer, topics, health, clock), cluster, topics, health


@pytest.mark.parametrize("gone", ["out", "partials", "dlq", "in"])
def test_a_missing_topic_is_created_again_after_the_grace_period(gone, caplog):
    clock = Clock()
    watcher, cluster, topics, _health = watch(clock)
    del cluster.logs[gone]
    with caplog.at_level(logging.WARNING):
        for _ in range(int((CHECK_SECONDS + GRACE_SECONDS) / 0.5)):
            clock.now += 0.5
            watcher.check()
            if topics.ensured:
                break
        assert topics.ensured == 1
        assert clock.now - 1000 <= 2 * CHECK_SECONDS + GRACE_SECONDS
        [line] = [r.getMessage() for r in caplog.records]
        assert f"topic {gone} missing" in line
        for _ in range(100):  # there again: nothing more
            clock.now += 0.5
            watcher.check()
    assert topics.ensured == 1


def test_nothing_is_missing_while_the_broker_is_unreachable():
    clock = Clock()
    watcher, cluster, topics, health = watch(clock)
    cluster.logs.clear()  # a metadata answer would say "missing"; none is asked
    health.down_since = clock.now
    for _ in range(100):
        clock.now += 0.5
        watcher.check()
    assert topics.ensured == 0


def test_a_processor_creates_its_output_and_partials_topics_again_while_the_input_is_there():
    """Before, only a missing input topic was noticed: the processor went on with an output
    or partials topic gone (its writes waiting, or a broker creating them with its own
    defaults)."""
    import time

    from broker.pipeline_topics import Published
    from tests.fake_kafka import Faults
    from tests.test_kafka_io import SimClock, fake_pipeline, turn

    clock = SimClock(time.time())
    processor, cluster, _commits = fake_pipeline(Faults(enabled=False), clock)
    created = []

    def ensure() -> bool:  # PipelineTopics.ensure's admin client is real; this records the call
        missing = [name for name in SIZES if name not in cluster.logs]
        created.append(missing)
        for name in missing:
            cluster.create_topic(name, SIZES[name])
        return True

    processor.topics.ensure = ensure
    processor.resume_from(Published())
    processor.start_consuming()
    processor.merger.subscribe()
    for _ in range(10):
        clock.now += 0.5
        turn(processor)
    del cluster.logs["out"], cluster.logs["partials"]
    for _ in range(60):
        clock.now += 0.5
        turn(processor)
    assert created == [["out", "partials"]]
