"""The commit sequence of the input offsets, in one place.

Three moments commit: the timer thread after each closing of parts
(ingest/window_closer.py), a rebalance taking partitions away
(ingest/assignment.py) and the shutdown (kafka_processor.py). All three run
`Checkpoint.commit`, whose steps are, in order:

1. send the parts that may go (a partition's publications go out one at a time,
   ingest/part_publisher.py) and flush the producer (parts, progress and
   dead-letter copies alike), again while acknowledgements let more go, until
   everything is acknowledged or `wait_seconds` have passed;
2. take what the broker acknowledged and tell the aggregator: those parts' offsets
   are now held only until their windows are published;
3. compute the safe offsets: per partition, the lowest offset still needed by an
   open or unacknowledged part, a window not yet published, or a dead-letter copy
   not yet acknowledged (nothing before it can be lost by committing it);
4. commit them: at once when called on the main thread (`now=True`: a revocation
   inside the consumer's callback, the shutdown), else through the commit slot, which
   the main thread empties on its next turn (only it touches the consumer).

After a crash (`crashed`: a bug, a fatal client error) none of it runs: nothing
is committed any more, and the next run replays from the last commit.
"""

from __future__ import annotations

import threading
import time

from aggregator import Aggregator
from broker.kafka_io import BrokerHealth, RenewableProducer
from ingest.commits import InputCommits, safe_offsets
from ingest.dead_letter import DeadLetterQueue
from ingest.part_publisher import PartPublisher


class Checkpoint:
    """Flush, take what is acknowledged, compute the safe offsets, commit (see above).
    Callers hold the publish lock (`WindowCloser.lock`) around it."""

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        parts: PartPublisher,
        producer: RenewableProducer,
        dead_letters: DeadLetterQueue,
        commits: InputCommits,
        health: BrokerHealth,
        crashed: threading.Event,
    ) -> None:
        self._aggregator = aggregator
        self._parts = parts
        self._producer = producer
        self.dead_letters = dead_letters
        self._commits = commits
        self._health = health
        self._crashed = crashed

    def commit(self, wait_seconds: float, *, now: bool = False) -> bool:
        """The four steps; True when everything produced so far is acknowledged."""
        if self._crashed.is_set():
            return False
        # 1. Send and flush, while acknowledgements let more go and time is left.
        deadline = time.monotonic() + wait_seconds
        while True:
            self._parts.send()
            still_queued = self._producer.flush(max(0.0, deadline - time.monotonic()))
            # 2. What the broker acknowledged.
            acknowledged = self._parts.take_acknowledged()
            if acknowledged:
                self._aggregator.acknowledge(acknowledged)
                self._health.mark_reachable()
            if still_queued or not self._parts.has_sendable() or time.monotonic() >= deadline:
                break
        # 3. Safe even while some are unacknowledged: unacknowledged parts, parts of
        # unpublished windows and dead-letter copies hold their offsets.
        offsets = self.safe_offsets()
        # 4. Commit, or hand the commit to the main thread.
        if now:
            self._commits.slot.take()  # an older request, superseded by these offsets
            if offsets:
                self._commits.commit(offsets)
        else:
            self._commits.slot.offer(offsets)
        return not (self._parts.pending() or still_queued)

    def waiting(self) -> tuple[int, int]:
        """(parts not acknowledged yet, messages in the producer's queue), for the log."""
        return self._parts.pending(), len(self._producer)

    def safe_offsets(self) -> dict[int, int]:
        """Offsets no open or unacknowledged part, no unpublished window and no
        unacknowledged dead-letter copy still needs."""
        return safe_offsets(self._aggregator.committable_offsets(), self.dead_letters.holds())
