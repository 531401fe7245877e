"""The input consumer's rebalance callbacks: which partitions this processor owns.

Called by the consumer inside consume(), on the main thread. On assignment the
aggregator learns the partitions and where each is read from; on revocation the
parts published so far are given a moment to be acknowledged, what is safe is
committed, and the open windows are dropped: the next owner (maybe this processor
again) rebuilds them from the commit.

Under the classic protocol's eager assignors each rebalance revokes everything and
assigns the whole new set; under the KIP-848 protocol (`group.protocol=consumer`)
the callbacks get only the change: the partitions taken away, then the ones added
(often none). Both are handled the same way, partition by partition; only setting a
start offset inside the callback differs (`_hand_over`).

Inside a callback the consumer is asked only what confluent-kafka answers without
re-entering it (committed offsets, watermarks, assign): see `partition_count`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from aggregator import Aggregator
from broker.kafka_io import BrokerHealth, offsets_at_time, topic_partition_count
from broker.pipeline_topics import PipelineTopics
from config import Settings
from core.window_value import iso_utc
from ingest.checkpoint import Checkpoint
from ingest.commits import InputCommits
from ingest.part_publisher import PartPublisher

log = logging.getLogger("processor")

# How long a rebalance waits for queued parts and dead-letter copies before it commits.
_REVOKE_FLUSH_SECONDS = 5.0
# How often to ask again for the input's partition count, or for committed offsets,
# after a failed look-up.
_PARTITION_COUNT_RETRY_SECONDS = 2.0
_COMMITTED_RETRY_SECONDS = 2.0


class InputAssignment:
    def __init__(
        self,
        settings: Settings,
        *,
        aggregator: Aggregator,
        parts: PartPublisher,
        commits: InputCommits,
        producer: Producer,
        publish_lock: threading.Lock,
        health: BrokerHealth,
        topics: PipelineTopics,
        checkpoint: Checkpoint,
        monotonic: Callable[[], float] = time.monotonic,
        reads_from_earliest: bool = True,
    ) -> None:
        self._monotonic = monotonic
        self._reads_from_earliest = reads_from_earliest  # auto.offset.reset
        self.settings = settings
        self._aggregator = aggregator
        self._parts = parts
        self._commits = commits
        self._producer = producer
        self._publish_lock = publish_lock
        self._health = health
        self._topics = topics
        self._checkpoint = checkpoint
        self._partition_count_retry_at: float | None = None  # the look-up failed: when to retry
        # Partitions whose committed offset could not be read at assignment, and when to ask again.
        self._committed_unknown: set[int] = set()
        # Partitions assigned while the client still had a cached end offset of them, from
        # an earlier assignment: that end, until a fetch since shows it is current.
        self._ends_from_before: dict[int, int] = {}
        self._committed_retry_at = 0.0

    def partition_count(self) -> int | None:
        """The input topic's partition count (0: no such topic), or None if the broker
        did not answer in time (a struggling broker during a rebalance must not crash
        the processor: parts wait until the count is known).

        Asked through the producer, never the consumer: this runs inside the consumer's
        rebalance callback, where confluent-kafka must not be re-entered on that consumer
        with list_topics() (it clears the consumer's call state, and a second callback
        served by the same poll aborts the process: exit -6, seen under KIP-848, where a
        poll serves an assignment and a revocation together)."""
        try:
            total = topic_partition_count(self._producer, self.settings.input_topic)
        except KafkaException as error:
            log.warning(
                "could not read the partition count of %s (%s); windows wait until it is known",
                self.settings.input_topic,
                error,
            )
            self._partition_count_retry_at = self._monotonic() + _PARTITION_COUNT_RETRY_SECONDS
            return None
        self._partition_count_retry_at = None
        return total

    def retry_partition_count(self) -> None:
        """From the poll loop: ask again after a failed look-up."""
        retry_at = self._partition_count_retry_at
        if retry_at is None or self._monotonic() < retry_at:
            return
        total = self.partition_count()
        if total is not None:
            self._aggregator.assign([], total)
            log.info("partition count of %s is %d", self.settings.input_topic, total)

    def start_unknown(self, partition: int) -> bool:
        """Whether where the consumer reads `partition` from is unknown yet: its committed
        offset could not be read (the client fetches from the commit it reads itself).
        Until then "read to its end" cannot be judged without a record of it."""
        return partition in self._committed_unknown

    def retry_committed(self, consumer: Consumer) -> None:
        """From the poll loop: ask again for committed offsets (or first offsets) that could
        not be read at assignment. Until they are known, an idle partition cannot tell that
        it is read to its end (nothing arrives to say where it is), so its windows would wait."""
        if not self._committed_unknown or self._monotonic() < self._committed_retry_at:
            return
        partitions = [TopicPartition(self.settings.input_topic, p) for p in sorted(self._committed_unknown)]
        committed = self._read_committed(consumer, partitions)
        if committed is None:
            return
        for partition in sorted(self._committed_unknown):
            offset = committed.get(partition)
            if offset is not None:
                self._aggregator.set_start_offset(partition, offset)
        self._committed_unknown.clear()
        log.info("read the committed offsets of partition(s) %s", ",".join(map(str, sorted(committed))) or "none")

    def _read_committed(self, consumer: Consumer, partitions: list[TopicPartition]) -> dict[int, int] | None:
        """{partition: committed offset} (absent: none committed); None if the broker did not answer."""
        try:
            answer = consumer.committed(partitions, timeout=10)
        except KafkaException as error:
            log.warning("could not read committed offsets (%s); asking again in %.0fs", error, _COMMITTED_RETRY_SECONDS)
            self._committed_unknown.update(tp.partition for tp in partitions)
            self._committed_retry_at = self._monotonic() + _COMMITTED_RETRY_SECONDS
            return None
        return {tp.partition: tp.offset for tp in answer if tp.offset >= 0}

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """`partitions`: the whole assignment (eager), or the ones added to it (KIP-848)."""
        total = self.partition_count()
        added = sorted(tp.partition for tp in partitions)
        self._note_ends_from_before(consumer, added)
        committed = self._read_committed(consumer, partitions) if partitions else {}
        committed = {**self._recompute_starts(consumer, partitions, committed or {}), **(committed or {})}
        committed = {**self._latest_starts(consumer, partitions, committed, total or 0), **committed}
        self._aggregator.assign(added, total or 0, committed)
        self._health.mark_reachable()
        owned = sorted(self._aggregator.partition_summary())
        if total is None:
            pass  # said above; retried from the poll loop
        elif total == 0:
            log.warning("input topic %s does not exist (broker lost it?)", self.settings.input_topic)
            self._topics.note_missing(now_too=True)
        elif self.settings.incremental_assignment and not added:
            pass  # KIP-848: a rebalance that gave this member nothing new; its revoke said what it lost
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

    def _note_ends_from_before(self, consumer: Consumer, partitions: list[int]) -> None:
        """librdkafka keeps a partition's cached end offset when the partition is taken
        away, and answers it unchanged when the partition comes back, until its first
        fetch is answered. Meanwhile another member may have read on and committed past
        it: taken for the end, that old offset would mark the partition read to its end
        before a record of it was read, and the timer would close its open windows
        without them (seen under KIP-848, where partitions move back and forth)."""
        for partition in partitions:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(self.settings.input_topic, partition), cached=True
            )
            if high >= 0:
                self._ends_from_before[partition] = high
            else:
                self._ends_from_before.pop(partition, None)

    def end_from_before(self, partition: int, cached_end: int, fetched: bool) -> bool:
        """Whether `cached_end` may still be the end cached at an earlier assignment of
        `partition` (see `_note_ends_from_before`). It is current once it moved, or once
        a record of this assignment was handed over (`fetched`: a fetch answered)."""
        before = self._ends_from_before.get(partition)
        if before is None:
            return False
        if fetched or cached_end != before:
            del self._ends_from_before[partition]
            return False
        return True

    def end_confirmed(self, partition: int) -> None:
        """The broker says nothing was written since the client cached the end."""
        self._ends_from_before.pop(partition, None)

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
        self._hand_over(consumer, partitions)  # the offsets above, instead of auto.offset.reset
        log.info(
            "recomputing: partition(s) %s start at offset(s) %s, the first records at or after %s",
            ",".join(map(str, sorted(starts))),
            ",".join(str(starts[p]) for p in sorted(starts)),
            iso_utc(since),
        )
        return starts

    def _latest_starts(
        self, consumer: Consumer, partitions: list[TopicPartition], committed: dict[int, int], total: int
    ) -> dict[int, int]:
        """`auto.offset.reset=latest`, applied here, not by the client: the consumer itself
        always resets to the earliest offset (consumer_settings), because the client's
        `latest` also applied to a partition added to the input after the group started
        (no commit of its own: what was written before the group noticed it was dropped
        unseen) and to a partition whose commit could not be read at assignment. So: a
        partition without a commit in a group that has none anywhere (a new group) starts
        at its end, as asked; one in a group that has committed others was added since,
        and is read from its beginning (the client's reset); one whose commit is unknown
        is read from that commit by the client, or from the beginning: never from the end.
        Returns the starts it assigned."""
        s = self.settings
        fresh = [
            tp for tp in partitions if tp.partition not in committed and tp.partition not in self._committed_unknown
        ]
        if self._reads_from_earliest or s.recompute_from or not fresh:
            return {}
        if committed or self._committed_unknown:
            group_started = True
        else:
            others = [TopicPartition(s.input_topic, p) for p in range(total) if p not in {tp.partition for tp in fresh}]
            known = self._read_committed(consumer, others) if others else {}
            group_started = known != {}  # None (unknown) counts as started: never drop unseen
        if group_started:
            log.info(
                "partition(s) %s of %s have no commit of group %s (added since it started): read from their beginning",
                ",".join(str(tp.partition) for tp in fresh),
                s.input_topic,
                s.consumer_group_id,
            )
            return {}
        starts = {}
        for tp in fresh:
            try:
                starts[tp.partition] = tp.offset = consumer.get_watermark_offsets(tp, timeout=10)[1]
            except KafkaException as error:
                log.warning(
                    "could not read the end of partition %d (%s); reading it from its beginning", tp.partition, error
                )
        if starts:
            self._hand_over(consumer, partitions)  # the offsets above, instead of the client's reset
        return starts

    def _hand_over(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take `partitions` (the callback's) from the offsets set on them. A KIP-848
        member may only add to its assignment (`incremental_assign`, the partitions it was
        just given): librdkafka refuses `assign()` there (_STATE, "Erroneous state")."""
        if self.settings.incremental_assignment:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Only the revoked partitions are forgotten (under a cooperative assignor the
        others stay), after what is safe is committed."""
        revoked = sorted({tp.partition for tp in partitions})
        # Wait for an in-flight publish; after a bug, no commit at all.
        with self._publish_lock:
            self._commits.slot.clear()
            self._checkpoint.commit(_REVOKE_FLUSH_SECONDS, now=True)  # none after a crash
            self._forget(revoked)
        log.info(
            "partition(s) %s revoked; their open windows dropped, to be rebuilt from committed offsets",
            ",".join(map(str, revoked)) or "none",
        )

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = sorted({tp.partition for tp in partitions})
        with self._publish_lock:
            self._commits.slot.clear()
            self._forget(lost)
        log.warning("partitions lost (session timed out); open windows dropped, to be rebuilt")

    def _forget(self, partitions: list[int]) -> None:
        self._aggregator.revoke(partitions)
        self._parts.drop(partitions)
        self._committed_unknown.difference_update(partitions)
        for partition in partitions:
            self._ends_from_before.pop(partition, None)
        self._commits.slot.clear()
