"""The partials topic's records: per-partition parts of windows, and progress. Pure: no Kafka.

When several processors share the input topic, each closes windows per input
partition and publishes, for every (window, partition) it closes, that
partition's exact *part* of the window; one merger sums the parts once every
partition has closed the window (merging/merge.py). *Progress* records say "partition p
has closed every window ending at or before t", so that an idle partition never
holds a window.

Format: MessagePack (msgspec), each record an array whose first two elements are
its tag ("part" or "progress") and `PARTS_FORMAT_VERSION`. Leading with both is
what lets a decoder tell a record of another format version from a damaged one,
whatever that version's layout is.

Evolution: a field added at the *end* of a record keeps the version, because a
reader of the same version ignores trailing elements it does not know (msgspec's
array-like structs do) and a writer of the previous release's records leaves them
out (they decode to their defaults). That is how the pipeline identity and the
window-shaping settings (`PartOrigin`) were added, so that a group can be upgraded
one member at a time from the release before them. The version changes only for a
layout older readers cannot read; a merger that meets a newer version leaves the
merge to a member that knows it (merging/merger.py). A part larger than `max_bytes` (the broker's
message size) is split into *pieces*: the additive scalars (message, missing,
invalid and late counts) ride in piece 0 only, so that summing every piece of a
part counts them once; profiles, device ids and IP counts are spread over the
pieces (profiles first, so that they are all in piece 0 unless they alone fill
it). Every value is sorted, so the same content always gives the same bytes
(apart from the part id).
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from itertools import accumulate
from typing import Protocol

import msgspec

from core.columns import packed_entry_ends, unpack_device_ids, unpack_ip_counts
from core.errors import PipelineError
from core.window_value import iso_utc

PARTS_FORMAT_VERSION = 2  # 2: device ids and IP counts travel packed (core.columns.pack_*)
# Below this a piece might not hold one profile of three 256-character values (up to
# 4 bytes each in UTF-8) next to the piece's own fields: a piece must always make progress.
MIN_PIECE_BYTES = 4096
_MAX_PIECES = 2**32 - 1  # the widest integer a piece number is sized for (5 bytes)
_LIST_HEADER_SLACK = 4  # an empty array's header is 1 byte, a long one's up to 5


class PartOrigin(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Whose a partials record is and under which settings it was made.

    `input_topic` and `group` name the pipeline: a merger skips another pipeline's
    records (a shared or reused partials topic). `shaping` holds the settings that
    shape a window's value (config.Settings.window_shaping): a merger never merges a
    part made under other settings than its own. Records of the release before these
    fields decode with them empty: unknown, taken as this pipeline's and this merger's.
    """

    input_topic: str = ""
    group: str = ""
    shaping: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def known(self) -> bool:
        return bool(self.group)

    def describe(self) -> str:
        return f"input {self.input_topic!r}, group {self.group!r}" if self.known else "an older release"


UNKNOWN_ORIGIN = PartOrigin()


class PartialRecordError(PipelineError, ValueError):
    """A partials-topic record this merger cannot use."""


class BadPartialRecord(PartialRecordError):
    """Not a record of any format (damaged, or not written by a publisher): the merger
    logs it and skips it."""


class UnknownPartFormat(PartialRecordError):
    """A record of a newer format version than this merger reads. Skipping it would
    publish windows without that publisher's parts, so the merger must not treat it as
    damage: it leaves the merge to a member that reads it."""

    def __init__(self, version: object) -> None:
        super().__init__(
            f"partials record of format version {version!r}, newer than this processor's {PARTS_FORMAT_VERSION}"
        )
        self.version = version


class ObsoletePartFormat(BadPartialRecord):
    """A record of a format older than the previous release's: no member of a group
    upgraded one release at a time can still be writing it."""

    def __init__(self, version: object) -> None:
        super().__init__(
            f"partials record of format version {version!r}, older than this processor reads ({PARTS_FORMAT_VERSION})"
        )
        self.version = version


