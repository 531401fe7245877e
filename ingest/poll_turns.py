"""The poll loop's turns: whether what the client cached of the partitions' ends is fresh.

A partition counts as read to its end "as of" a time: the poll loop compares where
it has read to with the high watermark the client cached from its last fetch, and
the watermark's clock part is that time (aggregator.py). This is only right if the
cached end was fresh at that time. It is not after a pause of the process (stopped,
starved): every thread stopped with it, librdkafka's fetcher included, so what it
cached is as old as the pause, while any clock read after it is new. Believed, the
old ends say "read to the end" as of now, and the timer closes every window of the
pause on records not read yet: they come in late.

So the poll loop reads the time first, then the cached ends, and only then asks
`turn_ended` whether the turn (from its start, through consume() and those reads)
took much longer than it should have: a pause anywhere in the turn, or between two
turns (`turn_started`), means the ends are not believed again until they have been
fetched anew (`ends_believed`).

Pure: the monotonic clock is injected (tests use a fake one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("processor")

# A poll-loop turn that comes this long after the previous one, or that takes this much
# longer than its wait, means the process was paused (stopped, starved).
PAUSE_SECONDS = 2.0
# After a pause, how long "read to its end" is not believed: more than a fetch round
# trip (fetch.wait.max.ms is 500 ms), so that the ends are fresh again.
AFTER_PAUSE_SECONDS = 1.5


class PollTurns:
    """Notes each turn of the poll loop and the pauses between and inside them."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._last_turn_at: float | None = None  # when the previous turn started
        self._believed_from = 0.0  # "read to its end" is not believed before this (a pause)

    def turn_started(self) -> float:
        """A turn begins; returns its start (monotonic), for `turn_ended`."""
        now = self._monotonic()
        if self._last_turn_at is not None:
            self._note_pause(now - self._last_turn_at)
        self._last_turn_at = now
        return now

    def turn_ended(self, started: float, waited: float) -> bool:
        """Call after the turn read the cached ends: True if it was paused inside (it took
        `PAUSE_SECONDS` longer than its wait of `waited` seconds)."""
        return self._note_pause(self._monotonic() - started - waited)

    def ends_believed(self) -> bool:
        return self._monotonic() >= self._believed_from

    def _note_pause(self, seconds: float) -> bool:
        if seconds <= PAUSE_SECONDS:
            return False
        self._believed_from = self._monotonic() + AFTER_PAUSE_SECONDS
        log.warning(
            "the poll loop did not turn for %.0fs (the process was paused or starved); windows close again"
            " once the partitions' ends are fetched anew",
            seconds,
        )
        return True
