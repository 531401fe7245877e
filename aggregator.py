"""Event-time tumbling windows over login events. Pure: no Kafka in here.

Vocabulary (Kafka Streams'): a *tumbling window* of `window_seconds`, aligned to
the epoch; *stream time* per input partition is the highest event time seen in
it; the *watermark* is the lowest stream time over the partitions that still
have input to read, minus the *grace period* (`allowed_lateness_seconds`). When
every partition is caught up, the watermark follows the wall clock instead, so
a quiet stream still closes its last window. A window is *closed* once the
watermark is at or past its end; a record for a closed window is *late*.

Two threads share one `Aggregator`: the poll loop calls `add_batch` once per
partition run of a consumed batch (so the lock is taken per batch, never per
record), and the timer thread calls `close_due_windows`. The clock is injected
so that tests decide what "now" is.

Offsets: every open window remembers, per partition, the lowest offset of a
record it holds. `committable_offsets` gives, per partition, the lowest offset
still needed by a window that is open or closed but not yet acknowledged by the
broker; committing exactly that is what makes a crash lose nothing.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from parsing import LoginColumns, NativeBatch, NativeWindowTallies

SCHEMA_VERSION = 1
DEFAULT_MAX_DISTINCT = 1_000_000  # device ids / IPs kept per window (MAX_DISTINCT_PER_WINDOW)
# (device type, app version, locale) combinations kept per window. Real traffic has a
# few hundred; a client sending random values must not grow a window without limit,
# and 10,000 combinations of 256-character values still render well under the output
# topic's 16 MB message limit.
DEFAULT_MAX_PROFILES = 10_000
# The output fields that become lower bounds when combinations are left out.
PROFILE_FIELDS = ("device_counts", "locale_counts", "app_version_by_device", "missing_field_counts")
UNKNOWN = "unknown"
MISSING = ""  # how parsing marks a missing string field
_encode = msgspec.json.Encoder().encode


def iso_utc(epoch_seconds: int) -> str:
    """`2026-11-25T19:00:00Z`: the window key format of the output topic."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _by_count(counts: Counter) -> dict:
    """Counts ordered by count descending, then key ascending: deterministic bytes."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _top_by_count(counts: Counter, n: int) -> list[tuple[str, int]]:
    """The n largest counts (ties by key ascending) without sorting every key: a window
    can hold tens of thousands of IPs, and a full sort cost ~35 ms of the timer's GIL."""
    items = counts.items()
    if len(counts) > n:
        threshold = heapq.nlargest(n, counts.values())[-1]
        items = [item for item in items if item[1] >= threshold]
    return heapq.nsmallest(n, items, key=lambda item: (-item[1], item[0]))


def _add_bounded(keys: set, values: list[str], bound: int) -> bool:
    """Add values (but not MISSING) to `keys` while it holds fewer than `bound`;
    True if any was left out."""
    left_out = False
    for value in values:
        if value in keys or value == MISSING:
            continue
        if len(keys) >= bound:
            left_out = True
            continue
        keys.add(value)
    return left_out


def _count_bounded(counts: Counter, values: list, bound: int, skip: object = MISSING) -> bool:
    """Count values (but not `skip`) already in `counts`, and new ones while it holds
    fewer than `bound`; True if any was left out."""
    left_out = False
    for value in values:
        if value == skip:
            continue
        if value not in counts and len(counts) >= bound:
            left_out = True
            continue
        counts[value] += 1
    return left_out


def _with_unknown(counts: Counter) -> Counter:
    """Missing values are counted under `"unknown"` (merging with a literal "unknown")."""
    if MISSING not in counts:
        return counts
    renamed = Counter(counts)
    renamed[UNKNOWN] += renamed.pop(MISSING)
    return renamed


