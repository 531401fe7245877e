"""Event-time tumbling windows over login events, per input partition. Pure: no Kafka.

Vocabulary (Kafka Streams'): a *tumbling window* of `window_seconds`, aligned to
the epoch; *stream time* of an input partition is the highest event time seen in
it; its *watermark* is its stream time minus the *grace period*
(`allowed_lateness_seconds`), or, once the partition is caught up (read to its
end), never less than the wall clock minus the grace period, so that a quiet or
empty partition holds nothing back. A watermark never moves back. A window is
*closed on a partition* once that partition's watermark is at or past its end; a
record for a window already closed on its partition is *late*.

Why per partition: a processor may own only some partitions (several processors
share one consumer group), and even one owning all of them receives a backlog in
large per-partition chunks. Each (window, partition) is closed on its own and
becomes a *part* (see merging/parts.py); the merge (merging/merge.py) publishes a window once
every partition has closed it, summing the parts into the same value one
processor counting everything would give.

Two threads share one `Aggregator`: the poll loop calls `add_batch` once per
partition run of a consumed batch (so the lock is taken per batch, never per
record), and the timer thread calls `close_due_parts`. The clock is injected so
that tests decide what "now" is.

Offsets: every open (window, partition) remembers the lowest offset of a record
it holds. `committable_offsets` gives, per partition, the lowest offset still
needed by a part that is open, or closed and not yet acknowledged by the broker, or
acknowledged but of a window not yet published (the output topic says what is:
`release_published`). Committing exactly that is what makes a crash lose nothing,
and what lets a member restarted with corrected settings count again the records
whose parts the merger refused (merging/merge.py).

"Caught up" is as of a time: the poll loop confirms that a partition is read to its
end (`mark_caught_up(..., at=now)`), and the watermark's clock part is that time, not
the timer's own clock. A member paused for a while (a stopped process, a starved
machine) therefore never closes windows on records it has not read yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from core.columns import LoginColumns, NativeBatch
from core.window_value import (
    DEFAULT_MAX_DISTINCT,
    DEFAULT_MAX_PROFILES,
    WindowRenderError,
    WindowTallies,
    tallies_for,
)


def _hold(min_offsets: dict[int, int], partition: int, offset: int) -> None:
    held = min_offsets.get(partition)
    if held is None or offset < held:
        min_offsets[partition] = offset


@dataclass(slots=True)
class CarriedCounts:
    """Late and invalid records waiting for the next window that closes, and the
    offsets they hold until that window is acknowledged."""

    invalid_message_count: int = 0
    late_message_count: int = 0
    min_offsets: dict[int, int] = field(default_factory=dict)

    def hold_offset(self, partition: int, offset: int) -> None:
        _hold(self.min_offsets, partition, offset)


@dataclass(slots=True, eq=False)
class WindowAggregate:
    """Everything one window has accumulated: its tallies (made on its first record),
    the invalid and late records carried into it, and the offsets it holds."""

    start: int
    tallies: WindowTallies | None = None
    invalid_message_count: int = 0
    late_message_count: int = 0
    # partition -> lowest offset of a record counted here (for commits)
    min_offsets: dict[int, int] = field(default_factory=dict)

    def hold_offset(self, partition: int, offset: int) -> None:
        _hold(self.min_offsets, partition, offset)

    def add_rows(
        self, batch: LoginColumns | NativeBatch, low: int, high: int, max_distinct: int, max_profiles: int
    ) -> None:
        """Count the batch's rows with low <= event time < high."""
        if self.tallies is None:
            self.tallies = tallies_for(batch, max_distinct, max_profiles)
        self.tallies.add(batch, low, high)

    def absorb(self, carried: CarriedCounts) -> None:
        """Take over the carried late/invalid counts and the offsets they hold."""
        self.invalid_message_count += carried.invalid_message_count
        self.late_message_count += carried.late_message_count
        for partition, offset in carried.min_offsets.items():
            self.hold_offset(partition, offset)


@dataclass(slots=True)
class PartitionProgress:
    """What the aggregator knows of one assigned input partition."""

    stream_time: int | None = None  # highest event time seen
    caught_up: bool = False  # read to its end and nothing newer since
    next_offset: int | None = None  # offset after the last record handed to add_batch
    caught_up_at: float | None = None  # when the poll loop last found it read to its end


