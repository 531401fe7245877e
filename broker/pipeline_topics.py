"""The pipeline's topics: created when missing (again if a broker lost them), and
what the output topic says was published already.

Kept apart from the poll loop: start-up and recovery chores, not record handling.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from broker import authorization
from broker.authorization import OUTPUT_FOLLOWER_GROUP_PREFIX, is_authorization_error
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
from config import ConfigError, Settings
from core.window_value import epoch_of, iso_utc

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
_TIMESTAMP_TYPE = "message.timestamp.type"


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
        self.clients = clients
        self._missing_since: float | None = None

    def ensure(self) -> bool:
        """Create the topics that do not exist; False if asked to stop first. Raises
        NotAuthorized when the cluster's ACLs lack what the processor needs on them
        (broker/authorization.py)."""
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
            # merge stall lasts. The merger commits past what it no longer needs. Stamped
            # with the broker's time: every acknowledgement tells a processor how far its
            # own clock is off (broker/broker_clock.py).
            s.partials_topic: {
                "cleanup.policy": "delete",
                "retention.ms": str(s.partials_retention_hours * 3_600_000),
                "message.timestamp.type": "LogAppendTime",
            },
        }
        needs = authorization.processor(s)
        if not ensure_topics(s, topics, self._should_stop, self._health, configs=configs, permissions=needs):
            return False
        self._stamp_partials_with_broker_time()
        return True

    def _stamp_partials_with_broker_time(self) -> None:
        """A partials topic made before (an older release, or by hand) may be CreateTime:
        then no acknowledgement tells the broker's time, and each member's own clock stands
        in for it (broker/broker_clock.py). It is the pipeline's internal topic: set it to
        LogAppendTime (this needs AlterConfigs on it); if the cluster refuses, say so once."""
        topic = self.settings.partials_topic
        admin = self.clients.admin({**QUIET_CLIENT_LOGS, **self.settings.admin_config()})
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            current = admin.describe_configs([resource])[resource].result(10).get(_TIMESTAMP_TYPE)
            if current is None or current.value == "LogAppendTime":
                return
            change = ConfigEntry(_TIMESTAMP_TYPE, "LogAppendTime", incremental_operation=AlterConfigOpType.SET)
            resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[change])
            admin.incremental_alter_configs([resource])[resource].result(10)
            log.info("topic %s now stamped with the broker's time (%s=LogAppendTime)", topic, _TIMESTAMP_TYPE)
        except KafkaException as error:
            kafka_error = error.args[0] if error.args and isinstance(error.args[0], KafkaError) else None
            # Refused: the processor needs no AlterConfigs but for this; say which ACL it lacks.
            why = f"not authorized: AlterConfigs on topic {topic}" if is_authorization_error(kafka_error) else None
            log.warning(
                "could not set %s=LogAppendTime on topic %s (%s): the members' own clocks stand in for the"
                " broker's, so they must agree",
                _TIMESTAMP_TYPE,
                topic,
                why or (kafka_error.str() if kafka_error else error),
            )

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
        return newest_published(self.settings, self.clients)

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
    # The window-shaping settings it was made with (None: not said, an older release's record).
    shaping: Mapping[str, int] | None = None
    # Per input partition, the offset below which the records of windows up to `until`
    # are counted in them (None or absent: not said; every record of them is).
    accounted: Mapping[int, int] | None = None
    # With RECOMPUTE_FROM: `until` is that time, not a window on the output (the windows
    # before it count as published, but the output may hold none of them).
    recomputing: bool = False


# Headers on every output record: whose window it is (a pipeline is its input topic and
# group), how many input partitions it was merged from, under which window-shaping
# settings, and up to which offset of each input partition its parts counted. Not in
# the value, which is a pure function of the window's records.
PIPELINE_INPUT_HEADER = "pipeline.input"
PIPELINE_GROUP_HEADER = "pipeline.group"
PIPELINE_PARTITIONS_HEADER = "pipeline.partitions"
PIPELINE_SETTINGS_HEADER = "pipeline.settings"  # "NAME=value,..." (config.WINDOW_SHAPING_SETTINGS)
PIPELINE_ACCOUNTED_HEADER = "pipeline.accounted"  # "partition:offset,..."


def output_headers(
    settings: Settings, partition_count: int, accounted: Mapping[int, int] | None = None
) -> list[tuple[str, bytes]]:
    shaping = ",".join(f"{name}={value}" for name, value in sorted(settings.window_shaping().items()))
    headers = [
        (PIPELINE_INPUT_HEADER, settings.input_topic.encode()),
        (PIPELINE_GROUP_HEADER, settings.consumer_group_id.encode()),
        (PIPELINE_PARTITIONS_HEADER, str(partition_count).encode()),
        (PIPELINE_SETTINGS_HEADER, shaping.encode()),
    ]
    if accounted:
        text = ",".join(f"{partition}:{offset}" for partition, offset in sorted(accounted.items()))
        headers.append((PIPELINE_ACCOUNTED_HEADER, text.encode()))
    return headers


class _WindowBounds(msgspec.Struct):
    window_start: str
    window_end: str


_decode_bounds = msgspec.json.Decoder(_WindowBounds).decode


def _window_length(value: bytes | None) -> int | None:
    """A window value's length in seconds (its own `window_end` - `window_start`)."""
    try:
        bounds = _decode_bounds(value or b"")
        return epoch_of(bounds.window_end) - epoch_of(bounds.window_start)
    except (msgspec.DecodeError, ValueError):
        return None


