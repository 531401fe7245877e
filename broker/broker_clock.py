"""The broker's time, as this processor measures it: what "now" means for its windows.

Why: a caught-up partition's watermark follows "now" (an idle partition must not
hold every window), so a processor whose clock runs ahead closes windows early and
counts records late that were on time, and members whose clocks disagree publish
different windows. Machines drift (a VM restored from a snapshot, a container
without NTP), so "now" is taken from the broker instead: the partials topic is
created with `message.timestamp.type=LogAppendTime`, so the acknowledgement of
every part and progress record carries the time the broker appended it. Each
acknowledgement bounds this machine's offset from the broker's clock:

    broker time - acknowledged at  <=  offset  <=  broker time - sent at

`now()` is the wall clock plus the tightest lower bound seen lately, so it is never
ahead of the broker's time by more than clock drift since then: a window closes at
most a round trip late, never early. (An acknowledgement that contradicts the
estimate, this machine's clock having been stepped forward, starts it afresh.)
Before the first acknowledgement the offset is unknown (`known` is False), and the
processor treats no partition as read to its end by the clock (records still close
windows by their own times).

A broker that does not stamp the append time (the embedded broker, Tansu, answers
with the producer's own timestamp; or a partials topic made before, as CreateTime)
cannot be measured: the processor's own clock stands in for the broker's, which is
right when the processor and the broker share a machine (the embedded broker) and is
said once in the log. `offset_seconds` is then None.

Past `bound_seconds` (30 s) the offset is logged as a warning once per crossing (and
exported as a metric, for an alert): the windows are unchanged, since the broker's
time is used, but this machine's clock is wrong, and what it stamps with it (log
lines, the `published.at` header) is off by as much.

Pure: no Kafka calls; the wall clock is injected (tests use a fake one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

log = logging.getLogger("processor")

# Lower bounds older than this (by the local clock) are forgotten: the tightest recent one
# is the estimate, and a clock that was stepped is followed within this time.
_KEEP_SECONDS = 120.0
_KEEP_COUNT = 256
DEFAULT_BOUND_SECONDS = 30.0


class BrokerClock:
    """`now()`: epoch seconds by the broker's clock (as measured), else this machine's."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        bound_seconds: float = DEFAULT_BOUND_SECONDS,
        where: str = "the partials topic",
    ) -> None:
        self._wall = wall
        self.bound_seconds = bound_seconds
        self._where = where
        self._lock = threading.Lock()
        self._lower_bounds: deque[tuple[float, float]] = deque(maxlen=_KEEP_COUNT)  # (seen at, bound)
        self._offset: float | None = None
        self._unmeasurable = False
        self._past_bound = False

    def now(self) -> float:
        offset = self._offset
        return self._wall() if offset is None else self._wall() + offset

    def wall(self) -> float:
        """This machine's own clock (to stamp what is measured against `now`)."""
        return self._wall()

    @property
    def known(self) -> bool:
        """Whether `now()` may be relied on: measured, or known to be unmeasurable."""
        return self._offset is not None or self._unmeasurable

    @property
    def offset_seconds(self) -> float | None:
        """This machine's clock minus the broker's (seconds), None if not measured."""
        offset = self._offset
        return None if offset is None else -offset

    def observe(self, sent_at: float, acknowledged_at: float, timestamp: tuple[int, int]) -> None:
        """An acknowledgement of a record produced at `sent_at` (this machine's clock),
        acknowledged at `acknowledged_at`, stamped `timestamp` ((type, ms), as
        `Message.timestamp()` gives it) by the broker."""
        kind, millis = timestamp
        if kind != TIMESTAMP_LOG_APPEND_TIME or millis <= 0:
            self._note_unmeasurable()
            return
        broker = millis / 1000.0
        with self._lock:
            if self._offset is not None and self._offset > broker - sent_at:
                # Impossible by this acknowledgement: this machine's clock was stepped
                # forward since the bounds kept were seen. Start again from this one.
                self._lower_bounds.clear()
            self._lower_bounds.append((acknowledged_at, broker - acknowledged_at))
            while self._lower_bounds and self._lower_bounds[0][0] < acknowledged_at - _KEEP_SECONDS:
                self._lower_bounds.popleft()
            first = self._offset is None
            self._offset = max(bound for _, bound in self._lower_bounds)
            offset = -self._offset
        if first:
            log.info("this processor's clock is %+.3fs off the broker's; windows follow the broker's time", offset)
        self._check_bound(offset)

    def _note_unmeasurable(self) -> None:
        with self._lock:
            if self._unmeasurable or self._offset is not None:
                return
            self._unmeasurable = True
        log.warning(
            "the broker does not stamp %s with its own time (LogAppendTime): this processor's clock stands in"
            " for the broker's, so the clocks of the group's members must agree (docs/semantics.md)",
            self._where,
        )

    def _check_bound(self, offset: float) -> None:
        past = abs(offset) > self.bound_seconds
        if past == self._past_bound:
            return
        self._past_bound = past
        if past:
            log.warning(
                "this processor's clock is %+.1fs off the broker's (more than %.0fs): windows still follow the"
                " broker's time, but fix this machine's clock (NTP)",
                offset,
                self.bound_seconds,
            )
        else:
            log.info("this processor's clock is back within %.0fs of the broker's (%+.1fs)", self.bound_seconds, offset)