@dataclass(slots=True, eq=False)
class PartitionWindows:
    """One input partition's open windows, watermark and carried counts."""

    progress: PartitionProgress
    windows: dict[int, WindowAggregate] = field(default_factory=dict)
    carry: CarriedCounts = field(default_factory=CarriedCounts)
    watermark: int | None = None  # never moves back
    # Every window ending at or before this is closed on this partition.
    closed_until: int = 0
    # Windows ending at or before this were published before this partition was
    # assigned: their records below `replayed_below` (the offset the output says the
    # windows' parts counted up to; None: not said, every offset) are replays, skipped;
    # those at or after it were never counted, and count as late.
    replayed_until: int = 0
    replayed_below: int | None = None

    def is_replay(self, window_end: int, offset: int) -> bool:
        """Whether records of the window ending at `window_end`, read from `offset` on
        (a run that does not straddle `replayed_below`), were counted already."""
        return window_end <= self.replayed_until and (self.replayed_below is None or offset < self.replayed_below)

    def advance_watermark(self, lateness: int) -> int | None:
        """The watermark now (and remembered: it never moves back): the stream time
        minus the lateness, and, once caught up, never behind the time it was last found
        read to its end minus the lateness."""
        progress = self.progress
        candidate = None
        if progress.stream_time is not None:
            candidate = progress.stream_time - lateness
        if progress.caught_up and progress.caught_up_at is not None:
            clock = int(progress.caught_up_at) - lateness
            candidate = clock if candidate is None else max(candidate, clock)
        if candidate is not None and (self.watermark is None or candidate > self.watermark):
            self.watermark = candidate
        return self.watermark

    def take_due(self, closed_until: int, width: int) -> list[WindowAggregate]:
        """Remove and return the open windows ending at or before `closed_until`, oldest
        first; the oldest takes over the carried counts."""
        due = sorted(start for start in self.windows if start + width <= closed_until)
        if not due:
            return []
        windows = [self.windows.pop(start) for start in due]
        windows[0].absorb(self.carry)
        self.carry = CarriedCounts()
        return windows

    def accounted_to(self, partition: int) -> int | None:
        """After a close: every record of this partition below the returned offset whose
        window is closed here (ends at or before `closed_until`) is counted in a part
        closed by now. That is every record read, but those carried (late or invalid
        records waiting for the next window with content, which holds none since they
        came): read again, they are counted again. None while where it is read from is
        unknown."""
        read_to = self.progress.next_offset
        if read_to is None:
            return None
        carried = self.carry.min_offsets.get(partition)
        return read_to if carried is None else min(read_to, carried)

    def held_offsets(self, partition: int) -> list[int]:
        """The offsets of `partition` its open windows and carried counts still need."""
        holders = [*self.windows.values(), self.carry]
        return [h.min_offsets[partition] for h in holders if partition in h.min_offsets]


@dataclass(frozen=True, slots=True)
class ClosedPart:
    """One window closed on one partition, ready to be published as a part: the
    window's aggregate (its tallies and its invalid/late counts, carried ones
    included). `pieces` is the part's encoding, made before anything changed."""

    partition: int
    start: int
    pieces: list[bytes]


@dataclass(frozen=True, slots=True)
class ClosedParts:
    """What one `close_due_parts` call closed: the parts, oldest first per partition,
    and each owned partition's progress (every window ending at or before it is
    closed there) for the partitions whose progress moved; and, per partition with
    parts or progress here, the offset it is accounted to (`Aggregator.accounted_to`)."""

    parts: list[ClosedPart]
    progress: dict[int, int]
    partition_count: int = 0  # of the input topic, when they were closed
    accounted: dict[int, int] = field(default_factory=dict)


# (partition, start, window, accounted to) -> pieces
PartEncoder = Callable[[int, int, WindowAggregate, int], list[bytes]]


