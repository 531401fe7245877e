"""The pipeline's topics: created when missing (again if a broker lost them), and
what the output topic says was published already.

Kept apart from the poll loop: start-up and recovery chores, not record handling.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Message, TopicPartition

from broker.kafka_io import (
    QUIET_CLIENT_LOGS,
    REAL_CLIENTS,
    BrokerHealth,
    KafkaClients,
    ensure_topics,
    read_topic_tail,
    sleep_unless_stopped,
    topic_partition_count,
)
from config import Settings
from ops.report import epoch_of

log = logging.getLogger("processor")

OUTPUT_MESSAGE_MAX_BYTES = 16 * 1024 * 1024
# How many of the last output records to read to learn which windows are published.
# Windows are published in order, so the newest is near the end; a few extra cover a
# broker that reports the last batch's base offset as the end. (More is read when none
# of them is this pipeline's: newest_published.)
_TAIL_RECORDS = 50
# How long the input topic must be missing before the topics are created again.
_MISSING_GRACE_SECONDS = 5.0
# How often start-up asks again for the newest published window.
_RETRY_SECONDS = 2.0


class PipelineTopics:
    def __init__(
        self,
        settings: Settings,
        health: BrokerHealth,
        should_stop: Callable[[], bool],
        clients: KafkaClients = REAL_CLIENTS,
    ) -> None:
        self.settings = settings
        self._health = health
        self._should_stop = should_stop
        self._clients = clients
        self._missing_since: float | None = None

    def ensure(self) -> bool:
        """Create the topics that do not exist; False if asked to stop first."""
        s = self.settings
        # The partials topic has one partition: its one consumer in the merge group is the merger.
        topics = {s.input_topic: s.input_partitions, s.output_topic: 1, s.dlq_topic: 1, s.partials_topic: 1}
        # The output is compacted: a consumer that keeps the latest record per key
        # (what the topic is for) never needs older copies of a republished window.
        configs = {
            s.output_topic: {"cleanup.policy": "compact", "max.message.bytes": str(OUTPUT_MESSAGE_MAX_BYTES)},
            # Kept for someone to look at and replay (docs/operations.md, "Recovery").
            s.dlq_topic: {"cleanup.policy": "delete", "retention.ms": str(s.dlq_retention_days * 86_400_000)},
            # Parts are needed until their window is published: minutes, or as long as a
            # merge stall lasts. The merger commits past what it no longer needs.
            s.partials_topic: {"cleanup.policy": "delete", "retention.ms": str(s.partials_retention_hours * 3_600_000)},
        }
        return ensure_topics(s, topics, self._should_stop, self._health, configs=configs)

    def note_missing(self, now_too: bool = False) -> None:
        """The input topic was reported missing (`now_too`: do not wait the grace period)."""
        if self._missing_since is None or now_too:
            self._missing_since = time.monotonic() - (_MISSING_GRACE_SECONDS if now_too else 0.0)

    def recreate_if_missing(self) -> None:
        """A broker that lost its topics (an in-memory one, restarted) gets them back,
        so producers and this processor can carry on without an operator."""
        since = self._missing_since
        if since is None or time.monotonic() - since < _MISSING_GRACE_SECONDS:
            return
        log.warning("input topic %s is missing; creating the pipeline's topics again", self.settings.input_topic)
        self._missing_since = None
        self.ensure()

    def newest_published(self) -> Published:
        """What this pipeline has on the output topic now. Raises KafkaException when
        the topic cannot be read: unknown stays unknown (a caller that guessed "nothing"
        would publish a window again from only its later parts)."""
        return newest_published(self.settings, self._clients)

    def newest_published_retrying(self) -> Published | None:
        """`newest_published`, asked again every 2 s while the broker cannot answer (at
        start-up, a broker still starting); None if asked to stop first."""
        while not self._should_stop():
            try:
                return self.newest_published()
            except KafkaException as error:
                self._health.on_error(KafkaError(KafkaError._TRANSPORT, str(error)))
            sleep_unless_stopped(_RETRY_SECONDS, self._should_stop)
        return None


@dataclass(frozen=True)
class Published:
    """What the output topic says a pipeline has published."""

    until: int = 0  # end (epoch s) of its newest window there; 0: none
    partition_count: int | None = None  # the input partitions it was merged with (None: not said)


# Headers on every output record: whose window it is (a pipeline is its input topic and
# group), and how many input partitions it was merged from. Not in the value, which is
# a pure function of the window's records.
PIPELINE_INPUT_HEADER = "pipeline.input"
PIPELINE_GROUP_HEADER = "pipeline.group"
PIPELINE_PARTITIONS_HEADER = "pipeline.partitions"


def output_headers(settings: Settings, partition_count: int) -> list[tuple[str, bytes]]:
    return [
        (PIPELINE_INPUT_HEADER, settings.input_topic.encode()),
        (PIPELINE_GROUP_HEADER, settings.consumer_group_id.encode()),
        (PIPELINE_PARTITIONS_HEADER, str(partition_count).encode()),
    ]


def published_by(message: Message, settings: Settings) -> Published | None:
    """What one output record says this pipeline published (None: not this pipeline's,
    or not a window). A record without the pipeline headers is an older release's:
    taken as this pipeline's, which is what it was before pipelines were named."""
    try:
        start = epoch_of(message.key().decode())
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None
    headers = dict(message.headers() or [])
    group = headers.get(PIPELINE_GROUP_HEADER)
    if group is not None and (
        group != settings.consumer_group_id.encode()
        or headers.get(PIPELINE_INPUT_HEADER) != settings.input_topic.encode()
    ):
        return None
    try:
        count = int(headers[PIPELINE_PARTITIONS_HEADER])
    except (KeyError, ValueError):
        count = None
    return Published(start + settings.window_seconds, count)