class PartPiece(msgspec.Struct, tag="part", array_like=True, frozen=True, gc=False):
    """One piece of one publication (`part_id`) of a partition's part of a window."""

    version: int
    part_id: str
    window_start: int
    partition: int
    partition_count: int
    piece: int
    pieces: int
    message_count: int
    profiles: list[tuple[str, str, str, int]]  # (device_type, app_version, locale, n); "" = missing
    # Chunks of packed values (core.columns.pack_device_ids / pack_ip_counts), each a
    # whole number of entries: moved and merged without a Python object per value.
    packed_device_ids: list[bytes]
    packed_ip_counts: list[bytes]
    missing: dict[str, int]  # user_id / device_id / ip / timestamp; zeros left out
    capped: list[str]  # the part's tallies' capped(): output fields that are lower bounds
    invalid_message_count: int
    late_message_count: int
    # Added at the end (see "Evolution" above): empty in the previous release's records.
    origin: PartOrigin = UNKNOWN_ORIGIN
    # Added at the end: every record of `partition` at an offset below this whose window
    # ends at or before this part's window end is counted in this part or in one
    # published before it (-1: not said, an older release). A processor that takes the
    # partition over, or restarts, skips exactly those as replays (see `Progress`).
    accounted_to: int = -1

    @property
    def device_ids(self) -> list[str]:
        """The piece's device ids, unpacked (for tests and debugging)."""
        return [value for chunk in self.packed_device_ids for value in unpack_device_ids(chunk)]

    @property
    def ip_counts(self) -> list[tuple[str, int]]:
        """The piece's (ip, count) pairs, unpacked (for tests and debugging)."""
        return [item for chunk in self.packed_ip_counts for item in unpack_ip_counts(chunk)]

    def __post_init__(self) -> None:
        _check_partition(self.partition, self.partition_count)
        if not 0 <= self.piece < self.pieces:
            raise ValueError(f"piece {self.piece} of {self.pieces}")
        if min(self.message_count, self.invalid_message_count, self.late_message_count) < 0:
            raise ValueError("negative count")


class Progress(msgspec.Struct, tag="progress", array_like=True, frozen=True, gc=False):
    """Partition `partition` has closed every window ending at or before `closed_until`."""

    version: int
    partition: int
    partition_count: int
    closed_until: int
    origin: PartOrigin = UNKNOWN_ORIGIN  # added at the end, like PartPiece.origin
    # Added at the end: every record of `partition` at an offset below this whose window
    # ends at or before `closed_until` is counted in a part published before this record
    # (-1: not said). Records of those windows at or after it were not counted: late.
    accounted_to: int = -1

    def __post_init__(self) -> None:
        _check_partition(self.partition, self.partition_count)


def _check_partition(partition: int, partition_count: int) -> None:
    if not 0 <= partition < partition_count:
        raise ValueError(f"partition {partition} of {partition_count}")


PartialRecord = PartPiece | Progress
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(PartialRecord).decode
_decode_any = msgspec.msgpack.Decoder().decode


class ReadableTallies(Protocol):
    """The `WindowTallies` reading API (the pure `core.window_value.WindowTallies`, the native
    `_login_columns.WindowTallies` and `merge.MergedTallies` all have it)."""

    message_count: int

    def profile_counts(self) -> dict[tuple[str, str, str], int]: ...
    def device_ids(self) -> set[str]: ...
    def ip_counts(self) -> dict[str, int]: ...
    def missing_counts(self) -> dict[str, int]: ...
    def capped(self) -> set[str]: ...
    def pack_values(self) -> tuple[bytes, bytes]: ...


# ---- sizes -------------------------------------------------------------------------
# Exact MessagePack sizes of the values a piece holds, so that a part is cut into
# pieces from the lengths alone instead of by encoding and retrying.


# Whole columns at a time: a part can hold a hundred thousand values, and the timer
# thread that encodes it holds the GIL the poll loop needs.


def _str_sizes(values: list[str]) -> list[int]:
    ascii_only = "".join(values).isascii()  # nearly always: one C pass, then lengths are byte counts
    lengths = list(map(len, values)) if ascii_only else [len(value.encode()) for value in values]
    return [n + 1 if n < 32 else n + 2 if n < 256 else n + 3 if n < 65536 else n + 5 for n in lengths]


def _uint_sizes(values: list[int]) -> list[int]:
    return [
        1 if 0 <= n < 128 else 2 if 0 <= n < 256 else 3 if 0 <= n < 65536 else 5 if 0 <= n < 2**32 else 9
        for n in values
    ]


