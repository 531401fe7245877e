"""Which input offsets may be committed, the hand-off of a commit between threads,
and the commit itself.

The timer thread learns that offsets are safe to commit (their windows are
acknowledged); only the main thread may touch the consumer. `CommitSlot` is the
one-slot hand-off between them: the newest request replaces an older one (offsets
only move forward while the assignment stands), a request taken but not carried
out can be put back, and nothing is lost between a read and a write.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

log = logging.getLogger("processor")


def safe_offsets(window_offsets: dict[int, int], dead_letter_holds: dict[int, int]) -> dict[int, int]:
    """Per partition, the offset to commit: what the windows allow, but never past a
    record whose dead-letter copy the broker has not acknowledged yet."""
    return {
        partition: min(offset, dead_letter_holds.get(partition, offset)) for partition, offset in window_offsets.items()
    }


class CommitSlot:
    """One pending commit request (or none), and the offsets last committed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._request: dict[int, int] | None = None
        self._committed: dict[int, int] = {}

    def offer(self, offsets: dict[int, int]) -> bool:
        """Ask for `offsets` to be committed, unless they are already. True if asked."""
        with self._lock:
            if not offsets or offsets == self._committed:
                return False
            self._request = dict(offsets)
            return True

    def take(self) -> dict[int, int] | None:
        """The request to carry out now, if any (it leaves the slot)."""
        with self._lock:
            request, self._request = self._request, None
            return request

    def put_back(self, offsets: dict[int, int]) -> None:
        """A taken request failed: keep it for the next turn, unless a newer one came."""
        with self._lock:
            if self._request is None:
                self._request = dict(offsets)

    def done(self, offsets: dict[int, int]) -> None:
        with self._lock:
            self._committed = dict(offsets)

    def clear(self) -> None:
        """The assignment changed: requests and what was committed no longer apply."""
        with self._lock:
            self._request = None
            self._committed = {}


class InputCommits:
    """Commits of the input consumer's offsets: requested by the timer thread through
    the slot, carried out by the main thread (the only one that touches the consumer).
    After a bug (`crashed`) nothing is committed any more, not even by the revoke
    that closing the consumer runs."""

    def __init__(self, consumer: Consumer, topic: str, crashed: threading.Event) -> None:
        self._consumer = consumer
        self._topic = topic
        self._crashed = crashed
        self.slot = CommitSlot()

    def commit_if_requested(self) -> None:
        offsets = self.slot.take()
        if offsets and not self.commit(offsets):
            self.slot.put_back(offsets)

    def commit(self, offsets: dict[int, int]) -> bool:
        """Commit synchronously; False if the broker did not take it (tried again later)."""
        if self._crashed.is_set():
            return True  # dropped on purpose: nothing is committed after a bug
        try:
            self._consumer.commit(
                offsets=[TopicPartition(self._topic, p, o) for p, o in sorted(offsets.items())], asynchronous=False
            )
        except KafkaException as error:
            if error.args[0].code() == KafkaError._NO_OFFSET:
                return True  # nothing new to commit
            log.warning("offset commit failed (%s); will commit again", error.args[0].str())
            return False
        self.slot.done(offsets)
        log.debug("committed %s", offsets)
        return True
