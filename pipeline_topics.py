"""The pipeline's topics: created when missing (again if a broker lost them), and
what the output topic says was published already.

Kept apart from the poll loop: start-up and recovery chores, not record handling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException

from config import Settings
from kafka_io import BrokerHealth, ensure_topics, read_topic_tail, sleep_unless_stopped
from processor_report import epoch_of

log = logging.getLogger("processor")

OUTPUT_MESSAGE_MAX_BYTES = 16 * 1024 * 1024
# How many of the last output records to read to learn which windows are published.
# Windows are published in order, so the newest is near the end; a few extra cover a
# broker that reports the last batch's base offset as the end.
_TAIL_RECORDS = 50
# How long the input topic must be missing before the topics are created again.
_MISSING_GRACE_SECONDS = 5.0
# How often start-up asks again for the newest published window.
_RETRY_SECONDS = 2.0


class PipelineTopics:
    def __init__(self, settings: Settings, health: BrokerHealth, should_stop: Callable[[], bool]) -> None:
        self.settings = settings
        self._health = health
        self._should_stop = should_stop
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

    def published_until(self) -> int:
        """End (epoch seconds) of the newest window on the output topic, 0 if none; with
        RECOMPUTE_FROM never before that time's window start: a recomputation counts
        the windows before it as published (docs/operations.md, "Recovery")."""
        s = self.settings
        newest = s.recompute_from - s.recompute_from % s.window_seconds if s.recompute_from else 0
        for message in read_topic_tail(self.settings, self.settings.output_topic, _TAIL_RECORDS):
            try:
                start = epoch_of(message.key().decode())
            except (AttributeError, UnicodeDecodeError, ValueError):
                continue  # not one of ours
            newest = max(newest, start + self.settings.window_seconds)
        return newest

    def published_until_retrying(self) -> int | None:
        """`published_until`, asked again every 2 s while the broker cannot answer (at
        start-up, a broker still starting); None if asked to stop first."""
        while not self._should_stop():
            try:
                return self.published_until()
            except KafkaException as error:
                self._health.on_error(KafkaError(KafkaError._TRANSPORT, str(error)))
            sleep_unless_stopped(_RETRY_SECONDS, self._should_stop)
        return None

    def published_until_or_unknown(self) -> int:
        """For a new merger: 0 (nothing known: windows are published again, same bytes)
        when the output topic cannot be read now."""
        try:
            return self.published_until()
        except KafkaException as error:
            log.warning("could not read the newest window on %s (%s)", self.settings.output_topic, error)
            return 0