def _profile_sizes(items: list[tuple[str, str, str, int]]) -> list[int]:
    if not items:
        return []
    devices, versions, locales, counts = zip(*items, strict=True)
    columns = zip(_str_sizes(devices), _str_sizes(versions), _str_sizes(locales), _uint_sizes(counts), strict=True)
    return [1 + d + v + loc + n for d, v, loc, n in columns]


def _cuts(sizes: list[int], room: int, budget: int) -> tuple[list[int], int]:
    """Where to cut a list of items of these sizes into consecutive runs: the first run
    fills the `room` left in the current piece, the others a whole `budget` each.
    Returns the end index of each run and the room left after the last one."""
    totals = [0, *accumulate(sizes)]
    ends: list[int] = []
    start = 0
    while start < len(sizes):
        end = bisect_right(totals, totals[start] + room, lo=start) - 1
        if end == start:  # not even the next item fits
            if room == budget:
                raise ValueError(f"a value of {sizes[start]} bytes cannot fit in a piece of {budget} bytes")
            if not ends:  # the current piece gets nothing of this list
                ends.append(start)
            room = budget  # the next run starts a new piece
            continue
        ends.append(end)
        room -= totals[end] - totals[start]
        start = end
    return ends, room


def _split(lists: list[tuple[list, list[int]]], budget: int) -> list[list[list]]:
    """Spread the (items, sizes) lists over pieces of at most `budget` bytes of items,
    in order: piece k gets, of each list, the items that fall in it."""
    pieces: list[list[list]] = [[[] for _ in lists]]
    room = budget
    for index, (items, sizes) in enumerate(lists):
        ends, room_after = _cuts(sizes, room, budget)
        start = 0
        for run, end in enumerate(ends):
            if run > 0:
                pieces.append([[] for _ in lists])
            pieces[-1][index] = items[start:end]
            start = end
        room = room_after
    return pieces


# ---- encoding ------------------------------------------------------------------------


