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
from tests.fake_kafka import FakeCluster, FakeProducer

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
    producer = FakeProducer(cluster, {})
    return MissingTopics(SETTINGS, producer, topics, health, clock), cluster, topics, health


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


# ---- consumers that joined while their topic was missing join again ------------------------


class Consumer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def unsubscribe(self) -> None:
        self.calls.append("unsubscribe")


@pytest.mark.parametrize("joined", [True, False])
def test_a_consumer_that_joined_while_its_topic_was_missing_leaves_and_joins_again(joined):
    """One that joined (got an assignment, empty: the topic was not there) leaves and joins
    as a new member; one still joining is left alone (it joins once it sees the topic, and
    leaving mid-join leaves the embedded broker waiting on the member that left)."""
    from broker.topic_watch import RejoinWhenRecreated

    consumer, merge = Consumer(), []
    rejoin = RejoinWhenRecreated(
        SETTINGS, consumer, lambda: consumer.calls.append("subscribe"), lambda: joined, lambda: merge.append(1)
    )
    rejoin(["out", "dlq"])  # neither is read by a group consumer
    assert consumer.calls == [] and merge == []
    rejoin(["in", "partials"])
    assert consumer.calls == (["unsubscribe", "subscribe"] if joined else [])
    assert merge == [1]  # the merge stage decides for its own consumer, on its own thread


def test_creating_topics_tells_who_asked_which_were_created(monkeypatch):
    from concurrent.futures import Future

    from broker import kafka_io
    from broker.kafka_io import ensure_topics

    class Admin:
        def __init__(self, _config):
            pass

        def list_topics(self, timeout):
            return type("Metadata", (), {"topics": {"in": None}})()

        def create_topics(self, topics, operation_timeout):
            done = Future()
            done.set_result(None)
            return {topic.topic: done for topic in topics}

    monkeypatch.setattr(kafka_io, "AdminClient", Admin)
    health = BrokerHealth("fake:9", logging.getLogger("test"))
    created = []
    health.when_topics_created(created.append)
    assert ensure_topics(SETTINGS, {"in": 2, "out": 1, "dlq": 1}, lambda: False, health)
    assert created == [["out", "dlq"]]
    assert ensure_topics(SETTINGS, {"in": 2}, lambda: False, health)
    assert created == [["out", "dlq"]]  # nothing created: nobody told


def test_the_merge_stage_leaves_and_joins_again_on_its_own_thread_only_if_it_joined(caplog):
    from broker.pipeline_topics import Published
    from tests.fake_kafka import Faults
    from tests.test_kafka_io import fake_pipeline

    processor, cluster, _commits = fake_pipeline(Faults(enabled=False))
    merger = processor.merger
    processor.resume_from(Published())
    merger.subscribe()
    [member] = cluster.group("g-merge").members
    left = []
    leave = member.unsubscribe
    member.unsubscribe = lambda: (left.append(1), leave())
    merger.rejoin()
    merger.turn(0)  # not joined yet (no assignment served before): left alone; it joins now
    assert left == [] and merger.is_merger
    merger.rejoin()
    assert left == []  # not from the caller's thread: on the merge stage's next turn
    merger.turn(0)
    assert left == [1] and member.in_group and merger.is_merger  # left, joined again, merges
