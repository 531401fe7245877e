"""What the embedded broker (Tansu 0.6.0) and Apache Kafka 4.4 answer differently.

Each difference is one test that runs on both brokers and states what each answers,
so that a new version of either that changes its answer fails here first. The table in
docs/design.md ("Tansu and Apache Kafka") has a line for each, with what the code does
about it and where that is tested.
"""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource, NewPartitions, NewTopic

from broker.embedded_broker import EmbeddedBroker, free_port
from testkit.processes import Topics, read_topic, require_kafka

pytestmark = pytest.mark.broker

QUIET = {"log_level": 2}
BASE_MS = 1_790_000_000_000  # a fixed past time (2026-09-21)


_ADMINS: dict[str, AdminClient] = {}


def admin_of(topics: Topics) -> AdminClient:
    """One admin client per broker for the module: a client dropped while its futures are
    pending fails them ("Handle is terminating")."""
    if topics.bootstrap not in _ADMINS:
        _ADMINS[topics.bootstrap] = AdminClient({"bootstrap.servers": topics.bootstrap, **QUIET})
    return _ADMINS[topics.bootstrap]


def create(topics: Topics, name: str, partitions: int = 1, **config: str) -> str:
    admin_of(topics).create_topics([NewTopic(name, partitions, 1, config=config)])[name].result(10)
    return name


def deliver(topics: Topics, topic: str, value: bytes, key: bytes | None = None, **client) -> list:
    """Produce one record; its delivery report (error, message)."""
    reports: list = []
    producer = Producer({"bootstrap.servers": topics.bootstrap, **QUIET, **client})
    producer.produce(
        topic, value=value, key=key, timestamp=BASE_MS, on_delivery=lambda error, msg: reports.append((error, msg))
    )
    producer.flush(15)
    assert len(reports) == 1
    return reports[0]


def probe_consumer(topics: Topics) -> Consumer:
    return Consumer({"bootstrap.servers": topics.bootstrap, "group.id": f"probe-{uuid.uuid4()}", **QUIET})


@pytest.mark.both_brokers
def test_log_append_time_is_stamped_by_kafka_only(topics):
    """A topic with message.timestamp.type=LogAppendTime (the partials topic): Kafka
    stamps each record with its own time and says so; Tansu keeps the producer's time
    and calls it CreateTime. (broker/broker_clock.py measures the processor's clock
    from these stamps; on Tansu it can only use its own.)"""
    name = create(topics, f"stamped-{topics.group}", **{"message.timestamp.type": "LogAppendTime"})
    before = time.time()
    error, message = deliver(topics, name, b"x")
    assert error is None
    kind, millis = message.timestamp()
    [stored] = read_topic(topics.bootstrap, name)
    if topics.broker == "kafka":
        assert kind == TIMESTAMP_LOG_APPEND_TIME and before - 5 < millis / 1000 < time.time() + 5
    else:
        assert (kind, millis) == (TIMESTAMP_CREATE_TIME, BASE_MS)
    assert stored.timestamp() == (kind, millis)


@pytest.mark.both_brokers
def test_create_partitions_is_refused_by_tansu(topics):
    """Adding partitions to a topic (CreatePartitions, KIP-195): Kafka adds them;
    Tansu refuses the request. (Added partitions are tested on Kafka for real,
    tests/test_scale_out.py, and over the in-memory Kafka, tests/test_fault_schedules.py.)"""
    name = create(topics, f"grows-{topics.group}", partitions=2)
    future = admin_of(topics).create_partitions([NewPartitions(name, 3)])[name]
    if topics.broker == "kafka":
        future.result(10)
        metadata = admin_of(topics).list_topics(name, timeout=10).topics[name]
        assert sorted(metadata.partitions) == [0, 1, 2]
    else:
        with pytest.raises(KafkaException) as refused:
            future.result(10)
        assert refused.value.args[0].code() == KafkaError._UNSUPPORTED_FEATURE


@pytest.mark.both_brokers
def test_offsets_by_time_are_answered_by_kafka_only(topics):
    """ListOffsets by timestamp: Kafka gives the first offset whose timestamp is at or
    after the time, and -1 (none: the end) past the last record; Tansu answers 0 for
    every time. (broker/kafka_io.offsets_at_time takes Kafka's answer and finds
    Tansu's by reading; ops/recompute.records_since reads a Tansu partition whole.)"""
    name = create(topics, f"timed-{topics.group}")
    producer = Producer({"bootstrap.servers": topics.bootstrap, **QUIET})
    for index in range(10):
        producer.produce(name, value=b"x", timestamp=BASE_MS + index * 1000)
    assert producer.flush(10) == 0
    consumer = probe_consumer(topics)
    try:
        answers = {
            seconds: consumer.offsets_for_times([TopicPartition(name, 0, BASE_MS + seconds * 1000)], timeout=10)[
                0
            ].offset
            for seconds in (-5, 0, 4, 9, 60)
        }
    finally:
        consumer.close()
    if topics.broker == "kafka":
        assert answers == {-5: 0, 0: 0, 4: 4, 9: 9, 60: -1}
    else:
        assert answers == {-5: 0, 0: 0, 4: 0, 9: 0, 60: 0}


