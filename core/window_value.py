"""The value of one window: its tallies, how it is rendered to the contract's JSON,
and the output key's time format both ways. Pure: no Kafka, no clock.

Ground floor: the aggregator (one partition's windows) and the merge (every
partition's parts of a window) both make a window's value with
`render_window_value`, so that one processor and many give the same bytes; the
broker side and the operators' tools read keys back with `epoch_of`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from core.columns import (
    LoginColumns,
    NativeBatch,
    NativeWindowTallies,
    pack_device_ids,
    pack_ip_counts,
    unpack_device_ids,
    unpack_ip_counts,
)
from core.errors import PipelineError

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


def epoch_of(iso: str) -> int:
    """`2026-11-25T19:00:00Z` -> epoch seconds: the inverse of `iso_utc`."""
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


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

    def pack_values(self) -> tuple[bytes, bytes]:
        """(device ids, ip counts) packed for a part, the native twin's bytes."""
        return pack_device_ids(self._device_ids), pack_ip_counts(self._ips)

    def add_packed(self, device_ids: bytes, ip_counts: bytes) -> None:
        """Union packed values in (a merge of parts), bounded like `add`."""
        if _add_bounded(self._device_ids, unpack_device_ids(device_ids), self._max_distinct):
            self._capped.add("unique_device_count")
        counts = unpack_ip_counts(ip_counts)
        left_out = False
        for ip, n in counts:
            if ip not in self._ips and len(self._ips) >= self._max_distinct:
                left_out = True
                continue
            self._ips[ip] += n
        if left_out:
            self._capped.update(("unique_ip_count", "top_ips"))


def tallies_for(
    batch: LoginColumns | NativeBatch, max_distinct: int, max_profiles: int = DEFAULT_MAX_PROFILES
) -> WindowTallies:
    """The tallies that count this kind of batch."""
    if type(batch) is LoginColumns:
        return WindowTallies(max_distinct, max_profiles)
    return NativeWindowTallies(max_distinct, max_profiles)


class WindowRenderError(PipelineError):
    """A closed window's value could not be made. A bug, not bad input (parsing checks
    every value): raised before any state changed, so the window and the offsets it
    holds stay where they were, and the processor stops without committing."""

    def __init__(self, start: int) -> None:
        super().__init__(f"the value of window {iso_utc(start)} could not be rendered")
        self.start = start


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
