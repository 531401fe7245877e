"""The merge: per-partition parts of windows in, the contract's windows out. Pure: no Kafka, no clock.

Every processor closes windows per input partition and publishes each (window,
partition) it closes as a *part* on the partials topic (parts.py), and *progress*
records as its partitions' watermarks advance. One merger reads that topic (it has
one partition, so the merger sees records in the order they were written) and
feeds every record to a `MergeState`. A window is due once every input partition
0..P-1 has closed it: then the winning parts are summed into `MergedTallies` and
rendered by `aggregator.render_window_value`, the same function a single
processor renders its windows with, so the bytes are the same.

What the merge relies on from the publishers: a partition's progress is sent only
after the parts it covers are acknowledged, and a partition's parts are written
in window order (each part's pieces may come in any order, a later part's pieces
may overlap an earlier one's). So by the time a progress record or a complete
part closes a window on a partition, that partition's part of the window has at
least begun to arrive, if it has one.

Rules (why, in short):
- P, the input partition count, is the largest `partition_count` any record
  reports: partitions added to the input topic are waited for from the first
  record that reports them on. A shrinking count is not supported (Kafka cannot
  remove partitions).
- A partition's `closed_until` is the highest of its progress records and of the
  ends of its complete parts; it never moves back (a replay may repeat old progress).
- The first complete part of a (window, partition) wins. A later one is a replay
  (after a crash or a rebalance, maybe rebuilt from only the records not yet
  committed): adding it too would count records twice.
- A window also waits while a partition has begun a part of it and completed
  none, even if that partition says it has closed the window: publishing without
  it would lose its records. A publisher that dies mid-part leaves such pieces;
  the processor that takes the partition over replays its records (their offsets
  were not committed, the part being unacknowledged) and publishes the part
  again, which completes and wins. `incomplete_parts()` names what a window waits for.
- Windows go out in start order: a window is due only once every earlier window
  the merge holds is due too (the output topic's tail tells a new merger where
  to resume, so a later window must never be on it before an earlier one).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from aggregator import (
    DEFAULT_MAX_PROFILES,
    PROFILE_FIELDS,
    ClosedWindow,
    WindowRenderError,
    WindowTallies,
    iso_utc,
    render_window_value,
)
from parsing import NativeWindowTallies
from parts import PartPiece, Progress

log = logging.getLogger("merger")


class MergedTallies:
    """The sum of a window's winning parts, through the `WindowTallies` reading API.

    The distinct values are unioned by a window's own tallies (`add_packed`: in C
    without the GIL on the native path), so the merge moves them without a Python
    object per value. Bounded like one window's tallies: at most `max_distinct`
    device ids and IPs and `max_profiles` combinations, so that P parts each at
    their bound do not render a value P times the size the output topic was sized
    for. Past a bound, new values are left out and `capped()` names the fields that
    became lower bounds. Parts are added in partition order, so what is left out
    does not depend on the order the merger read them in.
    """

    __slots__ = ("message_count", "_profiles", "_distinct", "_missing", "_capped", "_max_profiles")

    def __init__(self, max_distinct: int, max_profiles: int = DEFAULT_MAX_PROFILES) -> None:
        self.message_count = 0
        self._profiles: Counter = Counter()
        self._distinct = distinct_tallies(max_distinct)
        self._missing: Counter = Counter()
        self._capped: set[str] = set()
        self._max_profiles = max_profiles

    def add(self, piece: PartPiece) -> None:
        """Add one piece of a part (each piece of a part exactly once)."""
        self.message_count += piece.message_count
        self._missing.update(piece.missing)
        self._capped.update(piece.capped)
        profiles = {(d, v, locale): n for d, v, locale, n in piece.profiles}
        if _sum_bounded(self._profiles, profiles, self._max_profiles):
            self._capped.update(PROFILE_FIELDS)
        for chunk in piece.packed_device_ids:
            self._distinct.add_packed(chunk, b"")
        for chunk in piece.packed_ip_counts:
            self._distinct.add_packed(b"", chunk)

    def profile_counts(self) -> dict[tuple[str, str, str], int]:
        return dict(self._profiles)

    def unique_device_count(self) -> int:
        return self._distinct.unique_device_count()

    def unique_ip_count(self) -> int:
        return self._distinct.unique_ip_count()

    def top_ips(self, n: int) -> list[tuple[str, int]]:
        return self._distinct.top_ips(n)

    def missing_counts(self) -> dict[str, int]:
        return dict(self._missing)

    def capped(self) -> set[str]:
        return self._capped | self._distinct.capped()

    def device_ids(self) -> set[str]:
        return self._distinct.device_ids()

    def ip_counts(self) -> dict[str, int]:
        return self._distinct.ip_counts()


def distinct_tallies(max_distinct: int):
    """Empty tallies to union packed values into: the native ones when built."""
    if NativeWindowTallies is not None:
        return NativeWindowTallies(max_distinct)
    return WindowTallies(max_distinct)


def _sum_bounded(counts: Counter, more: dict, bound: int) -> bool:
    """Add `more`'s counts: keys already counted always, new ones while `counts` holds
    fewer than `bound`; True if any was left out."""
    if len(counts) + len(more) <= bound:
        counts.update(more)
        return False
    left_out = False
    for key, n in more.items():
        if key not in counts and len(counts) >= bound:
            left_out = True
            continue
        counts[key] += n
    return left_out


@dataclass(slots=True, eq=False)
class _Part:
    """One publication (part_id) of one partition's part of a window, piece by piece."""

    part_id: str
    pieces: int
    received: dict[int, PartPiece] = field(default_factory=dict)
    min_offset: int | None = None

    def add(self, piece: PartPiece, offset: int) -> None:
        self.received.setdefault(piece.piece, piece)  # a second copy (a producer retry) changes nothing
        if self.min_offset is None or offset < self.min_offset:
            self.min_offset = offset

    def complete(self) -> bool:
        return len(self.received) == self.pieces

    def holds_anything(self) -> bool:
        """(Complete parts only.) Whether the part counts something: a single processor publishes a window only
        when it holds records or carried counts, and so must the merge."""
        first = self.received[0]  # the additive counts ride in piece 0
        return bool(first.message_count or first.invalid_message_count or first.late_message_count)


