"""The batch shapes every stage shares: one partition's parsed records as columns, and
the packed form a window's distinct values travel in. Pure: no Kafka, no clock.

Ground floor: parsing (ingest/parsing.py) makes these columns, the window value
(core/window_value.py) counts them, the parts (merging/parts.py) carry the packed
values. Two implementations with one meaning:

- `LoginColumns`, pure Python lists, and
- `NativeBatch`, the same rows as C structs, from the optional native module
  (native/login_columns.c, built by pip from ./native); None when it is not built.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

try:  # installed by pip from ./native (requirements.txt names it); optional: no compiler, no module
    import _login_columns as _native

    NativeBatch = _native.LoginBatch
    NativeWindowTallies = _native.WindowTallies  # counts a NativeBatch (see core/window_value.py)
except ImportError:  # pragma: no cover - depends on the build
    _native = None
    NativeBatch = NativeWindowTallies = None

NATIVE_PARSER_AVAILABLE = _native is not None

# The native module itself, for the parser's entry point (`parse_batch`); None without it.
NATIVE_MODULE = _native


@dataclass(slots=True)
class LoginColumns:
    """One partition's valid records of one batch, as parallel columns.

    `profile` holds each record's (device_type, app_version, locale): the key the
    aggregator counts by, so it is built once here instead of once per window
    update. `""` marks a missing string
    field. No aggregate reads `user_id` beyond whether it is missing, so only the
    rows where it is are kept (`user_id_missing`), not the values. Row lists
    (`user_id_missing`, `timestamp_fallbacks`, the rows whose event time came from
    the Kafka record timestamp) are in ascending order.
    """

    event_time: list[int]
    user_id_missing: list[int]
    profile: list[tuple[str, str, str]]
    ip: list[str]
    device_id: list[str]
    timestamp_fallbacks: list[int]

    def __len__(self) -> int:
        return len(self.event_time)

    def window_counts(self, width: int) -> dict[int, int]:
        """{window start: rows in it}, like `NativeBatch.window_counts`."""
        times = self.event_time
        if not times:
            return {}
        first = min(times)
        if first // width == max(times) // width:
            return {first - first % width: len(times)}
        return dict(Counter(seconds - seconds % width for seconds in times))

    def newest_time(self) -> int | None:
        return max(self.event_time) if self.event_time else None

    def between(self, low: int, high: int) -> LoginColumns:
        """The rows with low <= event time < high (all of them, usually: no copy)."""
        times = self.event_time
        if not times or (min(times) >= low and max(times) < high):
            return self
        if times == sorted(times):  # one partition's run in time order: two cuts
            return self.slice(bisect_left(times, low), bisect_left(times, high))
        return self.take([row for row, seconds in enumerate(times) if low <= seconds < high])

    def slice(self, start: int, end: int) -> LoginColumns:
        """Rows start..end-1, by slicing (C): a time-ordered batch split at window edges."""
        return LoginColumns(
            event_time=self.event_time[start:end],
            user_id_missing=[row - start for row in self.user_id_missing if start <= row < end],
            profile=self.profile[start:end],
            ip=self.ip[start:end],
            device_id=self.device_id[start:end],
            timestamp_fallbacks=[row - start for row in self.timestamp_fallbacks if start <= row < end],
        )

    def take(self, rows: list[int]) -> LoginColumns:
        """The subset of rows (in order), used when a batch spans several windows."""
        position = {row: i for i, row in enumerate(rows)}
        return LoginColumns(
            event_time=[self.event_time[r] for r in rows],
            user_id_missing=[position[r] for r in self.user_id_missing if r in position],
            profile=[self.profile[r] for r in rows],
            ip=[self.ip[r] for r in rows],
            device_id=[self.device_id[r] for r in rows],
            timestamp_fallbacks=[position[r] for r in self.timestamp_fallbacks if r in position],
        )


# Packed values, as the native module makes and reads them (login_columns.c): device
# ids as [u16 length][UTF-8 bytes]..., IPs as [u16 length][UTF-8 bytes][u64 count]...,
# little-endian. A part carries a window's distinct values this way, so that the
# native path moves them without a Python object per value.


def pack_device_ids(values: Iterable[str]) -> bytes:
    out = bytearray()
    for value in values:
        data = value.encode("utf-8")
        out += len(data).to_bytes(2, "little") + data
    return bytes(out)


def pack_ip_counts(counts: dict[str, int]) -> bytes:
    out = bytearray()
    for ip, n in counts.items():
        if not n:
            continue  # nothing to count (the native tables never hold one)
        data = ip.encode("utf-8")
        out += len(data).to_bytes(2, "little") + data + n.to_bytes(8, "little")
    return bytes(out)


def _entries(packed: bytes, count_bytes: int) -> list[tuple[str, int]]:
    """(value, count) of each packed entry; ValueError if the bytes are not entries."""
    entries, at, size = [], 0, len(packed)
    while at < size:
        if size - at < 2:
            raise ValueError("malformed packed values")
        length = int.from_bytes(packed[at : at + 2], "little")
        end = at + 2 + length
        if length == 0 or end + count_bytes > size:
            raise ValueError("malformed packed values")
        value = packed[at + 2 : end].decode("utf-8")
        n = int.from_bytes(packed[end : end + count_bytes], "little") if count_bytes else 1
        if n == 0:
            raise ValueError("malformed packed values")
        entries.append((value, n))
        at = end + count_bytes
    return entries


def unpack_device_ids(packed: bytes) -> list[str]:
    return [value for value, _ in _entries(packed, 0)]


def unpack_ip_counts(packed: bytes) -> list[tuple[str, int]]:
    return _entries(packed, 8)


def packed_entry_ends(packed: bytes, with_counts: bool) -> list[int]:
    """The offset after each entry (to cut packed values between entries)."""
    ends, at, size, extra = [], 0, len(packed), 8 if with_counts else 0
    while at < size:
        at += 2 + int.from_bytes(packed[at : at + 2], "little") + extra
        ends.append(at)
    return ends