@pytest.mark.both_brokers
def test_the_listed_end_is_the_last_batchs_base_on_tansu(topics):
    """Five records in one batch: Kafka lists the partition's end as 5 (the offset
    after the last record); Tansu lists 1, its last batch's base offset + 1. Read to
    the end (an EOF), both hand over all five. (Whatever needs the end reads to the
    EOF: broker/kafka_io.read_topic_tail, newest_offsets, partition_ends.)"""
    name = create(topics, f"batched-{topics.group}")
    producer = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 500, **QUIET})
    for _ in range(5):
        producer.produce(name, value=b"x", partition=0)
    assert producer.flush(10) == 0
    consumer = probe_consumer(topics)
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(name, 0), timeout=10)
    finally:
        consumer.close()
    assert (low, high) == ((0, 5) if topics.broker == "kafka" else (0, 1))
    assert [m.offset() for m in read_topic(topics.bootstrap, name)] == [0, 1, 2, 3, 4]


@pytest.mark.both_brokers
def test_aborted_transactions_stay_visible_on_tansu(topics):
    """A transaction aborted, then one committed: a read_committed consumer (librdkafka's
    default) sees only the committed record on Kafka, both on Tansu. Each transaction's
    marker takes an offset on both. (ops/dlq_replay writes a replayed record and its
    ledger entry in one transaction: visible together or not at all, on either broker;
    tests/test_recovery.py.)"""
    name = create(topics, f"aborted-{topics.group}")
    producer = Producer({"bootstrap.servers": topics.bootstrap, "transactional.id": f"tx-{topics.group}", **QUIET})
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce(name, value=b"aborted")
    producer.flush(10)
    producer.abort_transaction(15)
    producer.begin_transaction()
    producer.produce(name, value=b"committed")
    producer.commit_transaction(15)
    seen = [(m.offset(), m.value()) for m in read_topic(topics.bootstrap, name)]
    if topics.broker == "kafka":
        assert seen == [(2, b"committed")]
    else:
        assert seen == [(0, b"aborted"), (2, b"committed")]


@pytest.mark.both_brokers
def test_a_groups_members_are_described_by_kafka_only(topics):
    """describe_consumer_groups of a group with one member: both say it is stable;
    Kafka lists the member and its partitions, Tansu lists none. (ops.recompute_cleanup
    refuses a group that is not empty or not stable-less: on Tansu by its state alone.)"""
    name = create(topics, f"described-{topics.group}", partitions=2)
    consumer = Consumer(
        {"bootstrap.servers": topics.bootstrap, "group.id": topics.group, "session.timeout.ms": 6000, **QUIET}
    )
    try:
        consumer.subscribe([name])
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            consumer.poll(0.1)
            assert time.monotonic() < deadline, "no assignment"
        description = admin_of(topics).describe_consumer_groups([topics.group])[topics.group].result(10)
    finally:
        consumer.close()
    assert description.state.name == "STABLE"
    members = [sorted(tp.partition for tp in m.assignment.topic_partitions) for m in description.members]
    assert members == ([[0, 1]] if topics.broker == "kafka" else [])


@pytest.mark.both_brokers
def test_a_first_member_joins_at_once_on_kafka_and_after_half_its_session_on_tansu(topics):
    """The first member of a new group, with a 6 s session: Kafka assigns it at once
    (group.initial.rebalance.delay.ms is 0 on the tests' nodes; Kafka's default, 3 s,
    would make it wait that long); Tansu makes it wait about half its session. So on
    Kafka a first processor can read a whole backlog before the next one joins
    (tests/test_scale_out.py kills the first one as soon as it has any partition)."""
    name = create(topics, f"joined-{topics.group}")
    consumer = Consumer(
        {"bootstrap.servers": topics.bootstrap, "group.id": topics.group, "session.timeout.ms": 6000, **QUIET}
    )
    try:
        started = time.monotonic()
        consumer.subscribe([name])
        while not consumer.assignment():
            consumer.poll(0.05)
            assert time.monotonic() - started < 30, "no assignment"
        waited = time.monotonic() - started
    finally:
        consumer.close()
    print(f"{topics.broker}: first member assigned after {waited:.2f}s")
    if topics.broker == "kafka":
        assert waited < 2.5
    else:
        assert waited > 2.5  # about 3 s: half the session


@pytest.mark.both_brokers
def test_a_keyless_write_to_a_compacted_topic_is_refused_by_kafka_only(topics):
    """Kafka refuses a record without a key on a compacted topic (INVALID_RECORD:
    compaction keeps the latest record per key); Tansu stores it. (Every output record
    is keyed: tests/test_kafka_processor.py checks the output on both brokers.)"""
    name = create(topics, f"compacted-{topics.group}", **{"cleanup.policy": "compact"})
    error, _ = deliver(topics, name, b"no key")
    if topics.broker == "kafka":
        assert error is not None and error.code() == KafkaError.INVALID_RECORD, error
    else:
        assert error is None
    keyed, _ = deliver(topics, name, b"keyed", key=b"k")
    assert keyed is None