class WindowTallies:
    """One window's counts from `LoginColumns`: the pure-Python twin of the native
    `_login_columns.WindowTallies` (which counts a `NativeBatch` without the GIL).
    Same methods, same answers; the tests hold the two to the same window values.

    At most `max_distinct` device ids and IPs, and `max_profiles` (device type, app
    version, locale) combinations, are kept: one window flooded with new values (a
    botnet, a bug upstream) must not exhaust memory, and a crash there would repeat
    on every replay. Past a bound, new values are left out (the record still counts
    in `message_count`) and `capped()` names the output fields that are lower bounds.
    """

    __slots__ = (
        "message_count",
        "_profiles",
        "_device_ids",
        "_ips",
        "_missing",
        "_capped",
        "_max_distinct",
        "_max_profiles",
    )

    def __init__(self, max_distinct: int, max_profiles: int | None = None) -> None:
        self.message_count = 0
        # (device_type, app_version, locale) -> n: one counter update per batch instead
        # of three; the per-field counts are summed from it when the window closes.
        self._profiles: Counter = Counter()
        self._device_ids: set[str] = set()
        self._ips: Counter = Counter()
        self._missing: Counter = Counter()
        self._capped: set[str] = set()
        self._max_distinct = max_distinct
        self._max_profiles = max_profiles  # None: no bound (like the native twin's default)

    def add(self, batch: LoginColumns, low: int, high: int) -> int:
        """Count the rows with low <= event time < high, in bulk (C-level updates)."""
        columns = batch.between(low, high)
        count = len(columns)
        self.message_count += count
        profiles = self._max_profiles
        if profiles is None or len(self._profiles) + count <= profiles:
            self._profiles.update(columns.profile)
        elif _count_bounded(self._profiles, columns.profile, profiles, skip=None):
            self._capped.update(PROFILE_FIELDS)
        bound = self._max_distinct
        if len(self._device_ids) + count <= bound:
            self._device_ids.update(columns.device_id)
            self._device_ids.discard(MISSING)
        elif _add_bounded(self._device_ids, columns.device_id, bound):
            self._capped.add("unique_device_count")
        if len(self._ips) + count <= bound:
            self._ips.update(columns.ip)
            self._ips.pop(MISSING, None)
        elif _count_bounded(self._ips, columns.ip, bound):
            self._capped.update(("unique_ip_count", "top_ips"))
        # Missing device types, locales and app versions are in the profiles (as "");
        # `to_value` reads them from there. The others:
        missing = self._missing
        missing["ip"] += columns.ip.count(MISSING)
        missing["device_id"] += columns.device_id.count(MISSING)
        missing["user_id"] += len(columns.user_id_missing)
        missing["timestamp"] += len(columns.timestamp_fallbacks)
        return count

    def profile_counts(self) -> dict[tuple[str, str, str], int]:
        return dict(self._profiles)

    def unique_device_count(self) -> int:
        return len(self._device_ids)

    def unique_ip_count(self) -> int:
        return len(self._ips)

    def top_ips(self, n: int) -> list[tuple[str, int]]:
        return _top_by_count(self._ips, n)

    def missing_counts(self) -> dict[str, int]:
        return dict(self._missing)

    def capped(self) -> set[str]:
        return set(self._capped)

    def device_ids(self) -> set[str]:
        return set(self._device_ids)

    def ip_counts(self) -> dict[str, int]:
        return dict(self._ips)


def tallies_for(
    batch: LoginColumns | NativeBatch, max_distinct: int, max_profiles: int = DEFAULT_MAX_PROFILES
) -> WindowTallies:
    """The tallies that count this kind of batch."""
    if type(batch) is LoginColumns:
        return WindowTallies(max_distinct, max_profiles)
    return NativeWindowTallies(max_distinct, max_profiles)


_EMPTY = WindowTallies(0)


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


class WindowRenderError(Exception):
    """A closed window's value could not be made. A bug, not bad input (parsing checks
    every value): raised before any state changed, so the window and the offsets it
    holds stay where they were, and the processor stops without committing."""

    def __init__(self, start: int) -> None:
        super().__init__(f"the value of window {iso_utc(start)} could not be rendered")
        self.start = start


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

    def to_value(self, window_seconds: int, top_ips: int, carried: CarriedCounts | None = None) -> bytes:
        """The window's JSON value, with the `carried` counts it is about to absorb: a
        pure function of its records (same bytes every time). Changes nothing."""
        return render_window_value(
            self.start,
            self.tallies or _EMPTY,
            self.invalid_message_count + (carried.invalid_message_count if carried else 0),
            self.late_message_count + (carried.late_message_count if carried else 0),
            window_seconds,
            top_ips,
        )


