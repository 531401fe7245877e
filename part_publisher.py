"""Publishing closed parts and progress to the partials topic, and knowing which the
broker has.

The input offsets of a part's records may be committed only once every piece of the
part is acknowledged. One ordered map holds each part with its state, so a part is
in exactly one state at a time: waiting to be produced, in flight (pieces not yet
acknowledged), or acknowledged (handed back once, then forgotten). A refused piece
sends its part back to "waiting": it is produced again, whole, with the same part
id (the merge ignores a second copy of a piece).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import Enum

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from aggregator import ClosedParts
from parts import encode_progress, part_key, progress_key

log = logging.getLogger("processor")


class PartState(Enum):
    WAITING = "waiting"  # to be produced
    IN_FLIGHT = "in flight"
    ACKNOWLEDGED = "acknowledged"


@dataclass(slots=True)
class PendingPart:
    pieces: list[bytes]
    state: PartState = PartState.WAITING
    outstanding: int = 0  # pieces produced and not yet acknowledged
    refused: str | None = None


class PartPublisher:
    """Owned by the timer thread (under the processor's publish lock); delivery reports
    arrive on whichever thread serves the producer, hence the lock."""

    def __init__(self, producer: Producer, topic: str, host: str) -> None:
        self._producer = producer
        self._topic = topic
        self._headers = [("processor.host", host.encode())]
        self._lock = threading.Lock()
        self._parts: dict[tuple[int, int], PendingPart] = {}  # (partition, start), oldest first
        # partition -> (closed-until, input partition count), not yet produced
        self._progress: dict[int, tuple[int, int]] = {}
        self.parts_published = 0  # acknowledged, for metrics

    def add(self, closed: ClosedParts) -> None:
        with self._lock:
            for part in closed.parts:
                self._parts[(part.partition, part.start)] = PendingPart(part.pieces)
            for partition, closed_until in closed.progress.items():
                before = self._progress.get(partition, (0, 0))[0]
                self._progress[partition] = (max(closed_until, before), closed.partition_count)

    def send(self) -> None:
        """Produce what waits, in order; stop at the first refusal of the local queue
        (full: the next turn goes on). A partition's progress goes out after its parts."""
        with self._lock:
            waiting = [(key, part) for key, part in self._parts.items() if part.state is PartState.WAITING]
        blocked: set[int] = set()
        for (partition, start), part in waiting:
            try:
                for piece in part.pieces:
                    self._producer.produce(
                        self._topic,
                        key=part_key(start, partition),
                        value=piece,
                        headers=self._headers,
                        on_delivery=self._on_delivery((partition, start)),
                    )
                    with self._lock:
                        part.outstanding += 1
            except (BufferError, KafkaException) as error:
                log.warning("part of window %d, partition %d not queued yet (%s); retrying", start, partition, error)
                blocked.add(partition)
                with self._lock:
                    part.state = PartState.IN_FLIGHT if part.outstanding else PartState.WAITING
                break
            with self._lock:
                part.state = PartState.IN_FLIGHT
        with self._lock:
            unsent_parts = {p for (p, _), part in self._parts.items() if part.state is PartState.WAITING}
            ready = {p: t for p, t in self._progress.items() if p not in unsent_parts and p not in blocked}
        for partition, (closed_until, partition_count) in sorted(ready.items()):
            try:
                self._producer.produce(
                    self._topic,
                    key=progress_key(partition),
                    value=encode_progress(partition, partition_count, closed_until),
                    headers=self._headers,
                )
            except (BufferError, KafkaException):
                break
            with self._lock:
                if self._progress.get(partition) == (closed_until, partition_count):
                    del self._progress[partition]

    def _on_delivery(self, key: tuple[int, int]):
        def report(error: KafkaError | None, _message: Message) -> None:
            with self._lock:
                part = self._parts.get(key)
                if part is None:
                    return
                part.outstanding -= 1
                if error is not None:
                    part.refused = error.str()
                if part.outstanding == 0 and part.state is PartState.IN_FLIGHT:
                    if part.refused is None:
                        part.state = PartState.ACKNOWLEDGED
                    else:
                        log.error(
                            "part of window %d, partition %d refused (%s); retrying", key[1], key[0], part.refused
                        )
                        part.refused = None
                        part.state = PartState.WAITING

        return report

    def take_acknowledged(self) -> list[tuple[int, int]]:
        """The (partition, start) of the parts acknowledged since the last call."""
        with self._lock:
            done = [key for key, part in self._parts.items() if part.state is PartState.ACKNOWLEDGED]
            for key in done:
                del self._parts[key]
            self.parts_published += len(done)
            return done

    def pending(self) -> int:
        with self._lock:
            return len(self._parts)

    def clear(self) -> None:
        """Revoked: parts not acknowledged are rebuilt by the next owner from the commit."""
        with self._lock:
            self._parts.clear()
            self._progress.clear()
