"""The input consumer's rebalance callbacks: which partitions this processor owns.

Called by the consumer inside consume(), on the main thread. On assignment the
aggregator learns the partitions and where each is read from; on revocation the
parts published so far are given a moment to be acknowledged, what is safe is
committed, and the open windows are dropped: the next owner (maybe this processor
again) rebuilds them from the commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from aggregator import Aggregator, iso_utc
from commits import InputCommits
from config import Settings
from kafka_io import BrokerHealth, offsets_at_time, topic_partition_count
from part_publisher import PartPublisher
from pipeline_topics import PipelineTopics

log = logging.getLogger("processor")

# How long a rebalance waits for queued parts and dead-letter copies before it commits.
_REVOKE_FLUSH_SECONDS = 5.0
# How often to ask again for the input's partition count after a failed look-up.
_PARTITION_COUNT_RETRY_SECONDS = 2.0


class InputAssignment:
    def __init__(
        self,
        settings: Settings,
        aggregator: Aggregator,
        parts: PartPublisher,
        commits: InputCommits,
        producer: Producer,
        publish_lock: threading.Lock,
        crashed: threading.Event,
        health: BrokerHealth,
        topics: PipelineTopics,
        safe_offsets: Callable[[], dict[int, int]],
    ) -> None:
        self.settings = settings
        self._aggregator = aggregator
        self._parts = parts
        self._commits = commits
        self._producer = producer
        self._publish_lock = publish_lock
        self._crashed = crashed
        self._health = health
        self._topics = topics
        self._safe_offsets = safe_offsets
        self._partition_count_retry_at: float | None = None  # the look-up failed: when to retry

    def partition_count(self, consumer: Consumer) -> int | None:
        """The input topic's partition count (0: no such topic), or None if the broker
        did not answer in time (a struggling broker during a rebalance must not crash
        the processor: parts wait until the count is known)."""
        try:
            total = topic_partition_count(consumer, self.settings.input_topic)
        except KafkaException as error:
            log.warning(
                "could not read the partition count of %s (%s); windows wait until it is known",
                self.settings.input_topic,
                error,
            )
            self._partition_count_retry_at = time.monotonic() + _PARTITION_COUNT_RETRY_SECONDS
            return None
        self._partition_count_retry_at = None
        return total

    def retry_partition_count(self, consumer: Consumer) -> None:
        """From the poll loop: ask again after a failed look-up."""
        retry_at = self._partition_count_retry_at
        if retry_at is None or time.monotonic() < retry_at:
            return
        total = self.partition_count(consumer)
        if total is not None:
            self._aggregator.assign([], total)
            log.info("partition count of %s is %d", self.settings.input_topic, total)

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        total = self.partition_count(consumer)
        owned = sorted(tp.partition for tp in partitions)
        try:
            committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10) if tp.offset >= 0}
        except KafkaException as error:
            log.warning("could not read committed offsets (%s); partitions wait for their first fetch", error)
            committed = {}
        committed = {**self._recompute_starts(consumer, partitions, committed), **committed}
        self._aggregator.assign(owned, total or 0, committed)
        self._health.mark_reachable()
        if total is None:
            pass  # said above; retried from the poll loop
        elif total == 0:
            log.warning("input topic %s does not exist (broker lost it?)", self.settings.input_topic)
            self._topics.note_missing(now_too=True)
        elif len(owned) < total:
            log.info(
                "assigned partitions %s (%d of %d partitions) of %s; the other processors of group %s own the rest",
                ",".join(map(str, owned)) or "none",
                len(owned),
                total,
                self.settings.input_topic,
                self.settings.consumer_group_id,
            )
        else:
            log.info("assigned all %d partitions of %s", total, self.settings.input_topic)

    def _recompute_starts(
        self, consumer: Consumer, partitions: list[TopicPartition], committed: dict[int, int]
    ) -> dict[int, int]:
        """With RECOMPUTE_FROM: start each partition this group never committed at the
        first record of that time less the margin (docs/operations.md, "Recovery").
        Partitions with a commit resume from it, so a restarted recomputation goes on."""
        s = self.settings
        fresh = [tp.partition for tp in partitions if tp.partition not in committed]
        if not s.recompute_from or not fresh:
            return {}
        since = s.recompute_from - s.recompute_from % s.window_seconds - s.recompute_margin_seconds
        starts = offsets_at_time(s, s.input_topic, fresh, since * 1000)
        for tp in partitions:
            if tp.partition in starts:
                tp.offset = starts[tp.partition]
        consumer.assign(partitions)  # the offsets above, instead of auto.offset.reset
        log.info(
            "recomputing: partition(s) %s start at offset(s) %s, the first records at or after %s",
            ",".join(map(str, sorted(starts))),
            ",".join(str(starts[p]) for p in sorted(starts)),
            iso_utc(since),
        )
        return starts

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Wait for an in-flight publish; after a bug, no commit at all.
        with self._publish_lock:
            self._commits.slot.clear()
            if not self._crashed.is_set():
                self._producer.flush(_REVOKE_FLUSH_SECONDS)
                self._aggregator.acknowledge(self._parts.take_acknowledged())
                offsets = self._safe_offsets()
                if offsets:
                    self._commits.commit(offsets)
            self._aggregator.revoke_all()
            self._parts.clear()
            self._commits.slot.clear()
        log.info("partitions revoked; open windows dropped, to be rebuilt from committed offsets")

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._publish_lock:
            self._commits.slot.clear()
            self._aggregator.revoke_all()
            self._parts.clear()
        log.warning("partitions lost (session timed out); open windows dropped, to be rebuilt")