def newest(a: Published, b: Published | None) -> Published:
    return a if b is None or b.until <= a.until else b


def newest_published(settings: Settings, clients: KafkaClients) -> Published:
    """The newest window of this pipeline on the output topic. Windows are published in
    order, so it is near the end; when other pipelines share the topic, further back:
    read more of the tail until one of ours, or the whole topic, has been read."""
    # With RECOMPUTE_FROM, the windows before that time count as published (a
    # recomputation: docs/operations.md, "Recovery").
    start = settings.recompute_from
    floor = start - start % settings.window_seconds if start else 0
    for records in (_TAIL_RECORDS, 20 * _TAIL_RECORDS, None):
        found = Published()
        messages = read_topic_tail(settings, settings.output_topic, records, clients=clients)
        for message in messages:
            found = newest(found, published_by(message, settings))
        if found.until or records is None or len(messages) < records:
            break
    return Published(max(found.until, floor), found.partition_count)


class PublishedFollower:
    """Follows the output topic from its end, so that the processor learns which of its
    windows are published (acknowledged parts hold their input offsets until then). Its
    own consumer, outside any group; polled without waiting by the timer thread."""

    def __init__(self, settings: Settings, clients: KafkaClients, start: Published) -> None:
        self.settings = settings
        self._clients = clients
        self._consumer: Consumer | None = None
        self.published = start
        self.newest_timestamp: float | None = None  # Kafka time (epoch s) of this pipeline's newest record read

    def poll(self) -> Published:
        """What is published now, as far as read (never less than before)."""
        try:
            if self._consumer is None:
                self._consumer = self._start()
            for message in self._consumer.consume(1000, 0):
                if message.error() is None:
                    found = published_by(message, self.settings)
                    self.published = newest(self.published, found)
                    if found is not None:  # for the metrics: when the group last published
                        self.newest_timestamp = max(self.newest_timestamp or 0.0, message.timestamp()[1] / 1000)
        except KafkaException as error:
            log.debug("output follower: %s", error)
        return self.published

    def _start(self) -> Consumer:
        consumer = self._clients.consumer(
            {
                **QUIET_CLIENT_LOGS,
                **self.settings.consumer_config(),
                # Outside every group: this reader assigns the partitions itself and never commits.
                "group.id": f"output-follower-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        # From the end: what was published before is `start`. (A broker that lists its end
        # early, as Tansu does, only makes it read a few records twice.)
        count = topic_partition_count(consumer, self.settings.output_topic)
        consumer.assign([TopicPartition(self.settings.output_topic, p, OFFSET_END) for p in range(count)])
        return consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