def _header_pairs(raw: bytes | None, separator: str) -> dict[str, str] | None:
    if raw is None:
        return None
    try:
        return dict(item.split(separator, 1) for item in raw.decode().split(",") if item)
    except (UnicodeDecodeError, ValueError):
        return None


def published_by(message: Message, settings: Settings) -> Published | None:
    """What one output record says this pipeline published (None: not this pipeline's,
    or not a window). A record without the pipeline headers is an older release's:
    taken as this pipeline's, which is what it was before pipelines were named.

    The window's end is its start plus its *own* length (from its settings header, or
    its value), never this reader's WINDOW_SECONDS: a member started with another
    window length would otherwise take unpublished windows for published ones, skip
    their records and commit past them."""
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
    shaping = accounted = None
    pairs = _header_pairs(headers.get(PIPELINE_SETTINGS_HEADER), "=")
    if pairs is not None:
        try:
            shaping = {name: int(value) for name, value in pairs.items()}
        except ValueError:
            shaping = None
    pairs = _header_pairs(headers.get(PIPELINE_ACCOUNTED_HEADER), ":")
    if pairs is not None:
        try:
            accounted = {int(partition): int(offset) for partition, offset in pairs.items()}
        except ValueError:
            accounted = None
    width = (shaping or {}).get("WINDOW_SECONDS") or _window_length(message.value()) or settings.window_seconds
    return Published(start + width, count, shaping, accounted)


def newest(a: Published, b: Published | None) -> Published:
    return a if b is None or b.until <= a.until else b


def differing_settings(group: Mapping[str, int] | None, settings: Settings) -> list[tuple[str, int, int]]:
    """(name, this processor's value, the group's) of each window-shaping setting this
    processor does not share with what the group uses (`group`: None, unknown)."""
    if not group:
        return []
    ours = settings.window_shaping()
    return [(name, ours[name], group[name]) for name in sorted(ours) if name in group and group[name] != ours[name]]


def describe_differences(differences: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{name}={ours} (the group's: {theirs})" for name, ours, theirs in differences)


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
    if floor and found.until and found.until < floor and not differing_settings(found.shaping, settings):
        # A recomputation is a new group: under a group that has published up to an
        # earlier time, the windows between would be taken as published and their
        # records skipped and committed past.
        raise ConfigError(
            "RECOMPUTE_FROM",
            f"group {settings.consumer_group_id} has published windows up to {iso_utc(found.until)} only;"
            f" recomputing from {iso_utc(floor)} under it would skip the windows between: give the"
            " recomputation a CONSUMER_GROUP_ID of its own",
        )
    if floor > found.until:
        return Published(floor, found.partition_count, found.shaping, recomputing=True)
    return found


class PublishedFollower:
    """Follows the output topic from its end, so that the processor learns which of its
    windows are published (acknowledged parts hold their input offsets until then). Its
    own consumer, outside any group; polled without waiting by the timer thread."""

    def __init__(self, settings: Settings, clients: KafkaClients, start: Published) -> None:
        self.settings = settings
        self._clients = clients
        self._consumer: Consumer | None = None
        self.published = start
        # The first window of this pipeline seen made under other settings than these.
        self.disagreement: Published | None = None

    def poll(self) -> Published:
        """What is published now, as far as read (never less than before). A window of
        this pipeline made under other window-shaping settings is not taken: it is kept
        in `disagreement`, for the processor to stop acting on its own."""
        try:
            if self._consumer is None:
                self._consumer = self._start()
            for message in self._consumer.consume(1000, 0):
                if message.error() is not None:
                    continue
                found = published_by(message, self.settings)
                if found is not None and differing_settings(found.shaping, self.settings):
                    self.disagreement = self.disagreement or found
                    continue
                self.published = newest(self.published, found)
        except KafkaException as error:
            log.debug("output follower: %s", error)
        return self.published

    def _start(self) -> Consumer:
        consumer = self._clients.consumer(
            {
                **QUIET_CLIENT_LOGS,
                **self.settings.consumer_config(),
                # Outside every group: this reader assigns the partitions itself and never commits.
                "group.id": f"{OUTPUT_FOLLOWER_GROUP_PREFIX}{uuid.uuid4()}",
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
