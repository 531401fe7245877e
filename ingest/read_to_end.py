"""Which input partitions are read to their end, and as of which time: the clock part
of every partition's watermark (aggregator.py).

Each poll-loop turn, after its batch: "now" first (the broker's time as this
machine measures it, broker/broker_clock.py), then the consumer's positions and the
high watermarks the client cached from its last fetch (local look-ups, one per
partition), then whether the turn was paused anywhere up to these reads
(ingest/poll_turns.py). A partition whose position is at its cached end is marked
caught up *at that time*, only if the ends can be believed: the broker's time is
known and no pause made the cached ends older than the time read. Records fetched
and not yet handed over make it active again.

Runs on the main thread (the only one that touches the consumer).
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from aggregator import Aggregator
from broker.broker_clock import BrokerClock
from broker.kafka_io import BrokerHealth
from config import Settings
from ingest.assignment import InputAssignment
from ingest.poll_turns import PollTurns
from telemetry.report import ProcessorReport

# How often to ask the broker for the end of a partition given back to this member
# while the client's cached end of it is older than the assignment (and how long to wait).
_END_ASK_SECONDS = 1.0


class ReadToEnd:
    """The poll loop's view of where each owned partition ends, and since when it is read there."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        aggregator: Aggregator,
        clock: BrokerClock,
        turns: PollTurns,
        assignment: InputAssignment,
        health: BrokerHealth,
        report: ProcessorReport,
    ) -> None:
        self.settings = settings
        self._consumer = consumer
        self._aggregator = aggregator
        self._clock = clock
        self.turns = turns
        self._assignment = assignment
        self._health = health
        self._report = report
        self._asked_end_at: dict[int, float] = {}  # partition -> when its end was last asked

    def update(self, turn_started: float, waited: float) -> None:
        """A partition is caught up when everything up to the high watermark of its last
        fetch has been handed to the aggregator; records fetched but not yet consumed
        make it active again. Each turn that finds it so says so again, with the time:
        the watermark's clock part is that time (aggregator.py). Local (cached) look-ups,
        one per partition, per batch; the broker is asked only about a partition given
        back while its cached end is older than the assignment (`_end_is_current`).

        The time is read before the cached positions and ends, and they are believed only
        if the turn was not paused anywhere up to these reads (ingest/poll_turns.py): a
        pause after the time was read leaves it as old as the ends; one before it is
        caught by the turn's length. And only once "now" is known (the broker's time,
        broker/broker_clock.py): until the first acknowledgement, no partition is taken
        as read to its end by the clock.

        Where a partition is read from: the consumer's position when it has one (it
        moves past the commit markers of transactional input, which no record does),
        else the offset after the last record handed over, or the committed offset."""
        summary = self._aggregator.partition_summary()
        if not summary:
            self._report.consumer_lag = {}
            return
        topic = self.settings.input_topic
        now = self._clock.now()
        positions = self._positions(topic, summary)
        ends = {
            partition: self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            for partition in summary
        }
        paused = self.turns.turn_ended(turn_started, waited)
        believe_ends = self._clock.known and not paused and self.turns.ends_believed()
        lag = {}
        for partition, progress in summary.items():
            low, high = ends[partition]
            if high < 0:
                continue  # no fetch answered yet: unknown, so it keeps holding the watermark
            if self._assignment.end_from_before(
                partition, high, fetched=partition in positions
            ) and not self._end_is_current(topic, partition, high):
                continue  # an end from an earlier assignment: it holds until a fetch answers
            start = positions.get(partition, progress.next_offset)
            if start is None:
                if self._assignment.start_unknown(partition):
                    continue  # where it is read from is unknown until the commit is read: it holds
                # Nothing read and nothing committed: the client reads it from its beginning
                # (a new group's `latest` starts were assigned explicitly, and are known).
                start = low
            lag[partition] = max(0, high - start)
            if start >= high:
                if believe_ends:
                    self._aggregator.mark_caught_up(partition, start, at=now)
                    if not progress.caught_up:
                        self._health.mark_reachable()
            elif progress.caught_up:
                self._aggregator.mark_active(partition)
        self._report.consumer_lag = lag

    def _end_is_current(self, topic: str, partition: int, cached_end: int) -> bool:
        """Ask the broker (once a second at most) whether anything was written to a
        partition given back to this member since the client cached its end, before the
        assignment: if not, the cached end is good; if so, the next fetch brings the new
        end. Until then the partition is not read to its end. Nothing was written since
        when the listed end is not past the cached one: Kafka lists the end itself, the
        embedded broker its last batch's base offset + 1, which is past the cached end
        exactly when a batch was written since (tests/test_read_to_end.py, both)."""
        now = time.monotonic()
        if now - self._asked_end_at.get(partition, -_END_ASK_SECONDS) < _END_ASK_SECONDS:
            return False
        self._asked_end_at[partition] = now
        try:
            _low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=_END_ASK_SECONDS
            )
        except KafkaException:
            return False
        if high > cached_end:
            return False
        self._assignment.end_confirmed(partition)
        return True

    def _positions(self, topic: str, summary: dict) -> dict[int, int]:
        """The consumer's position per partition, where it has one (a local call)."""
        try:
            answer = self._consumer.position([TopicPartition(topic, p) for p in summary])
        except KafkaException:
            return {}
        return {tp.partition: tp.offset for tp in answer if tp.offset >= 0}