def encode_part(
    window_start: int,
    partition: int,
    partition_count: int,
    tallies: ReadableTallies | None,
    invalid: int,
    late: int,
    max_bytes: int,
    part_id: str | None = None,
    origin: PartOrigin = UNKNOWN_ORIGIN,
    accounted_to: int = -1,
) -> list[bytes]:
    """One publication of `partition`'s part of a window, as pieces of at most `max_bytes`.

    `tallies` is None for a part that only carries invalid/late counts. A part is
    split, never refused: however many values it holds, each piece fits the broker's
    message size. `part_id` (a fresh uuid4 by default) tells this publication from a
    replay of the same (window, partition), which the merger must not add twice.
    """
    if max_bytes < MIN_PIECE_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_PIECE_BYTES}, not {max_bytes}")
    part_id = uuid.uuid4().hex if part_id is None else part_id
    if tallies is None:
        message_count, profiles, devices, ips, missing, capped = 0, [], b"", b"", {}, []
    else:
        message_count = tallies.message_count
        profiles = sorted((d, v, locale, n) for (d, v, locale), n in tallies.profile_counts().items())
        # Packed by the tallies themselves (in C on the native path, without the GIL),
        # in table order: the merge unions and sums them, so order changes nothing.
        devices, ips = tallies.pack_values()
        missing = {name: n for name, n in sorted(tallies.missing_counts().items()) if n}
        capped = sorted(tallies.capped())

    def piece(number: int, pieces: int, content: list[list], first: bool) -> PartPiece:
        return PartPiece(
            version=PARTS_FORMAT_VERSION,
            part_id=part_id,
            window_start=window_start,
            partition=partition,
            partition_count=partition_count,
            piece=number,
            pieces=pieces,
            message_count=message_count if first else 0,
            profiles=content[0],
            packed_device_ids=content[1],
            packed_ip_counts=content[2],
            missing=missing if first else {},
            capped=capped if first else [],
            invalid_message_count=invalid if first else 0,
            late_message_count=late if first else 0,
            origin=origin,
            accounted_to=accounted_to,
        )

    # The usual part fits in one piece: no sizes to work out.
    device_chunks = [devices] if devices else []
    ip_chunks = [ips] if ips else []
    if len(devices) + len(ips) <= max_bytes:
        whole = _encode(piece(0, 1, [profiles, device_chunks, ip_chunks], first=True))
        if len(whole) <= max_bytes:
            return [whole]
    # The widest piece's own fields (piece 0's counts, the widest piece numbers) with
    # empty lists: what any piece holds besides its items.
    widest = piece(_MAX_PIECES - 1, _MAX_PIECES, [[], [], []], first=True)
    overhead = len(_encode(widest)) + 3 * _LIST_HEADER_SLACK
    budget = max_bytes - overhead
    # Packed values cut between entries into chunks of at most 1/64 of a piece, which
    # the split below places like any other item (so a piece is filled to within a
    # chunk of the bound).
    device_chunks = _cut_packed(devices, False, max(budget // 64, 64))
    ip_chunks = _cut_packed(ips, True, max(budget // 64, 64))
    content = _split(
        [
            (profiles, _profile_sizes(profiles)),
            (device_chunks, [len(chunk) + _BIN_HEADER for chunk in device_chunks]),
            (ip_chunks, [len(chunk) + _BIN_HEADER for chunk in ip_chunks]),
        ],
        budget,
    )
    encoded = [_encode(piece(number, len(content), lists, number == 0)) for number, lists in enumerate(content)]
    oversized = [len(data) for data in encoded if len(data) > max_bytes]
    if oversized:  # the sizes above are exact: this is a bug, never send such a piece
        raise AssertionError(f"pieces of {oversized} bytes exceed max_bytes {max_bytes}")
    return encoded


# MessagePack's largest bin header.
_BIN_HEADER = 5


def _cut_packed(packed: bytes, with_counts: bool, limit: int) -> list[bytes]:
    """Packed values in chunks of at most `limit` bytes, cut between entries."""
    if not packed:
        return []
    if len(packed) <= limit:
        return [packed]
    chunks, start, last = [], 0, 0
    for end in packed_entry_ends(packed, with_counts):
        if end - start > limit and last > start:
            chunks.append(packed[start:last])
            start = last
        last = end
    chunks.append(packed[start:])
    return chunks


def encode_progress(
    partition: int,
    partition_count: int,
    closed_until: int,
    origin: PartOrigin = UNKNOWN_ORIGIN,
    accounted_to: int = -1,
) -> bytes:
    """Partition `partition` has closed every window ending at or before `closed_until`:
    the merger need not wait for its parts of those windows any longer."""
    return _encode(Progress(PARTS_FORMAT_VERSION, partition, partition_count, closed_until, origin, accounted_to))


def decode_partial(data: bytes) -> PartPiece | Progress:
    """A partials-topic record; `UnknownPartFormat` for a newer format version,
    `ObsoletePartFormat` for an older one, `BadPartialRecord` for anything else that
    is not a record."""
    try:
        record = _decode(data)
    except (msgspec.DecodeError, TypeError) as error:
        version = _version_of(data)
        if version is not None and version != PARTS_FORMAT_VERSION:
            raise _other_version(version) from error
        raise BadPartialRecord(f"not a partials record: {error}") from error
    if record.version != PARTS_FORMAT_VERSION:
        raise _other_version(record.version)
    return record


def _other_version(version: int) -> PartialRecordError:
    return UnknownPartFormat(version) if version > PARTS_FORMAT_VERSION else ObsoletePartFormat(version)


def _version_of(data: bytes) -> int | None:
    """The format version a record claims, read without its layout (None if it claims none)."""
    try:
        value = _decode_any(data)
    except (msgspec.DecodeError, TypeError):
        return None
    if isinstance(value, list) and len(value) >= 2 and value[0] in ("part", "progress"):
        version = value[1]
        if type(version) is int:
            return version
    return None


# ---- keys (informational: the partials topic has one partition) -----------------------


def part_key(window_start: int, partition: int) -> bytes:
    """b"2026-11-25T19:00:00Z/3": which window and partition, for people reading the topic."""
    return f"{iso_utc(window_start)}/{partition}".encode()


def progress_key(partition: int) -> bytes:
    """b"progress/3"."""
    return f"progress/{partition}".encode()
