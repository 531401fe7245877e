"""The topics the processor creates for a real cluster: replication, min.insync.replicas,
retention. Against the embedded broker, which takes every setting and reports each
config it was given (Tansu reports topic configs only when given at creation); it has
one broker, so it cannot really replicate: the test prints what it did."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from broker.kafka_io import BrokerHealth
from broker.pipeline_topics import OUTPUT_MESSAGE_MAX_BYTES, PipelineTopics
from config import build_settings

pytestmark = pytest.mark.broker

DAY_MS = 86_400_000


def created(topics, **env: str):
    """Let the processor's start-up create the four topics; return their configs and replica lists."""
    settings = build_settings(topics.env(**env))
    assert PipelineTopics(
        settings, BrokerHealth(settings.bootstrap_servers, logging.getLogger("test")), lambda: False
    ).ensure()
    admin = AdminClient({"bootstrap.servers": topics.bootstrap})
    names = [topics.input, topics.output, topics.dlq, topics.partials]
    futures = admin.describe_configs([ConfigResource("topic", name) for name in names])
    configs = {
        resource.name: {k: v.value for k, v in future.result(10).items()} for resource, future in futures.items()
    }
    metadata = admin.list_topics(timeout=10).topics
    replicas = {name: [len(p.replicas) for p in metadata[name].partitions.values()] for name in names}
    return configs, replicas


def test_defaults_the_brokers_replication_and_retention_for_the_dlq_and_partials(topics):
    configs, replicas = created(topics)
    print("configs:", configs, "replicas per partition:", replicas)
    assert configs[topics.dlq] == {"cleanup.policy": "delete", "retention.ms": str(14 * DAY_MS)}
    assert configs[topics.partials] == {
        "cleanup.policy": "delete",
        "retention.ms": str(DAY_MS),
        "message.timestamp.type": "LogAppendTime",  # acknowledgements tell the broker's time
    }
    assert configs[topics.output] == {"cleanup.policy": "compact", "max.message.bytes": str(OUTPUT_MESSAGE_MAX_BYTES)}
    assert configs[topics.input] == {}  # min.insync.replicas left to the broker: not sent
    # Replication factor -1 asks for the broker's default.replication.factor: the
    # embedded broker, one node, makes one replica of each partition.
    assert replicas[topics.input] == [1, 1, 1, 1]
    assert all(counts == [1] for name, counts in replicas.items() if name != topics.input)


def test_replication_min_insync_and_retention_settings_reach_the_broker(topics):
    configs, replicas = created(
        topics,
        TOPIC_REPLICATION_FACTOR="3",
        TOPIC_MIN_INSYNC_REPLICAS="2",
        DLQ_RETENTION_DAYS="7",
        PARTIALS_RETENTION_HOURS="6",
    )
    print("configs:", configs, "replicas per partition:", replicas)
    for name in (topics.input, topics.output, topics.dlq, topics.partials):
        assert configs[name]["min.insync.replicas"] == "2", name
    assert configs[topics.dlq]["retention.ms"] == str(7 * DAY_MS)
    assert configs[topics.partials]["retention.ms"] == str(6 * 3_600_000)
    # What the embedded broker did with replication factor 3 on its one node: it lists
    # three replicas per partition, all of them itself (Tansu stores data once, in its
    # storage engine; it neither refuses the factor nor replicates).
    assert all(counts == [3] * len(counts) for counts in replicas.values())
    # ...and with min.insync.replicas=2 it still acknowledges an acks=all write (Apache
    # Kafka would refuse it with NOT_ENOUGH_REPLICAS while fewer than two replicas are in sync).
    producer = Producer({"bootstrap.servers": topics.bootstrap, "acks": "all", "enable.idempotence": True})
    reports = []
    producer.produce(topics.dlq, b"x", on_delivery=lambda error, _message: reports.append(error))
    assert producer.flush(10) == 0
    assert reports == [None]


def test_a_partials_topic_made_before_as_create_time_is_stamped_with_the_brokers_time(topics):
    """An older release made the partials topic CreateTime: no acknowledgement would tell
    the broker's time. Start-up sets it to LogAppendTime."""
    admin = AdminClient({"bootstrap.servers": topics.bootstrap})
    made = NewTopic(topics.partials, 1, 1, config={"message.timestamp.type": "CreateTime"})
    admin.create_topics([made])[topics.partials].result(10)
    configs, _ = created(topics)
    assert configs[topics.partials]["message.timestamp.type"] == "LogAppendTime"