def render_window_value(
    start: int, tallies: WindowTallies, invalid: int, late: int, window_seconds: int, top_ips: int
) -> bytes:
    """The contract's JSON value of one window from anything with the `WindowTallies`
    reading methods (one window's tallies, or the merge of its per-partition parts)."""
    device_counts: Counter = Counter()
    locale_counts: Counter = Counter()
    version_counts: Counter = Counter()
    versions: dict[str, Counter] = {}
    for (device, version, locale), count in tallies.profile_counts().items():
        device_counts[device] += count
        locale_counts[locale] += count
        version_counts[version] += count
        versions.setdefault(device or UNKNOWN, Counter())[version or UNKNOWN] += count
    missing = Counter(tallies.missing_counts()) + Counter(
        device_type=device_counts[MISSING],
        locale=locale_counts[MISSING],
        app_version=version_counts[MISSING],
    )
    value = {
        "schema_version": SCHEMA_VERSION,
        "window_start": iso_utc(start),
        "window_end": iso_utc(start + window_seconds),
        "message_count": tallies.message_count,
        "device_counts": _by_count(_with_unknown(device_counts)),
        "locale_counts": _by_count(_with_unknown(locale_counts)),
        "unique_device_count": tallies.unique_device_count(),
        "app_version_by_device": {device: _by_count(versions[device]) for device in sorted(versions)},
        "unique_ip_count": tallies.unique_ip_count(),
        "top_ips": [{"ip": ip, "count": count} for ip, count in tallies.top_ips(top_ips)],
        "missing_field_counts": _by_count(missing),
        "invalid_message_count": invalid,
        "late_message_count": late,
    }
    capped = tallies.capped()
    if capped:  # only past a bound: normal windows keep the contract's shape
        value["capped_counts"] = sorted(capped)
    return _encode(value)


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """A window ready to publish: its start, key and value."""

    start: int
    key: bytes
    value: bytes


@dataclass(slots=True)
class PartitionProgress:
    """What the aggregator knows of one assigned input partition."""

    stream_time: int | None = None  # highest event time seen
    caught_up: bool = False  # read to its end and nothing newer since
    next_offset: int | None = None  # offset after the last record handed to add_batch


