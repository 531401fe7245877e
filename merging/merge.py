"""The merge: per-partition parts of windows in, the contract's windows out. Pure: no Kafka, no clock.

Every processor closes windows per input partition and publishes each (window,
partition) it closes as a *part* on the partials topic (merging/parts.py), and *progress*
records as its partitions' watermarks advance. One merger reads that topic (it has
one partition, so the merger sees records in the order they were written) and
feeds every record to a `MergeState`. A window is due once every input partition
0..P-1 has closed it: then the winning parts are summed into `MergedTallies` and
rendered by `core.window_value.render_window_value`, the same function a single
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
- Nothing is due, and nothing committable, until the merger knows what the output
  holds (`published_until` None): "unknown" taken as "nothing published" would
  publish a window again from only its later parts.
- Another pipeline's records (`PartOrigin`: input topic and group) are skipped. A
  record made under other window-shaping settings is not merged: its partition
  counts as having closed nothing, and the commit stays before it, until a later
  record of that partition agrees (its owner runs with this merger's settings now,
  and publishes the windows' records again: they were never committed).
- A part of a published window from a partition the window was not merged with
  (one added to the input since) counts as late in the next window published, once
  per (window, partition): another part of it is a replay of the same records. A
  window handed to the producer (in flight) counts as published for this rule: its
  value is fixed, and the input partition count it was merged with is the one it
  is recorded with, whenever its acknowledgement comes.
- Memory is bounded (`max_pending_windows`, `max_pending_bytes`): past the bound,
  pieces of later windows are skipped and read again (`reread_from`) once the
  held windows are published; what is known of the partitions' progress is then
  forgotten down to what is published, since it came partly from those records.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from core.columns import NativeWindowTallies
from core.window_value import (
    DEFAULT_MAX_PROFILES,
    PROFILE_FIELDS,
    ClosedWindow,
    WindowRenderError,
    WindowTallies,
    iso_utc,
    render_window_value,
)
from merging.parts import PartOrigin, PartPiece, Progress

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
    size: int = 0  # bytes of the pieces received (the merger's memory bound)

    def add(self, piece: PartPiece, offset: int, size: int) -> int:
        """Returns the bytes it now holds more (0 for a second copy of a piece)."""
        if self.min_offset is None or offset < self.min_offset:
            self.min_offset = offset
        if piece.piece in self.received:
            return 0  # a second copy (a producer retry) changes nothing
        self.received[piece.piece] = piece
        self.size += size
        return size

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
    rendered: tuple[tuple, ClosedWindow] | None = None  # (what it was rendered from, the result)

    def min_offset(self) -> int | None:
        offsets = [
            p.min_offset for p in (*self.winners.values(), *self.assembling.values()) if p.min_offset is not None
        ]
        return min(offsets) if offsets else None

    def size(self) -> int:
        return sum(p.size for p in (*self.winners.values(), *self.assembling.values()))

    def waits_for_a_part(self) -> bool:
        """Some partition began a part of this window and completed none (a partition's
        other parts are dropped once it has a complete one)."""
        return bool(self.assembling)

    def has_content(self) -> bool:
        return any(part.holds_anything() for part in self.winners.values())


class Verdict(Enum):
    """What `MergeState.add` did with a record (the merger counts the skipped kinds)."""

    MERGED = "merged"  # taken into the merge (or a harmless repeat of what it holds)
    OTHER_PIPELINE = "other_pipeline"  # another group's or input's record: skipped
    SETTINGS_MISMATCH = "settings_mismatch"  # made under other window-shaping settings: held, not merged
    BEYOND_BOUND = "beyond_bound"  # a window past the memory bound: skipped now, read again later
    MISALIGNED = "misaligned"  # not aligned to this merge's windows (a publisher of an older release)
    LATE_PARTITION = "late_partition"  # a new partition's part of a published window: counted as late


@dataclass(frozen=True, slots=True)
class SettingsConflict:
    """A partition whose records were made under other window-shaping settings."""

    partition: int
    offset: int  # of its first such record: nothing is committed past it
    theirs: tuple[tuple[str, int], ...]  # the settings that differ, their values
    ours: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        mine = dict(self.ours)
        return ", ".join(f"{name}={value} (this merger: {mine[name]})" for name, value in self.theirs)


@dataclass(frozen=True, slots=True)
class Publishing:
    """What a window handed to the producer is published with (its output headers)."""

    partition_count: int  # the input partitions it was merged from
    # Per input partition, every record below this offset of a window up to this one is
    # counted in a part merged by now (where the parts said).
    accounted: dict[int, int]


# Defaults of the merger's memory bound (merging/merger.py passes the settings).
DEFAULT_MAX_PENDING_WINDOWS = 64
DEFAULT_MAX_PENDING_BYTES = 512 * 1024 * 1024


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
        origin: PartOrigin | None = None,
        published_until: int | None = 0,
        max_pending_windows: int = DEFAULT_MAX_PENDING_WINDOWS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.window_seconds = window_seconds
        self.top_ips = top_ips
        self.max_distinct_per_window = max_distinct_per_window
        self.max_profiles_per_window = max_profiles_per_window
        # This merger's pipeline and settings (None: take every record, for tests of the rules).
        self._origin = origin
        self.max_pending_windows = max_pending_windows
        self.max_pending_bytes = max_pending_bytes
        self._partition_count = 0
        self._closed_until: dict[int, int] = {}
        self._windows: dict[int, _Window] = {}
        self._bytes = 0
        # None until the merger has read the output tail: nothing is due nor committed before.
        self._published_until: int | None = published_until
        # (end of a published window, the input partition count it was merged with), in order.
        self._published_counts: list[tuple[int, int]] = []
        self._next_offset: int | None = None
        self._newest_part_end: int | None = None
        self._conflicts: dict[int, SettingsConflict] = {}
        # The memory bound: windows starting at or after `_horizon` are not held; their
        # pieces are read again from `_reread_from` once the held windows are published.
        self._horizon: int | None = None
        self._reread_from: int | None = None
        # Counts of a new partition's parts of windows already published, for the next
        # window published (and the partials offset they hold until then).
        self._late_carry = 0
        self._invalid_carry = 0
        self._carry_offset: int | None = None
        # (window, partition) counted so: a few per partition added, kept for good.
        self._carried: set[tuple[int, int]] = set()
        # The window handed to the producer and not yet acknowledged, and the input
        # partition count it was merged with (the merger publishes one at a time).
        self._in_flight: tuple[int, int] | None = None
        # Per input partition, the highest offset its records say it is accounted to
        # (PartPiece.accounted_to): published with each window, so that a processor that
        # takes the partition over skips exactly the records the windows counted.
        self._accounted: dict[int, int] = {}

    # ---- input ----------------------------------------------------------------------

    def restore_published_until(
        self, window_end: int, partition_count: int | None = None, accounted: dict[int, int] | None = None
    ) -> None:
        """Every window ending at or before `window_end` is on the output topic already
        (its tail says so; `partition_count`: the input partitions it was merged with,
        and `accounted` the offsets its partitions were accounted to, if the record
        says): its parts are ignored and it is never published again."""
        for partition, offset in (accounted or {}).items():
            self._accounted[partition] = max(self._accounted.get(partition, -1), offset)
        self._published_until = max(self._published_until or 0, window_end)
        if partition_count:
            self._note_published_count(window_end, partition_count)
        for start in [s for s in self._windows if s + self.window_seconds <= self._published_until]:
            self._forget(start)

    @property
    def knows_published_until(self) -> bool:
        return self._published_until is not None

    def add(self, record: PartPiece | Progress, offset: int, size: int = 0) -> Verdict:
        """Take one partials record, read at `offset` (`size`: its bytes, for the bound)."""
        if self._next_offset is None or offset >= self._next_offset:
            self._next_offset = offset + 1
        verdict = self._check_origin(record, offset)
        if verdict is not None:
            return verdict
        self._partition_count = max(self._partition_count, record.partition_count)
        if record.accounted_to > self._accounted.get(record.partition, -1):
            self._accounted[record.partition] = record.accounted_to
        if isinstance(record, Progress):
            self._advance(record.partition, record.closed_until)
            verdict = Verdict.MERGED
        else:
            verdict = self._add_piece(record, offset, size)
        self._drop_settled_without_content()
        return verdict

    def _check_origin(self, record: PartPiece | Progress, offset: int) -> Verdict | None:
        """Another pipeline's record, or one made under other settings: a verdict. None: merge it.

        A settings conflict blocks its partition (its parts are not merged, so the
        windows wait) and holds the commit at its first record, until a later record of
        that partition agrees with this merger: its owner was restarted with our
        settings, and will publish the held windows' records again (they were not
        committed: input offsets wait for their windows to be published)."""
        ours, theirs = self._origin, record.origin
        if ours is None or not theirs.known:
            return None  # an older release's record: taken as this pipeline's (upgrades)
        if (theirs.input_topic, theirs.group) != (ours.input_topic, ours.group):
            return Verdict.OTHER_PIPELINE
        differing = tuple(
            (name, value) for name, value in sorted(theirs.shaping.items()) if ours.shaping.get(name, value) != value
        )
        partition = record.partition
        if differing:
            if partition not in self._conflicts:
                mine = tuple((name, ours.shaping[name]) for name, _ in differing)
                self._conflicts[partition] = SettingsConflict(partition, offset, differing, mine)
            return Verdict.SETTINGS_MISMATCH
        self._conflicts.pop(partition, None)
        return None

    def _add_piece(self, piece: PartPiece, offset: int, size: int) -> Verdict:
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
            return Verdict.MISALIGNED
        end = start + width
        self._newest_part_end = end if self._newest_part_end is None else max(self._newest_part_end, end)
        if self._in_flight is not None and self._in_flight[0] == start:
            return self._published_window_part(piece, offset, merged_with=self._in_flight[1])
        window = self._windows.get(start)
        if window is None:
            if self._published_until is not None and end <= self._published_until:
                return self._published_window_part(piece, offset)
            if self._horizon is not None and start >= self._horizon:
                return self._skip_beyond_bound(offset)
            if self._over_bound(size):
                self._make_room(start)
                if self._horizon is not None and start >= self._horizon:
                    return self._skip_beyond_bound(offset)
            window = self._windows[start] = _Window(start)
        if partition in window.winners:
            return Verdict.MERGED  # the (window, partition) already has its part: this is a replay
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
            return Verdict.MERGED
        self._bytes += part.add(piece, offset, size)
        if part.complete():
            window.winners[partition] = window.assembling.pop(key)
            for other in [k for k in window.assembling if k[0] == partition]:  # never to win now
                self._bytes -= window.assembling.pop(other).size
            self._advance(partition, end)
        return Verdict.MERGED

    def _published_window_part(self, piece: PartPiece, offset: int, merged_with: int | None = None) -> Verdict:
        """A piece of a window already published (or in flight, merged from `merged_with`
        partitions): a replay, unless its partition was added to the input after the
        window was merged. Then its records were never counted: they count as late, in
        the next window published (never dropped unseen)."""
        if merged_with is None:
            merged_with = self._count_published_with(piece.window_start + self.window_seconds)
        if piece.partition < merged_with:
            return Verdict.MERGED  # a replay of what the window holds
        if piece.piece == 0:  # the additive counts ride in piece 0
            # Once per (window, partition), whatever its part id: a part made again (its
            # maker crashed before committing, another member read the records again)
            # is a replay of the same records.
            seen = (piece.window_start, piece.partition)
            if seen not in self._carried:
                self._carried.add(seen)
                self._late_carry += piece.message_count + piece.late_message_count
                self._invalid_carry += piece.invalid_message_count
                if self._carry_offset is None:
                    self._carry_offset = offset
        return Verdict.LATE_PARTITION

    def _count_published_with(self, window_end: int) -> int:
        """The input partition count a published window was merged with (as far as known:
        windows published before this merger took over count with the newest known)."""
        for end, count in self._published_counts:
            if window_end <= end:
                return count
        return self._published_counts[-1][1] if self._published_counts else self._partition_count

    def _note_published_count(self, window_end: int, partition_count: int) -> None:
        counts = self._published_counts
        if counts and counts[-1][1] == partition_count:
            counts[-1] = (max(window_end, counts[-1][0]), partition_count)
        else:
            counts.append((window_end, partition_count))
        del counts[:-64]  # counts only grow; a few transitions are all there ever are

    # ---- the memory bound -----------------------------------------------------------

    def _over_bound(self, size: int) -> bool:
        return len(self._windows) >= self.max_pending_windows or self._bytes + size > self.max_pending_bytes

    def _make_room(self, start: int) -> None:
        """A new window `start` would pass the bound: let go of the newest windows held
        after it (their pieces are read again later), or, if it is the newest, of it."""
        newer = sorted((s for s in self._windows if s > start), reverse=True)
        while newer and self._over_bound(0):
            evicted = newer.pop(0)
            offset = self._windows[evicted].min_offset()
            self._forget(evicted)
            self._horizon = evicted if self._horizon is None else min(self._horizon, evicted)
            if offset is not None:
                self._reread_from = offset if self._reread_from is None else min(self._reread_from, offset)
        if self._over_bound(0):
            self._horizon = start if self._horizon is None else min(self._horizon, start)

    def _skip_beyond_bound(self, offset: int) -> Verdict:
        self._reread_from = offset if self._reread_from is None else min(self._reread_from, offset)
        return Verdict.BEYOND_BOUND

    def reread_from(self) -> int | None:
        """Where the merger must seek to read again the pieces it skipped past the bound:
        set once every window it held is published (None: go on reading).

        What is known of the partitions' progress is forgotten down to what is
        published, because some of it came from records after that offset: reading
        them again says it again (a partition's part always precedes its progress)."""
        if self._reread_from is None or self._windows or self._published_until is None:
            return None
        offset, self._reread_from, self._horizon = self._reread_from, None, None
        self._closed_until = {p: min(t, self._published_until) for p, t in self._closed_until.items()}
        self._next_offset = offset
        return offset

    def is_bounded(self) -> bool:
        """Windows past the bound are being skipped (to be read again)."""
        return self._horizon is not None

    def _forget(self, start: int) -> None:
        window = self._windows.pop(start, None)
        if window is not None:
            self._bytes -= window.size()

    # ---- progress --------------------------------------------------------------------

    def _advance(self, partition: int, closed_until: int) -> None:
        if closed_until > self._closed_until.get(partition, 0):
            self._closed_until[partition] = closed_until

    def _all_closed_until(self) -> int | None:
        """The end of the newest window every input partition has closed (None: not known).
        A partition in a settings conflict has closed nothing this merger can use."""
        count = self._partition_count
        if count == 0 or any(p not in self._closed_until or p in self._conflicts for p in range(count)):
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
            self._forget(start)

    # ---- output ---------------------------------------------------------------------

    def due_windows(self) -> list[ClosedWindow]:
        """The windows not yet marked published that every partition has closed, with
        no part of them still incomplete, oldest first (stopping at the first window
        that waits). Changes nothing that counts: call it again and the same windows come back
        (rendered once: a window's value is kept while its winning parts stay the
        same). `WindowRenderError` if a value cannot be made, with nothing changed.
        Nothing is due before the merger knows what the output topic holds.
        """
        closed = self._all_closed_until()
        if closed is None or self._published_until is None:
            return []
        width = self.window_seconds
        due = []
        for start in sorted(s for s in self._windows if s + width <= closed):
            window = self._windows[start]
            if window.waits_for_a_part():
                break  # and so do the windows after it
            if window.has_content():
                due.append(self._rendered(window, carry=not due))
        return due

    def next_due(self) -> ClosedWindow | None:
        """The oldest due window (the merger publishes one at a time, in order)."""
        due = self.due_windows()
        return due[0] if due else None

    def _rendered(self, window: _Window, carry: bool) -> ClosedWindow:
        late_carry, invalid_carry = (self._late_carry, self._invalid_carry) if carry else (0, 0)
        made_from = (tuple(sorted((p, part.part_id) for p, part in window.winners.items())), late_carry, invalid_carry)
        if window.rendered is not None and window.rendered[0] == made_from:
            return window.rendered[1]
        tallies = MergedTallies(self.max_distinct_per_window, self.max_profiles_per_window)
        invalid, late = invalid_carry, late_carry
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

    def start_publishing(self, start: int) -> Publishing:
        """Window `start` (from `next_due`) is handed to the producer: from now on its
        value is fixed. Returns what is published with it: the input partition count it
        was merged with, which it is recorded with when acknowledged (`mark_published`),
        however late that comes, and which a part of it from a partition added since is
        judged by (late, not lost); and the offsets its partitions are accounted to."""
        self._in_flight = (start, self._partition_count)
        count = self._partition_count
        return Publishing(count, {p: a for p, a in sorted(self._accounted.items()) if p < count})

    def publishing_failed(self, start: int) -> None:
        """The broker refused window `start`: it stays due, and is rendered anew."""
        if self._in_flight is not None and self._in_flight[0] == start:
            self._in_flight = None

    def mark_published(self, starts: list[int] | tuple[int, ...] | set[int]) -> None:
        """The broker acknowledged these windows: drop them; published-until becomes the
        highest end. Only these are dropped: a window the broker refused stays due. The
        oldest one took the late counts carried from new partitions, if any."""
        starts = sorted(starts)
        count = self._partition_count
        for start in starts:
            window = self._windows.get(start)
            if window is not None and window.rendered is not None and window.rendered[0][1:] != (0, 0):
                self._late_carry = self._invalid_carry = 0
                self._carry_offset = None
            self._forget(start)
            if self._in_flight is not None and self._in_flight[0] == start:
                count = self._in_flight[1]  # what it was merged with, not what is known now
                self._in_flight = None
        if starts:
            end = starts[-1] + self.window_seconds
            self._published_until = max(self._published_until or 0, end)
            if count:
                self._note_published_count(end, count)

    def committable_offset(self) -> int | None:
        """The partials offset the merger may commit: the lowest piece an unpublished
        window still holds (or a record it must read again, or the first record of a
        settings conflict), else one past the last record added (None before any, or
        while the output's tail is not known). Progress holds nothing: publishers send
        it again as their watermarks move."""
        if self._published_until is None:
            return None
        held = [offset for w in self._windows.values() if (offset := w.min_offset()) is not None]
        held += [conflict.offset for conflict in self._conflicts.values()]
        held += [offset for offset in (self._reread_from, self._carry_offset) if offset is not None]
        return min(held) if held else self._next_offset

    # ---- introspection for logs and metrics ----------------------------------------------

    @property
    def partition_count(self) -> int:
        return self._partition_count

    @property
    def published_until(self) -> int:
        """Every window ending at or before this is on the output topic (0: none known)."""
        return self._published_until or 0

    def closed_until(self) -> dict[int, int]:
        return dict(self._closed_until)

    def newest_part_end(self) -> int | None:
        """The newest window end of any part added: merge lag = this - published_until."""
        return self._newest_part_end

    def pending_windows(self) -> int:
        return len(self._windows)

    def pending_bytes(self) -> int:
        return self._bytes

    def conflicts(self) -> list[SettingsConflict]:
        """Partitions whose records were made under other settings, by partition."""
        return [self._conflicts[p] for p in sorted(self._conflicts)]

    def holding_partitions(self) -> list[int]:
        """The input partitions the next window waits on: those not heard from yet (or in
        a settings conflict), else those that have closed the fewest windows."""
        count = self._partition_count
        missing = [p for p in range(count) if p not in self._closed_until or p in self._conflicts]
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
