"""Copies of invalid input records on the dead-letter topic, at least once.

An invalid record is not aggregated, so its input offset is committed like any
other once its window is published. Its copy on the dead-letter topic must be
stored by then, or a crash loses it for good. `DeadLetterQueue` therefore keeps,
per input partition, the offsets whose copies the broker has not acknowledged
yet; the processor never commits past the lowest of them (`holds`).

Back-pressure: while the producer's queue is full (a flood of invalid records and
a slow broker), a copy is retried while serving delivery reports, until the
processor is asked to stop. A copy that could not even be queued keeps holding its
offset, so the record is read, and copied, again by the next run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, Message, Producer

log = logging.getLogger("processor")

# How long one produce attempt waits for room in the producer's queue.
_ROOM_WAIT_SECONDS = 0.1
_WAITING_LOG_SECONDS = 30.0


class DeadLetterQueue:
    """Produces DLQ copies and knows which of them are not acknowledged yet.

    Used from the poll loop (`copy`); delivery reports arrive on whichever thread
    serves the producer (the timer's flush), hence the lock.
    """

    def __init__(self, producer: Producer, topic: str, host: str, should_stop: Callable[[], bool]) -> None:
        self._producer = producer
        self._topic = topic
        self._host = host.encode()
        self._should_stop = should_stop
        self._lock = threading.Lock()
        # input partition -> offsets whose copies are queued or in flight, not acknowledged
        self._pending: dict[int, set[int]] = {}
        # Copies the broker refused (kept pending), produced again by `retry_refused`.
        self._refused: list[tuple] = []

    def copy(self, message: Message, reason: str) -> bool:
        """Queue an unchanged copy of `message` with headers saying why and whence.

        Returns False if the processor was asked to stop before the copy could be
        queued; its offset then stays held (`holds`) for this run.
        """
        partition, offset = message.partition(), message.offset()
        _kind, millis = message.timestamp()
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.source.topic", (message.topic() or "").encode()),
            ("dlq.source.partition", str(partition).encode()),
            ("dlq.source.offset", str(offset).encode()),
            ("dlq.source.timestamp", str(millis).encode()),
            ("dlq.processor.host", self._host),
        ]
        with self._lock:
            self._pending.setdefault(partition, set()).add(offset)
        return self._produce(message.value(), message.key(), headers, partition, offset)

    def _produce(self, value, key, headers, partition: int, offset: int) -> bool:
        waiting_since = None
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=self._on_delivery(value, key, headers, partition, offset),
                )
                return True
            except BufferError:
                # The queue is full: serve delivery reports (which frees room) and retry.
                now = time.monotonic()
                if waiting_since is None:
                    waiting_since = now
                elif now - waiting_since > _WAITING_LOG_SECONDS:
                    log.warning(
                        "dead-letter copies are waiting for room in the producer queue for %.0fs (broker slow?)",
                        now - waiting_since,
                    )
                    waiting_since = now
                if self._should_stop():
                    return False
                self._producer.poll(_ROOM_WAIT_SECONDS)

    def _on_delivery(self, value, key, headers, partition: int, offset: int):
        def report(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                with self._lock:
                    offsets = self._pending.get(partition)
                    if offsets is not None:
                        offsets.discard(offset)
                        if not offsets:
                            del self._pending[partition]
                return
            # Refused (not merely slow: librdkafka retries those itself, forever). The
            # offset stays held; try again from the poll loop's next `retry_refused`.
            log.error(
                "dead-letter copy of partition %d offset %d was refused (%s); trying it again",
                partition,
                offset,
                error.str(),
            )
            with self._lock:
                self._refused.append((value, key, headers, partition, offset))

        return report

    def retry_refused(self) -> None:
        """Produce again the copies the broker refused (poll loop, once per turn)."""
        with self._lock:
            refused, self._refused = self._refused, []
        for value, key, headers, partition, offset in refused:
            if not self._produce(value, key, headers, partition, offset):
                with self._lock:
                    self._refused.append((value, key, headers, partition, offset))
                return

    def holds(self) -> dict[int, int]:
        """Per input partition, the lowest offset whose copy is not acknowledged yet."""
        with self._lock:
            return {partition: min(offsets) for partition, offsets in self._pending.items() if offsets}
