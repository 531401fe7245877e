"""Publishing closed parts and progress to the partials topic, and knowing which the
broker has.

The input offsets of a part's records may be committed only once every piece of the
part is acknowledged, and the merge must never see a partition's later record before
an earlier one it depends on. So each thing sent is a `Publication` with an explicit
state, and these invariants hold (each has a test in tests/test_part_publisher.py):

1. A publication is acknowledged only when every one of its pieces is.
2. Per input partition, publications go out one at a time, in the order they were
   closed: the next is produced only once the one before it is acknowledged. A
   partition's parts therefore reach the topic in window order, and its progress
   ("closed up to t") only after every part it covers is stored.
3. A delivery report reaches only the publication it was produced for: after a
   revoke, a late report of a dropped publication cannot acknowledge a new one of the
   same window and partition.
4. A full local queue (`BufferError`) leaves a publication where it stopped; the next
   turn goes on from the next piece. A refused piece is produced again (only the
   pieces not acknowledged, with the same part id: the merge ignores a second copy).

Every state change is one method (`send`, `_delivered`, `take_acknowledged`, `drop`),
so a fault-injection test can drive each transition.

Every acknowledgement also tells the broker's time (the partials topic is stamped
with the append time): it goes to the `BrokerClock` (broker/broker_clock.py), which is
what "now" means for this processor's windows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from aggregator import ClosedParts
from broker.broker_clock import BrokerClock
from core.window_value import iso_utc
from merging.parts import UNKNOWN_ORIGIN, PartOrigin, encode_progress, part_key, progress_key

log = logging.getLogger("processor")

# At most one line per this many seconds about refused pieces.
_REFUSED_LOG_SECONDS = 30.0


class Stage(Enum):
    QUEUED = "queued"  # behind an earlier publication of its partition, or not yet produced
    SENDING = "sending"  # some pieces produced, not every piece acknowledged
    ACKNOWLEDGED = "acknowledged"  # every piece stored: handed back once, then forgotten


@dataclass(eq=False)
class Publication:
    """One part (all its pieces) or one progress record of one input partition."""

    partition: int
    start: int | None  # the window start of a part; None for progress
    key: bytes
    pieces: list[bytes]
    closed_until: int = 0  # progress only
    stage: Stage = Stage.QUEUED
    to_produce: deque[int] = field(default_factory=deque)  # piece numbers not yet handed to the producer
    acknowledged: set[int] = field(default_factory=set)
    dropped: bool = False  # revoked: reports for it are ignored
    sent_at: dict[int, float] = field(default_factory=dict)  # piece -> when produced (this machine's clock)

    def __post_init__(self) -> None:
        self.to_produce.extend(range(len(self.pieces)))

    @property
    def is_part(self) -> bool:
        return self.start is not None

    def complete(self) -> bool:
        return len(self.acknowledged) == len(self.pieces)


class PartPublisher:
    """Owned by the timer thread (under the processor's publish lock); delivery reports
    arrive on whichever thread serves the producer, hence the lock."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        host: str,
        origin: PartOrigin = UNKNOWN_ORIGIN,
        clock: BrokerClock | None = None,
        name: str = "",
    ) -> None:
        self._producer = producer
        self._clock = clock or BrokerClock()
        self._topic = topic
        # Which processor wrote a record (its log lines' name, "processor-2[4711]"): with
        # several on one host, what tells an operator, or a test, whose a part is.
        self._headers = [("processor.host", host.encode())]
        if name:
            self._headers.append(("processor.name", name.encode()))
        self._origin = origin
        self._lock = threading.Lock()
        self._queues: dict[int, deque[Publication]] = {}  # input partition -> its publications, oldest first
        self._acknowledged: list[tuple[int, int]] = []  # (partition, start) of parts, not yet taken
        self._refused_logged_at = 0.0
        self.parts_published = 0  # acknowledged, for metrics

    def add(self, closed: ClosedParts) -> None:
        """Queue what one `close_due_parts` closed: each partition's parts, then its progress."""
        with self._lock:
            for part in closed.parts:
                self._queue(part.partition).append(
                    Publication(part.partition, part.start, part_key(part.start, part.partition), part.pieces)
                )
            for partition, closed_until in closed.progress.items():
                queue = self._queue(partition)
                last = queue[-1] if queue else None
                if last is not None and not last.is_part and last.stage is Stage.QUEUED:
                    queue.pop()  # a newer progress of the same partition says more
                accounted = closed.accounted.get(partition, -1)
                value = encode_progress(partition, closed.partition_count, closed_until, self._origin, accounted)
                queue.append(Publication(partition, None, progress_key(partition), [value], closed_until=closed_until))

    def _queue(self, partition: int) -> deque[Publication]:
        return self._queues.setdefault(partition, deque())

    def send(self) -> bool:
        """Produce the pieces that may go now: of each partition's oldest publication
        only. Stops at a full local queue (the next call goes on from the next piece).
        Returns True if anything was produced."""
        produced = False
        with self._lock:
            heads = [queue[0] for _, queue in sorted(self._queues.items()) if queue]
        for publication in heads:
            while True:
                with self._lock:
                    if publication.dropped or not publication.to_produce:
                        break
                    number = publication.to_produce[0]
                sent_at = self._clock.wall()
                try:
                    self._producer.produce(
                        self._topic,
                        key=publication.key,
                        value=publication.pieces[number],
                        headers=self._headers,
                        on_delivery=self._report_for(publication, number),
                    )
                except (BufferError, KafkaException) as error:
                    log.debug("partials producer queue full (%s); going on next turn", error)
                    return produced
                with self._lock:
                    if publication.to_produce and publication.to_produce[0] == number:
                        publication.to_produce.popleft()
                    publication.stage = Stage.SENDING
                    publication.sent_at[number] = sent_at
                produced = True
        return produced

    def _report_for(self, publication: Publication, number: int):
        def report(error: KafkaError | None, message: Message) -> None:
            if error is None and number in publication.sent_at:
                self._clock.observe(publication.sent_at[number], self._clock.wall(), message.timestamp())
            self._delivered(publication, number, None if error is None else error.str())

        return report

    def _delivered(self, publication: Publication, number: int, refused: str | None) -> None:
        """A delivery report for piece `number` of `publication`."""
        with self._lock:
            if publication.dropped:
                return  # revoked meanwhile: whoever owns the partition now publishes again
            if refused is not None:
                if number not in publication.acknowledged and number not in publication.to_produce:
                    publication.to_produce.append(number)
                self._log_refused(publication, refused)
                return
            publication.acknowledged.add(number)
            if not publication.complete():
                return
            publication.stage = Stage.ACKNOWLEDGED
            queue = self._queues.get(publication.partition)
            if queue and queue[0] is publication:
                queue.popleft()
            if publication.is_part:
                self._acknowledged.append((publication.partition, publication.start))

    def _log_refused(self, publication: Publication, reason: str) -> None:
        now = time.monotonic()
        if now - self._refused_logged_at < _REFUSED_LOG_SECONDS:
            return
        self._refused_logged_at = now
        what = f"part of window {iso_utc(publication.start)}" if publication.is_part else "progress"
        log.error(
            "the broker refused a piece of the %s of partition %d (%s); producing it again, later records of"
            " that partition wait",
            what,
            publication.partition,
            reason,
        )

    def take_acknowledged(self) -> list[tuple[int, int]]:
        """The (partition, start) of the parts acknowledged since the last call."""
        with self._lock:
            done, self._acknowledged = self._acknowledged, []
            self.parts_published += len(done)
            return done

    def has_sendable(self) -> bool:
        """Some partition's oldest publication has pieces not yet handed to the producer."""
        with self._lock:
            return any(queue and queue[0].to_produce for queue in self._queues.values())

    def idle(self) -> bool:
        """Nothing is waiting to be sent or acknowledged."""
        with self._lock:
            return not any(self._queues.values())

    def pending(self) -> int:
        """Parts not yet acknowledged."""
        with self._lock:
            return sum(1 for queue in self._queues.values() for p in queue if p.is_part)

    def clear(self) -> None:
        """Every partition revoked."""
        self.drop(None)

    def drop(self, partitions: Iterable[int] | None = None) -> None:
        """Revoked: forget these partitions' publications (None: every partition). Their
        records are uncommitted; the next owner rebuilds and publishes them again."""
        with self._lock:
            chosen = list(self._queues) if partitions is None else [p for p in partitions if p in self._queues]
            for partition in chosen:
                for publication in self._queues.pop(partition):
                    publication.dropped = True
            if partitions is None:
                self._acknowledged.clear()
            else:
                gone = set(chosen)
                self._acknowledged = [key for key in self._acknowledged if key[0] not in gone]