@dataclass(slots=True, eq=False)
class _Window:
    """What the merge holds of one window not yet published."""

    start: int
    winners: dict[int, _Part] = field(default_factory=dict)  # partition -> its first complete part
    assembling: dict[tuple[int, str], _Part] = field(default_factory=dict)  # (partition, part_id) -> incomplete
    rendered: tuple[tuple, ClosedWindow] | None = None  # (the winners it was rendered from, the result)

    def min_offset(self) -> int | None:
        offsets = [
            p.min_offset for p in (*self.winners.values(), *self.assembling.values()) if p.min_offset is not None
        ]
        return min(offsets) if offsets else None

    def waits_for_a_part(self) -> bool:
        """Some partition began a part of this window and completed none (a partition's
        other parts are dropped once it has a complete one)."""
        return bool(self.assembling)

    def has_content(self) -> bool:
        return any(part.holds_anything() for part in self.winners.values())


class MergeState:
    """One merger's view of the partials topic (see the module docstring for the rules).

    Not thread-safe: the merger thread owns it (or a lock around every call).
    """

    def __init__(
        self,
        window_seconds: int,
        top_ips: int,
        max_distinct_per_window: int,
        max_profiles_per_window: int = DEFAULT_MAX_PROFILES,
    ) -> None:
        self.window_seconds = window_seconds
        self.top_ips = top_ips
        self.max_distinct_per_window = max_distinct_per_window
        self.max_profiles_per_window = max_profiles_per_window
        self._partition_count = 0
        self._closed_until: dict[int, int] = {}
        self._windows: dict[int, _Window] = {}
        self._published_until = 0
        self._next_offset: int | None = None
        self._newest_part_end: int | None = None

    # ---- input ----------------------------------------------------------------------

    def restore_published_until(self, window_end: int) -> None:
        """Every window ending at or before `window_end` is on the output topic already
        (its tail says so): its parts are ignored and it is never published again."""
        self._published_until = max(self._published_until, window_end)
        for start in [s for s in self._windows if s + self.window_seconds <= self._published_until]:
            del self._windows[start]

    def add(self, record: PartPiece | Progress, offset: int) -> None:
        """Take one partials record, read at `offset`.

        A piece inconsistent with this merge (a window not aligned to its window
        size: publishers configured with another WINDOW_SECONDS) is logged and
        skipped; it holds no offset either way.
        """
        if self._next_offset is None or offset >= self._next_offset:
            self._next_offset = offset + 1
        self._partition_count = max(self._partition_count, record.partition_count)
        if isinstance(record, Progress):
            self._advance(record.partition, record.closed_until)
        else:
            self._add_piece(record, offset)
        self._drop_settled_without_content()

    def _add_piece(self, piece: PartPiece, offset: int) -> None:
        width = self.window_seconds
        start, partition = piece.window_start, piece.partition
        if start % width:
            log.warning(
                "skipping a part of window %s (partition %d) at offset %d: not aligned to %d-second windows",
                iso_utc(start),
                partition,
                offset,
                width,
            )
            return
        end = start + width
        self._newest_part_end = end if self._newest_part_end is None else max(self._newest_part_end, end)
        window = self._windows.get(start)
        if window is None:
            if end <= self._published_until:
                return  # a replay of a published window
            window = self._windows[start] = _Window(start)
        if partition in window.winners:
            return  # the (window, partition) already has its part: this is a replay
        key = (partition, piece.part_id)
        part = window.assembling.get(key)
        if part is None:
            part = window.assembling[key] = _Part(piece.part_id, piece.pieces)
        elif part.pieces != piece.pieces:
            log.warning(
                "skipping piece %d of part %s (window %s, partition %d) at offset %d: %d pieces, not %d",
                piece.piece,
                piece.part_id,
                iso_utc(start),
                partition,
                offset,
                piece.pieces,
                part.pieces,
            )
            return
        part.add(piece, offset)
        if part.complete():
            window.winners[partition] = part
            for other in [k for k in window.assembling if k[0] == partition]:  # never to win now
                del window.assembling[other]
            self._advance(partition, end)

    def _advance(self, partition: int, closed_until: int) -> None:
        if closed_until > self._closed_until.get(partition, 0):
            self._closed_until[partition] = closed_until

    def _all_closed_until(self) -> int | None:
        """The end of the newest window every input partition has closed (None: not known)."""
        count = self._partition_count
        if count == 0 or any(p not in self._closed_until for p in range(count)):
            return None
        return min(self._closed_until[p] for p in range(count))

    def _drop_settled_without_content(self) -> None:
        """Windows every partition has closed, complete, with nothing to publish (only
        parts that count nothing) will never be published: drop them so that they do
        not hold the commit back for ever."""
        closed = self._all_closed_until()
        if closed is None:
            return
        width = self.window_seconds
        settled = [
            start
            for start, window in self._windows.items()
            if start + width <= closed and not window.waits_for_a_part() and not window.has_content()
        ]
        for start in settled:
            del self._windows[start]

    # ---- output ---------------------------------------------------------------------

    def due_windows(self) -> list[ClosedWindow]:
        """The windows not yet marked published that every partition has closed, with
        no part of them still incomplete, oldest first (stopping at the first window
        that waits). Changes nothing that counts: call it again and the same windows come back
        (rendered once: a window's value is kept while its winning parts stay the
        same). `WindowRenderError` if a value cannot be made, with nothing changed.
        """
        closed = self._all_closed_until()
        if closed is None:
            return []
        width = self.window_seconds
        due = []
        for start in sorted(s for s in self._windows if s + width <= closed):
            window = self._windows[start]
            if window.waits_for_a_part():
                break  # and so do the windows after it
            if window.has_content():
                due.append(self._rendered(window))
        return due

    def _rendered(self, window: _Window) -> ClosedWindow:
        made_from = tuple(sorted((p, part.part_id) for p, part in window.winners.items()))
        if window.rendered is not None and window.rendered[0] == made_from:
            return window.rendered[1]
        tallies = MergedTallies(self.max_distinct_per_window, self.max_profiles_per_window)
        invalid = late = 0
        for partition in sorted(window.winners):
            received = window.winners[partition].received
            for number in sorted(received):
                piece = received[number]
                tallies.add(piece)
                invalid += piece.invalid_message_count
                late += piece.late_message_count
        try:
            value = render_window_value(window.start, tallies, invalid, late, self.window_seconds, self.top_ips)
        except Exception as error:
            raise WindowRenderError(window.start) from error
        closed = ClosedWindow(start=window.start, key=iso_utc(window.start).encode(), value=value)
        window.rendered = (made_from, closed)
        return closed

    def mark_published(self, starts: list[int] | tuple[int, ...] | set[int]) -> None:
        """The broker acknowledged these windows: drop them; published-until becomes the
        highest end. Only these are dropped: a window the broker refused stays due."""
        starts = list(starts)
        for start in starts:
            self._windows.pop(start, None)
        if starts:
            self._published_until = max(self._published_until, max(starts) + self.window_seconds)

    def committable_offset(self) -> int | None:
        """The partials offset the merger may commit: the lowest piece an unpublished
        window still holds, else one past the last record added (None before any).
        Progress holds nothing: publishers send it again as their watermarks move."""
        held = [offset for w in self._windows.values() if (offset := w.min_offset()) is not None]
        return min(held) if held else self._next_offset

    # ---- introspection for logs and metrics ----------------------------------------------

    @property
    def partition_count(self) -> int:
        return self._partition_count

    @property
    def published_until(self) -> int:
        """Every window ending at or before this is on the output topic (0: none known)."""
        return self._published_until

    def closed_until(self) -> dict[int, int]:
        return dict(self._closed_until)

    def newest_part_end(self) -> int | None:
        """The newest window end of any part added: merge lag = this - published_until."""
        return self._newest_part_end

    def pending_windows(self) -> int:
        return len(self._windows)

    def holding_partitions(self) -> list[int]:
        """The input partitions the next window waits on: those not heard from yet, else
        those that have closed the fewest windows."""
        count = self._partition_count
        missing = [p for p in range(count) if p not in self._closed_until]
        if missing or count == 0:
            return missing
        lowest = min(self._closed_until[p] for p in range(count))
        return [p for p in range(count) if self._closed_until[p] == lowest]

    def incomplete_parts(self) -> list[tuple[int, int, int, int]]:
        """(window start, partition, pieces received, pieces) of every part begun and not
        complete, oldest window first: what a window that should be due waits for."""
        return sorted(
            (window.start, partition, len(part.received), part.pieces)
            for window in self._windows.values()
            for (partition, _), part in window.assembling.items()
        )


class MergeStall:
    """Whether to warn that the merge is stuck: windows are held (some partitions have
    closed them, not all), yet no window was published for `after_seconds`, and no
    warning was given for as long. An operator
    then learns which partitions hold it (their processor is stuck, or that partition
    is far behind the others); catching up on a backlog takes seconds, not this long.
    The caller passes the time (monotonic seconds), so this stays pure."""

    def __init__(self, after_seconds: float) -> None:
        self.after_seconds = after_seconds
        self._published_until: int | None = None
        self._since: float | None = None  # no progress since
        self._warned_at: float | None = None

    def due(self, now: float, published_until: int, windows_held: int) -> bool:
        if not windows_held or published_until != self._published_until or self._since is None:
            self._published_until, self._since, self._warned_at = published_until, now, None
            return False
        if now - self._since < self.after_seconds:
            return False
        if self._warned_at is not None and now - self._warned_at < self.after_seconds:
            return False
        self._warned_at = now
        return True