@pytest.mark.both_brokers
def test_replication_above_the_broker_count_is_refused_by_kafka_only(topics):
    """A topic with replication factor 3 on one broker: Kafka refuses it
    (INVALID_REPLICATION_FACTOR); Tansu creates it and lists three replicas, all
    itself (it stores data once). (The processor turns Kafka's refusal into a bad
    setting, TOPIC_REPLICATION_FACTOR, exit 2: tests/test_topics.py.)"""
    name = f"replicated-{topics.group}"
    future = admin_of(topics).create_topics([NewTopic(name, 1, 3)])[name]
    if topics.broker == "kafka":
        with pytest.raises(KafkaException) as refused:
            future.result(10)
        assert refused.value.args[0].code() == KafkaError.INVALID_REPLICATION_FACTOR
    else:
        future.result(10)
        [partition] = admin_of(topics).list_topics(name, timeout=10).topics[name].partitions.values()
        assert len(partition.replicas) == 3 and len(set(partition.replicas)) == 1


@pytest.mark.both_brokers
def test_min_insync_replicas_above_the_replicas_is_acknowledged_by_both(topics):
    """min.insync.replicas=2 on a topic of one replica, an acks=all write: both
    acknowledge it (Kafka 4.x caps the minimum at the replication factor; older Kafka
    refused such writes with NOT_ENOUGH_REPLICAS). Not a difference: stated so that
    the docs do not claim one."""
    name = create(topics, f"min-isr-{topics.group}", **{"min.insync.replicas": "2"})
    error, _ = deliver(topics, name, b"x", acks="all", **{"enable.idempotence": True})
    assert error is None


@pytest.mark.both_brokers
def test_topic_configs_are_described_as_given_by_tansu_and_in_full_by_kafka(topics):
    """describe_configs of a topic created with one config: Kafka lists every topic
    config, the given one as DYNAMIC_TOPIC_CONFIG; Tansu lists the given one alone, as
    DEFAULT_CONFIG. (tests/test_topics.py reads "what was set on the topic" either way.)"""
    name = create(topics, f"configured-{topics.group}", **{"retention.ms": "3600000"})
    resource = ConfigResource("topic", name)
    configs = admin_of(topics).describe_configs([resource])[resource].result(10)
    assert configs["retention.ms"].value == "3600000"
    if topics.broker == "kafka":
        assert configs["retention.ms"].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
        assert len(configs) > 20 and configs["cleanup.policy"].source == ConfigSource.DEFAULT_CONFIG.value
    else:
        assert list(configs) == ["retention.ms"]
        assert configs["retention.ms"].source == ConfigSource.DEFAULT_CONFIG.value


# Each broker its own, started here: the session's are not restarted under other tests.
@pytest.mark.parametrize("kind", ["tansu", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_an_idempotent_producer_survives_a_broker_restart_on_kafka_only(kind, tmp_path):
    """An idempotent producer, then its broker restarted (the one broker: no other
    replica takes over). Kafka keeps its producer state on disk: the next write is
    acknowledged. Tansu keeps data and producer ids in memory: restarted empty, it
    does not know the producer, which never gets its acknowledgement. (The processor
    runs with KAFKA_ENABLE_IDEMPOTENCE=false in the test that restarts Tansu under it,
    tests/test_guarantees.py; docs/operations.md says so.)"""
    topic = "restarted"
    if kind == "kafka":
        from broker.apache_kafka import KafkaCluster

        require_kafka()
        broker = KafkaCluster(tmp_path / "kafka").start()

        def restart() -> None:
            broker.nodes[0].kill()  # a crash, not a controlled shutdown
            broker.nodes[0].restart()
    else:
        port = free_port()
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log").start()

        def restart() -> None:
            broker.kill()
            broker.start()

    try:
        topics = Topics(broker.bootstrap_servers, topic, "-", "-", "-", broker=kind)
        create(topics, topic)
        reports: list = []
        producer = Producer(
            {
                "bootstrap.servers": broker.bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "message.timeout.ms": 60_000,
                **QUIET,
            }
        )
        producer.produce(topic, b"before", on_delivery=lambda error, _: reports.append(error))
        assert producer.flush(15) == 0 and reports == [None]
        restart()
        if kind == "tansu":
            create(topics, topic)  # memory storage: the topic is gone with the restart
        producer.produce(topic, b"after", on_delivery=lambda error, _: reports.append(error))
        left = producer.flush(30 if kind == "kafka" else 10)
        if kind == "kafka":
            assert left == 0 and reports == [None, None]
        else:
            assert left == 1 and reports == [None], "acknowledged after all"
    finally:
        broker.stop()
