"""The timer thread: close the window parts the watermarks have passed, publish them
to the partials topic, and offer for commit the input offsets they no longer hold.

It runs beside the poll loop (kafka_processor.py), which owns the consumer: this
thread only ever touches the aggregator (under its lock), the producer and the
commit slot, and the poll loop performs the commit on its next turn.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from aggregator import Aggregator, ClosedParts, WindowAggregate
from broker.broker_clock import BrokerClock
from broker.pipeline_topics import PublishedFollower
from config import Settings
from ingest.checkpoint import Checkpoint
from ingest.part_publisher import PartPublisher
from merging.parts import PartOrigin, encode_part
from telemetry.report import ProcessorReport

log = logging.getLogger("processor")

# How long one publish attempt of the timer waits for acknowledgements.
PUBLISH_ATTEMPT_SECONDS = 5.0
# A part is split into pieces below Kafka's default message size limit (1 MB), so the
# partials topic needs no special configuration on any broker.
PART_MAX_BYTES = 900_000


class WindowCloser:
    """Closing and publishing parts, one attempt at a time (`lock`, which a rebalance
    takes too, so a revoke never races a publish)."""

    def __init__(
        self,
        settings: Settings,
        *,
        aggregator: Aggregator,
        parts: PartPublisher,
        checkpoint: Checkpoint,
        report: ProcessorReport,
        published: PublishedFollower,
        origin: PartOrigin,
        clock: BrokerClock | None = None,
    ) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self._aggregator = aggregator
        self._parts = parts
        self._checkpoint = checkpoint
        self._report = report
        self._published = published
        self._origin = origin
        self._clock = clock or BrokerClock()

    def run(
        self, stop_requested: threading.Event, crashed: threading.Event, heartbeat: Callable[[], None] = lambda: None
    ) -> None:
        """The timer thread's loop, until `stop_requested`; `heartbeat` once per turn (liveness)."""
        interval = self.settings.close_interval_seconds
        heartbeat()
        while not stop_requested.wait(interval):
            heartbeat()
            try:
                self.close_and_publish(wait_seconds=PUBLISH_ATTEMPT_SECONDS)
                self._report.maybe_log_progress()
            except Exception:
                # A bug (a part that cannot be encoded, say): never a window that
                # silently disappears, never a timer that dies and stalls the pipeline.
                # Stop loudly, commit nothing: a restart replays from the last commit.
                log.exception("window closer failed; the processor stops")
                crashed.set()
                stop_requested.set()
                return

    def close_and_publish(self, wait_seconds: float, commit_now: bool = False) -> bool:
        """Close the (window, partition) parts the watermarks have passed and run the
        checkpoint (ingest/checkpoint.py): publish them to the partials topic in order,
        wait up to `wait_seconds` for the broker's acknowledgement, then commit the
        offsets no longer needed (through the main thread; `commit_now` on it).

        Never holds the lock longer than one attempt, so a rebalance or a shutdown is
        not blocked by a broker that is away; parts already handed to the producer are
        not produced again (librdkafka retries them itself).
        Returns True when everything closed so far is acknowledged.
        """
        with self.lock:
            started = time.perf_counter()
            published = self._published.poll()
            self._aggregator.release_published(published.until, published.partition_count, published.accounted)
            closed = self._aggregator.close_due_parts(self._encode_part)
            if not self._clock.known:
                closed = self._announced(closed)
            self._parts.add(closed)
            acknowledged = self._checkpoint.commit(wait_seconds, now=commit_now)
            self._report.stats.publish_seconds += time.perf_counter() - started
            if not acknowledged:
                self._report.warn_unacknowledged(*self._checkpoint.waiting())
            return acknowledged

    def _announced(self, closed: ClosedParts) -> ClosedParts:
        """While the broker's time is unknown, and nothing is on its way to the partials
        topic whose acknowledgement would tell it, add a progress record of an owned
        partition saying only what is true already (what it has closed so far): its
        acknowledgement carries the broker's time. An idle partition could otherwise
        never close a window by the clock, nor be announced."""
        if closed.progress or closed.parts or not closed.partition_count or not self._parts.idle():
            return closed
        first = self._aggregator.first_partition_closed_until()
        if first is None:
            return closed
        partition, closed_until, accounted = first
        return dataclasses.replace(
            closed,
            progress={partition: closed_until},
            accounted={} if accounted is None else {partition: accounted},
        )

    def _encode_part(self, partition: int, start: int, window: WindowAggregate, accounted_to: int) -> list[bytes]:
        return encode_part(
            start,
            partition,
            self._aggregator.total_partitions,
            window.tallies,
            window.invalid_message_count,
            window.late_message_count,
            PART_MAX_BYTES,
            origin=self._origin,
            accounted_to=accounted_to,
        )