class Aggregator:
    """Windows, watermark and commit bookkeeping, shared by the poll loop and the timer.

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
        self._windows: dict[int, WindowAggregate] = {}
        # Late and invalid counts waiting for the next window published.
        self._carry = CarriedCounts()
        # Closed, handed to the publisher, not yet acknowledged: still hold offsets.
        self._unacknowledged: dict[int, WindowAggregate] = {}
        self._partitions: dict[int, PartitionProgress] = {}
        self._total_partitions = 0
        # Every window ending at or before this is closed; records for them are late.
        self._closed_until = 0
        # Windows ending at or before this were published before this run (or before
        # the last rebalance): their replayed records are skipped, not counted as late.
        self._replayed_until = 0

    # ---- partitions -------------------------------------------------------------

    def assign(
        self, partitions: Iterable[int], total_partitions: int, start_offsets: dict[int, int] | None = None
    ) -> None:
        """The consumer now owns `partitions` of a topic that has `total_partitions`,
        and will read each from `start_offsets` (its committed offset), where known.

        Until a processor owns every partition it cannot know that a window is
        complete, so the watermark holds (see README: one processor per group).
        """
        start_offsets = start_offsets or {}
        with self._lock:
            for partition in partitions:
                self._partitions.setdefault(partition, PartitionProgress(next_offset=start_offsets.get(partition)))
            self._total_partitions = total_partitions

    def revoke_all(self) -> None:
        """Forget everything not yet closed; it will be replayed from the committed offsets.

        Call only after the unacknowledged windows are acknowledged (or given up).
        Windows closed so far count as published: their replayed records are skipped.
        """
        with self._lock:
            self._windows.clear()
            self._carry = CarriedCounts()
            self._partitions.clear()
            self._replayed_until = self._closed_until

    def restore_published_until(self, window_end: int) -> None:
        """An earlier run already published every window ending at or before `window_end`."""
        with self._lock:
            self._closed_until = max(self._closed_until, window_end)
            self._replayed_until = max(self._replayed_until, window_end)

    def mark_caught_up(self, partition: int, next_offset: int) -> None:
        """The consumer reached the end of `partition`: it no longer holds the watermark."""
        with self._lock:
            progress = self._partitions.get(partition)
            if progress is not None:
                progress.caught_up = True
                progress.next_offset = next_offset

    def mark_active(self, partition: int) -> None:
        """`partition` has records not handed over yet: it holds the watermark again."""
        with self._lock:
            progress = self._partitions.get(partition)
            if progress is not None:
                progress.caught_up = False

    def _owns_all(self) -> bool:
        return self._total_partitions > 0 and len(self._partitions) >= self._total_partitions

    # ---- input ------------------------------------------------------------------

    def add_batch(
        self,
        partition: int,
        first_offset: int,
        next_offset: int,
        batch: LoginColumns | NativeBatch,
        invalid_times: Iterable[int] = (),
    ) -> int:
        """Fold one partition's run of consecutive records into the windows.

        `invalid_times` are the Kafka timestamps (epoch seconds) of the run's
        invalid records. Offsets held are `first_offset` for every window the run
        touches: lower than strictly needed at most by one batch, which replay
        after a crash corrects (records of published windows are skipped).
        Returns how many valid records were late.
        """
        width = self.window_seconds
        with self._lock:
            progress = self._partitions.get(partition)
            if progress is None:  # revoked while the batch was in flight
                return 0
            progress.caught_up = False
            progress.next_offset = next_offset
            late = 0
            if len(batch):
                newest = batch.newest_time()
                if progress.stream_time is None or newest > progress.stream_time:
                    progress.stream_time = newest
                # Per window the batch touches (one or two, usually), not per record.
                for start, count in sorted(batch.window_counts(width).items()):
                    window = self._window_for(start, partition, first_offset)
                    if window is not None:
                        window.add_rows(
                            batch, start, start + width, self.max_distinct_per_window, self.max_profiles_per_window
                        )
                    elif start + width > self._replayed_until:  # else a replay of a published window
                        self._carry.late_message_count += count
                        self._carry.hold_offset(partition, first_offset)
                        late += count
            for seconds in invalid_times:
                window = self._window_for(seconds - seconds % width, partition, first_offset)
                if window is not None:
                    window.invalid_message_count += 1
                elif seconds - seconds % width + width > self._replayed_until:
                    self._carry.invalid_message_count += 1
                    self._carry.hold_offset(partition, first_offset)
            return late

    def _window_for(self, start: int, partition: int, first_offset: int) -> WindowAggregate | None:
        """The open window starting at `start` (opened if need be), or None if it is closed."""
        if start + self.window_seconds <= self._closed_until:
            return None
        window = self._windows.get(start)
        if window is None:
            window = self._windows[start] = WindowAggregate(start=start)
        window.hold_offset(partition, first_offset)
        return window

    # ---- closing ------------------------------------------------------------------

    def watermark(self) -> int | None:
        """The stream's watermark now, or None while it cannot be known."""
        with self._lock:
            return self._watermark()

    def _watermark(self) -> int | None:
        if not self._owns_all():
            return None
        active = [p for p in self._partitions.values() if not p.caught_up]
        if not active:
            return int(self.clock()) - self.allowed_lateness_seconds
        if any(p.stream_time is None for p in active):
            return None  # a partition not read yet may hold anything
        return min(p.stream_time for p in active) - self.allowed_lateness_seconds

    def close_due_windows(self) -> list[ClosedWindow]:
        """Close every window the watermark has passed, oldest first.

        Every value is rendered before any state changes: if one cannot be, nothing
        moves and `WindowRenderError` is raised (a bug the processor must stop on,
        never a window that silently disappears). The returned windows hold their
        offsets until `acknowledge` is called with them: until the broker has them,
        their records must stay uncommitted.
        """
        with self._lock:
            watermark = self._watermark()
            if watermark is None:
                return []
            width = self.window_seconds
            closed_until = max(self._closed_until, watermark - watermark % width)
            due = sorted(start for start in self._windows if start + width <= closed_until)
            closed = []
            for start in due:  # the oldest takes the carried counts
                carried = self._carry if start == due[0] else None
                try:
                    value = self._windows[start].to_value(width, self.top_ips, carried)
                except Exception as error:
                    raise WindowRenderError(start) from error
                closed.append(ClosedWindow(start=start, key=iso_utc(start).encode(), value=value))
            self._closed_until = closed_until
            if not due:
                return []
            windows = [self._windows.pop(start) for start in due]
            windows[0].absorb(self._carry)
            self._carry = CarriedCounts()
            for window in windows:
                self._unacknowledged[window.start] = window
            return closed

    def acknowledge(self, starts: Iterable[int]) -> None:
        """The broker has these windows: their records no longer need replaying."""
        with self._lock:
            for start in starts:
                self._unacknowledged.pop(start, None)

    def committable_offsets(self) -> dict[int, int]:
        """Per partition, the offset to commit: the lowest one any unpublished state needs."""
        with self._lock:
            holders = [*self._windows.values(), *self._unacknowledged.values(), self._carry]
            offsets: dict[int, int] = {}
            for partition, progress in self._partitions.items():
                if progress.next_offset is None:
                    continue
                held = [w.min_offsets[partition] for w in holders if partition in w.min_offsets]
                offsets[partition] = min(held) if held else progress.next_offset
            return offsets

    # ---- introspection for logs and metrics ------------------------------------------

    def open_window_count(self) -> int:
        with self._lock:
            return len(self._windows)

    def partition_summary(self) -> dict[int, PartitionProgress]:
        with self._lock:
            return {
                p: PartitionProgress(v.stream_time, v.caught_up, v.next_offset) for p, v in self._partitions.items()
            }