class Aggregator:
    """Windows per (window, partition), watermarks per partition, commit bookkeeping;
    shared by the poll loop and the timer.

    `clock` returns epoch seconds; tests inject a fake one.
    """

    def __init__(
        self,
        window_seconds: int,
        allowed_lateness_seconds: int,
        top_ips: int,
        clock: Callable[[], float] = time.time,
        max_distinct_per_window: int = DEFAULT_MAX_DISTINCT,
        max_profiles_per_window: int = DEFAULT_MAX_PROFILES,
    ) -> None:
        self.window_seconds = window_seconds
        self.allowed_lateness_seconds = allowed_lateness_seconds
        self.top_ips = top_ips
        self.max_distinct_per_window = max_distinct_per_window
        self.max_profiles_per_window = max_profiles_per_window
        self.clock = clock
        self._lock = threading.Lock()
        self._partitions: dict[int, PartitionWindows] = {}
        # Closed, handed to the publisher, not yet acknowledged: still hold offsets.
        self._unacknowledged: dict[tuple[int, int], WindowAggregate] = {}
        # Acknowledged parts of windows not yet published: (partition, start) -> the
        # lowest offset of the part's records, held until the window is on the output.
        self._awaiting_publication: dict[tuple[int, int], int] = {}
        self.total_partitions = 0
        # Windows ending at or before this are on the output topic already, merged with
        # this many input partitions (None: not said, an older release's record), their
        # parts having counted each partition's records up to these offsets (where said).
        self._published_until = 0
        self._published_partition_count: int | None = None
        self._published_accounted: dict[int, int] = {}

    # ---- partitions -------------------------------------------------------------

    def assign(
        self, partitions: Iterable[int], total_partitions: int, start_offsets: dict[int, int] | None = None
    ) -> None:
        """The consumer now owns `partitions` (too) of a topic that has `total_partitions`,
        and will read each from `start_offsets` (its committed offset), where known."""
        start_offsets = start_offsets or {}
        with self._lock:
            for partition in partitions:
                if partition not in self._partitions:
                    # A partition added to the input after the newest published window
                    # was merged is in none of the published windows: its records of
                    # them are neither replays nor this member's to count as late. It
                    # makes parts of those windows as of any other, and the merger counts
                    # each (window, partition) late once, however many members make it
                    # (merging/merge.py): counted late here too, a member replaying the
                    # partition after a crash would count them twice.
                    count = self._published_partition_count
                    published = self._published_until if count is None or partition < count else 0
                    self._partitions[partition] = PartitionWindows(
                        PartitionProgress(next_offset=start_offsets.get(partition)),
                        closed_until=published,
                        replayed_until=published,
                        replayed_below=self._published_accounted.get(partition),
                    )
            self.total_partitions = total_partitions

    def set_start_offset(self, partition: int, offset: int) -> None:
        """Where `partition` is read from (its committed offset), learnt after `assign`
        (the look-up failed then): only while nothing of it has been read."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is not None and state.progress.next_offset is None:
                state.progress.next_offset = offset

    def revoke(self, partitions: Iterable[int] | None = None) -> None:
        """Forget these partitions (None: every one) and what is open, closed or held on
        them: the next owner (maybe us) rebuilds it from the committed offsets. Call
        only after what could be committed was."""
        with self._lock:
            gone = set(self._partitions) if partitions is None else set(partitions)
            for partition in gone:
                self._partitions.pop(partition, None)
            for held in (self._unacknowledged, self._awaiting_publication):
                for key in [key for key in held if key[0] in gone]:
                    del held[key]

    def revoke_all(self) -> None:
        self.revoke(None)

    def restore_published_until(
        self, window_end: int, partition_count: int | None = None, accounted: dict[int, int] | None = None
    ) -> None:
        """Every window ending at or before `window_end` is published already (an
        earlier run, or another processor; merged with `partition_count` input
        partitions, if known; its parts having counted each partition's records below
        `accounted[partition]`, where said): on every partition it counts as closed,
        and replayed records of it are skipped (see `PartitionWindows.is_replay`).
        Acknowledged parts of those windows stop holding their offsets."""
        self.release_published(window_end, partition_count, accounted)
        with self._lock:
            for partition, state in self._partitions.items():
                state.closed_until = max(state.closed_until, window_end)
                state.replayed_until = max(state.replayed_until, window_end)
                state.replayed_below = self._published_accounted.get(partition)

    def release_published(
        self, window_end: int, partition_count: int | None = None, accounted: dict[int, int] | None = None
    ) -> None:
        """The output topic now holds every window ending at or before `window_end`
        (merged with `partition_count` input partitions, and accounted to these offsets,
        if said): acknowledged parts of those windows stop holding their offsets, and
        partitions assigned from now on skip replayed records of them. Partitions owned
        already are left as they are: a record arriving there for a published window is
        late, not a replay."""
        with self._lock:
            if window_end > self._published_until:
                self._published_until = window_end
                self._published_accounted = dict(accounted or {})
                if partition_count is not None:
                    self._published_partition_count = partition_count
            width = self.window_seconds
            for key in [key for key in self._awaiting_publication if key[1] + width <= window_end]:
                del self._awaiting_publication[key]

    @property
    def published_until(self) -> int:
        with self._lock:
            return self._published_until

    def replay_boundary(self, partition: int) -> int | None:
        """The offset a run of `partition` must be split at before `add_batch` (records
        of published windows below it are replays, at or after it late), while any of its
        records can still be replays; None otherwise."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is None or not state.replayed_until:
                return None
            return state.replayed_below

    def mark_caught_up(self, partition: int, next_offset: int, at: float | None = None) -> None:
        """The consumer had read `partition` to its end at time `at` (epoch seconds; the
        injected clock when not given): its watermark follows that time."""
        at = self.clock() if at is None else at
        with self._lock:
            state = self._partitions.get(partition)
            if state is not None:
                state.progress.caught_up = True
                state.progress.next_offset = next_offset
                state.progress.caught_up_at = at

    def mark_active(self, partition: int) -> None:
        """`partition` has records not handed over yet: its stream time rules again."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is not None:
                state.progress.caught_up = False

    # ---- input ------------------------------------------------------------------

    def add_batch(
        self,
        partition: int,
        first_offset: int,
        next_offset: int,
        batch: LoginColumns | NativeBatch,
        invalid_times: Iterable[int] = (),
    ) -> int:
        """Fold one partition's run of consecutive records into its windows.

        `invalid_times` are the Kafka timestamps (epoch seconds) of the run's
        invalid records. Offsets held are `first_offset` for every window the run
        touches: lower than strictly needed at most by one batch, which replay
        after a crash corrects (parts already merged win over rebuilt ones).
        Returns how many valid records were late.
        """
        width = self.window_seconds
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:  # revoked while the batch was in flight
                return 0
            progress = state.progress
            progress.caught_up = False
            progress.next_offset = next_offset
            late = 0
            if len(batch):
                newest = batch.newest_time()
                if progress.stream_time is None or newest > progress.stream_time:
                    progress.stream_time = newest
                # Per window the batch touches (one or two, usually), not per record.
                for start, count in sorted(batch.window_counts(width).items()):
                    window = self._window_for(state, start, partition, first_offset)
                    if window is not None:
                        window.add_rows(
                            batch, start, start + width, self.max_distinct_per_window, self.max_profiles_per_window
                        )
                    elif not state.is_replay(start + width, first_offset):  # else counted already
                        state.carry.late_message_count += count
                        state.carry.hold_offset(partition, first_offset)
                        late += count
            for seconds in invalid_times:
                start = seconds - seconds % width
                window = self._window_for(state, start, partition, first_offset)
                if window is not None:
                    window.invalid_message_count += 1
                elif not state.is_replay(start + width, first_offset):
                    state.carry.invalid_message_count += 1
                    state.carry.hold_offset(partition, first_offset)
            if state.replayed_below is not None and next_offset >= state.replayed_below:
                state.replayed_until = 0  # read past what was counted: no replay any more
            return late

    def _window_for(
        self, state: PartitionWindows, start: int, partition: int, first_offset: int
    ) -> WindowAggregate | None:
        """The partition's open window starting at `start` (opened if need be), or None
        if it is closed there."""
        if start + self.window_seconds <= state.closed_until:
            return None
        window = state.windows.get(start)
        if window is None:
            window = state.windows[start] = WindowAggregate(start=start)
        window.hold_offset(partition, first_offset)
        return window

    # ---- closing ------------------------------------------------------------------

    def watermark(self) -> int | None:
        """The lowest watermark over the owned partitions (None while one is unknown):
        for logs and metrics."""
        with self._lock:
            lateness = self.allowed_lateness_seconds
            marks = [state.advance_watermark(lateness) for state in self._partitions.values()]
            if not marks or any(mark is None for mark in marks):
                return None
            return min(marks)

    def close_due_parts(self, encode: PartEncoder) -> ClosedParts:
        """Close, on every owned partition, the windows its watermark has passed.

        Under the lock, only the bookkeeping: the due windows leave the open set for
        the unacknowledged one (their carried counts absorbed), where they hold their
        offsets until `acknowledge` is called with them. Then, without the lock (the
        poll loop goes on meanwhile: encoding a part reads every distinct value),
        `encode(partition, start, window, accounted_to)` makes each part's pieces. If one cannot be
        made, `WindowRenderError` is raised: a bug the processor must stop on. Its
        window is never acknowledged, so its records are never committed and the
        next run replays them: a part never silently disappears.
        """
        width = self.window_seconds
        with self._lock:
            if self.total_partitions <= 0:  # a part must say how many parts its window has
                return ClosedParts(parts=[], progress={}, partition_count=0)
            closing: list[tuple[int, WindowAggregate]] = []
            progress: dict[int, int] = {}
            for partition, state in sorted(self._partitions.items()):
                watermark = state.advance_watermark(self.allowed_lateness_seconds)
                if watermark is None:
                    continue
                closed_until = max(state.closed_until, watermark - watermark % width)
                if closed_until > state.closed_until:
                    state.closed_until = closed_until
                    progress[partition] = closed_until
                for window in state.take_due(closed_until, width):
                    self._unacknowledged[(partition, window.start)] = window
                    closing.append((partition, window))
            partition_count = self.total_partitions
            accounted = {}
            for partition in {p for p, _ in closing} | set(progress):
                offset = self._partitions[partition].accounted_to(partition)
                if offset is not None:
                    accounted[partition] = offset
        parts: list[ClosedPart] = []
        for partition, window in closing:
            try:
                pieces = encode(partition, window.start, window, accounted.get(partition, -1))
            except Exception as error:
                raise WindowRenderError(window.start) from error
            parts.append(ClosedPart(partition=partition, start=window.start, pieces=pieces))
        return ClosedParts(parts=parts, progress=progress, partition_count=partition_count, accounted=accounted)

    def acknowledge(self, keys: Iterable[tuple[int, int]]) -> None:
        """The broker has these (partition, window start) parts. Their records still need
        replaying if the merger never publishes the window (it refused the part, made
        under other settings, say): they hold their offsets until it is published."""
        width = self.window_seconds
        with self._lock:
            for key in keys:
                window = self._unacknowledged.pop(key, None)
                if window is None or key[1] + width <= self._published_until:
                    continue
                offset = window.min_offsets.get(key[0])
                if offset is not None:
                    self._awaiting_publication[key] = offset

    def committable_offsets(self) -> dict[int, int]:
        """Per partition, the offset to commit: the lowest one any unpublished state needs."""
        with self._lock:
            offsets: dict[int, int] = {}
            for partition, state in self._partitions.items():
                if state.progress.next_offset is None:
                    continue
                held = state.held_offsets(partition)
                held += [
                    w.min_offsets[partition]
                    for (p, _), w in self._unacknowledged.items()
                    if p == partition and partition in w.min_offsets
                ]
                held += [offset for (p, _), offset in self._awaiting_publication.items() if p == partition]
                offsets[partition] = min(held) if held else state.progress.next_offset
            return offsets

    def first_partition_closed_until(self) -> tuple[int, int, int | None] | None:
        """(partition, closed until, accounted to) of the lowest owned partition, None if
        none: what a progress record may say of it at any time."""
        with self._lock:
            if not self._partitions:
                return None
            partition = min(self._partitions)
            state = self._partitions[partition]
            return partition, state.closed_until, state.accounted_to(partition)

    # ---- introspection for logs and metrics ------------------------------------------

    def open_window_count(self) -> int:
        """Open (window, partition) pairs."""
        with self._lock:
            return sum(len(state.windows) for state in self._partitions.values())

    def partition_summary(self) -> dict[int, PartitionProgress]:
        with self._lock:
            return {
                p: PartitionProgress(s.progress.stream_time, s.progress.caught_up, s.progress.next_offset)
                for p, s in self._partitions.items()
            }
