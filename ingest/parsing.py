"""Turn raw `user-login` record values into validated columns. Pure: no Kafka, no clock.

`parse_values` is the entry point. The processor's cost is per-record work, so
it has two implementations that give the same answer:

- native (`_login_columns`, built from native/login_columns.c): parses, in C and
  without the GIL, the strict JSON subset that nearly every record is written in
  (flat object, printable-ASCII strings without escapes, integers, literals) into
  C rows (`NativeBatch`), applying the contract's field rules there; every other
  record is *deferred* to the exact path below, one record at a time, and its
  values are set back into the batch. It never judges a record invalid itself.
- pure Python: one msgspec decode per record into a typed struct, so that
  msgspec checks in C that each string field is a string within the length
  bound and `timestamp` an integer; then whole-column work that runs in C
  (`map`, `min`, `max`, `list.index`). A record of any other shape is decoded
  again, generically, and gets the exact per-value rules of the contract.

The tests hold the typed path and the exact per-value rules to the same columns,
and the native path to the same window counts, on generated input.

Conventions of the pure path's columns: a string field that is missing (absent,
null, empty after trimming, or not a string) is the empty string `""` (a native
row marks it with length 0). The aggregator turns it into `"unknown"` for counts
and leaves it out of unique counts; `""` cannot be a real value because values
are trimmed.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from core.columns import NATIVE_MODULE as _native
from core.columns import LoginColumns, NativeBatch

NATIVE_PARSER_AVAILABLE = _native is not None

# Fields of a login event, in the order the reference generator writes them.
STRING_FIELDS = ("user_id", "app_version", "device_type", "ip", "locale", "device_id")
ALL_FIELDS = (*STRING_FIELDS, "timestamp")
MILLISECONDS_ABOVE = 10**12
_NUMERIC_STRING = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


class LoginRecord(msgspec.Struct, gc=False):
    """One decoded record. Fields are `object` because any JSON value may appear;
    the contract decides later what counts. Unknown keys are ignored."""

    user_id: object = None
    app_version: object = None
    device_type: object = None
    ip: object = None
    locale: object = None
    device_id: object = None
    timestamp: object = None


_decode = msgspec.json.Decoder(LoginRecord).decode


@functools.cache
def regular_record_type(max_field_length: int) -> type[msgspec.Struct]:
    """The shape almost every record has: each string field a string of at most
    `max_field_length` characters (or absent: `""`), `timestamp` an integer (or
    absent/null: None). msgspec checks all of that in C while decoding, so columns of
    these records need no per-value type or length checks. Any other record fails
    this decoder and takes the generic `LoginRecord` path (see `decode_records`)."""
    text = Annotated[str, msgspec.Meta(max_length=max_field_length)]
    fields = [(name, text, "") for name in STRING_FIELDS] + [("timestamp", int | None, None)]
    return msgspec.defstruct("RegularLoginRecord", fields, gc=False)


@functools.cache
def _regular_decoder(max_field_length: int) -> Callable[[bytes], msgspec.Struct]:
    return msgspec.json.Decoder(regular_record_type(max_field_length)).decode


@dataclass(frozen=True)
class InvalidRecord:
    """A record that is not a JSON object: where it was in the batch and why it was refused."""

    position: int
    reason: str


def decode_records(
    values: Sequence[bytes | None], max_field_length: int = 256
) -> tuple[list[msgspec.Struct], list[int] | None, list[InvalidRecord]]:
    """Decode each value as a JSON object.

    Returns the valid records, their positions in `values` (None when every value
    was valid, the common case, so no list is built), and the invalid ones. A
    record is a regular one (`regular_record_type`) when it has the usual shape,
    else a `LoginRecord` holding whatever JSON values it had.
    """
    records: list[msgspec.Struct] = []
    invalid: list[InvalidRecord] = []
    append = records.append
    decode_regular = _regular_decoder(max_field_length)
    for position, value in enumerate(values):
        try:
            append(decode_regular(value))
        except Exception:  # anything unusual, invalid records included: the exact path
            record = decode_exact(value)
            if isinstance(record, str):
                invalid.append(InvalidRecord(position, record))
            else:
                append(record)
    if not invalid:
        return records, None, invalid
    bad = {item.position for item in invalid}
    return records, [p for p in range(len(values)) if p not in bad], invalid


def decode_exact(value: bytes | None) -> LoginRecord | str:
    """One record with whatever JSON values it holds, or the reason it is invalid."""
    try:
        return _decode(value)
    except msgspec.ValidationError:
        # Valid JSON but not the shape msgspec maps: either not an object, or an
        # object with a number msgspec cannot hold (1e400). The slow decoder tells.
        return _decode_generic_object(value)
    except msgspec.DecodeError as error:
        return f"not valid JSON: {error}"
    except UnicodeDecodeError:
        return "not valid UTF-8"
    except TypeError:
        return "empty record (no value)"
    except RecursionError:
        return "JSON nested too deeply"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _decode_generic_object(value: bytes) -> LoginRecord | str:
    """The record, or the reason it is invalid."""
    try:  # strict like msgspec: NaN / Infinity are not JSON
        obj = json.loads(value, parse_constant=_reject_constant)
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as error:
        return f"not valid JSON: {error}"
    if type(obj) is not dict:
        return "not a JSON object"
    if _holds_lone_surrogate(obj):
        return LONE_SURROGATE
    return LoginRecord(**{name: obj.get(name) for name in ALL_FIELDS})


# msgspec refuses a lone surrogate escape ("\ud800") anywhere in a document, in a key or
# a value, used or not; json.loads accepts it. Records reach json.loads only after
# msgspec stopped at something else first (a number it cannot hold, 1e400), so without
# this rule a record's validity would depend on the order of its keys, and a value that
# cannot be written as UTF-8 would reach a window (and make it unpublishable).
LONE_SURROGATE = "not valid JSON: lone surrogate escape (a string that is not Unicode text)"


def _holds_lone_surrogate(obj: object) -> bool:
    """True if any key or string at any depth cannot be written as UTF-8. Walked with
    a stack, not recursion: json.loads accepts nesting up to the recursion limit."""
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
    return False


def event_time_of(value: object, kafka_seconds: float, max_skew_seconds: int) -> int | None:
    """Event time in whole epoch seconds, or None when `value` is not a usable time.

    Integers, floats and numeric strings count; above 10^12 they are
    milliseconds. Booleans, zero, negatives, NaN/inf and times more than the
    skew ahead of the record's own Kafka time (`kafka_seconds`, from
    `kafka_time_of`) are not times: one device with a wrong clock must not close
    every window early, and the rule is a function of the record, so a replay puts
    it in the same window as the first reading did.
    """
    kind = type(value)
    if kind is int:
        seconds = value
    elif kind is float:
        if not math.isfinite(value):
            return None
        seconds = value
    elif kind is str:
        text = value.strip()
        if not _NUMERIC_STRING.fullmatch(text):
            return None
        try:
            seconds = int(text)
        except ValueError:
            seconds = float(text)
            if not math.isfinite(seconds):
                return None
    else:  # bool, None, list, dict: not numbers
        return None
    if seconds > MILLISECONDS_ABOVE:
        seconds = seconds // 1000 if type(seconds) is int else seconds / 1000
    whole = math.floor(seconds)
    if whole <= 0 or whole > kafka_seconds + max_skew_seconds:
        return None
    return whole


def kafka_time_of(timestamp: tuple[int, int], now: float, max_skew_seconds: int) -> int:
    """A Kafka record's timestamp (`Message.timestamp()`: type, epoch ms) in epoch seconds,
    where the event time cannot be used (a record without one, an invalid record).

    The wall clock stands in when the record has no timestamp, and also when it is more
    than the skew ahead of `now`: a producer with a wrong clock must not move a
    partition's watermark into the future (every window on it would close early), nor
    open a far-future window for an invalid record (it would hold that partition's
    commits until the clock got there).
    """
    kind, millis = timestamp
    if kind == 0 or millis <= 0:  # TIMESTAMP_NOT_AVAILABLE
        return int(now)
    seconds = millis // 1000
    return seconds if seconds <= now + max_skew_seconds else int(now)


def event_times(
    timestamps: list[object],
    max_skew_seconds: int,
    kafka_time: Callable[[int], int],
) -> tuple[list[int], list[int]]:
    """Event times for a column of `timestamp` values.

    `kafka_time(index)` is the record's Kafka time (`kafka_time_of`): an event
    time may be at most the skew ahead of it, and a value that is not a usable
    time falls back to it. Returns the times and the indices that fell back, which
    count as a missing `timestamp`.

    Common case, in C: every value an int within range of the earliest Kafka time.
    Otherwise only the values that are not ints (string timestamps, nulls) are
    looked at one by one, unless an int is out of that range, which sends the
    whole column to the per-value rule.
    """
    if not timestamps:
        return [], []
    references = [kafka_time(index) for index in range(len(timestamps))]
    limit = min(references) + max_skew_seconds
    kinds = list(map(type, timestamps))
    odd = _positions_not_of(kinds, int)
    times = timestamps if not odd else timestamps.copy()
    for index in odd:
        times[index] = 1  # a placeholder in range, replaced below
    if min(times) <= 0 or max(times) > limit:
        odd = range(len(timestamps))  # an int out of range somewhere: the exact rule for all
        times = timestamps.copy()
    fell_back: list[int] = []
    for index in odd:
        seconds = event_time_of(timestamps[index], references[index], max_skew_seconds)
        if seconds is None:
            seconds = references[index]
            fell_back.append(index)
        times[index] = seconds
    return times, fell_back


def _positions_not_of(kinds: list[type], wanted: type) -> list[int]:
    """Indices whose type is not `wanted`, found with list.index (C) per other type."""
    other_kinds = set(kinds)
    other_kinds.discard(wanted)
    return sorted(position for kind in other_kinds for position in _positions_of(kinds, kind))


def _positions_of(column: list, wanted: object) -> list[int]:
    """Indices holding `wanted`, found with list.index (C)."""
    positions: list[int] = []
    index = -1
    try:
        while True:
            index = column.index(wanted, index + 1)
            positions.append(index)
    except ValueError:
        return positions


def clean_strings(column: list[object], max_length: int = 256) -> list[str]:
    """Trim each string; anything else, an empty string, or one longer than
    `max_length` after trimming becomes `""` (missing).

    The length bound keeps one client sending megabyte-long values from making a
    window's JSON too big to publish (see README, "Design choices"). Non-strings
    are found with list.index (C), so a few nulls do not cost a per-value loop.
    """
    if not column:
        return []
    odd = _positions_not_of(list(map(type, column)), str)
    if odd:
        column = column.copy()
        for index in odd:
            column[index] = ""
    cleaned = list(map(str.strip, column))
    if max(map(len, cleaned)) > max_length:
        cleaned = [value if len(value) <= max_length else "" for value in cleaned]
    return cleaned


def to_columns(
    records: list[msgspec.Struct],
    max_skew_seconds: int,
    kafka_time: Callable[[int], int],
    max_field_length: int = 256,
) -> LoginColumns:
    """Validate decoded records column by column (see the module docstring).

    String values of regular records are already known to be strings within the
    length bound, so they only need trimming; the few other records get the full
    per-value rule.
    """
    # List comprehensions, not map(attrgetter): on 3.11 they are twice as fast here.
    times, fell_back = event_times([r.timestamp for r in records], max_skew_seconds, kafka_time)
    irregular = _positions_not_of(list(map(type, records)), regular_record_type(max_field_length))
    if len(irregular) * 8 > len(records):  # mostly irregular (tests, odd producers): whole-column checks

        def clean(column: list[object]) -> list[str]:
            return clean_strings(column, max_field_length)
    else:

        def clean(column: list[object]) -> list[str]:
            for index in irregular:
                column[index] = _clean_string(column[index], max_field_length)
            return list(map(str.strip, column))

    device_type = clean([r.device_type for r in records])
    app_version = clean([r.app_version for r in records])
    locale = clean([r.locale for r in records])
    return LoginColumns(
        event_time=times,
        user_id_missing=_positions_of(clean([r.user_id for r in records]), ""),
        profile=list(zip(device_type, app_version, locale, strict=True)),
        ip=clean([r.ip for r in records]),
        device_id=clean([r.device_id for r in records]),
        timestamp_fallbacks=fell_back,
    )


def _clean_string(value: object, max_length: int) -> str:
    """`clean_strings`' rule for one value."""
    if type(value) is not str:
        return ""
    value = value.strip()
    return value if len(value) <= max_length else ""


def parse_values(
    values: list[bytes | None],
    now: float,
    max_skew_seconds: int,
    kafka_time: Callable[[int], int],
    max_field_length: int = 256,
    native: bool = True,
    messages: list | None = None,
) -> tuple[LoginColumns | NativeBatch, list[InvalidRecord]]:
    """The valid records among `values` (in order), and the invalid ones.

    The batch is a `NativeBatch` (C rows, no Python object per record) when the
    native module is built, else `LoginColumns`; the aggregator counts either into
    the matching `WindowTallies`. `kafka_time(position)` is the Kafka time of
    `values[position]` (`kafka_time_of`): an event time more than the skew ahead of
    it is not one, and a record without a usable event time falls back to it.
    `messages`, when given, are the consumed records themselves: the native parser
    reads their timestamps in C, without a Python call per record (same answer).
    `native=False` forces the pure-Python path (tests compare the two); without
    the native module it is always taken.
    """
    if native and _native is not None:
        return _parse_values_native(values, now, max_skew_seconds, kafka_time, max_field_length, messages)
    records, positions, invalid = decode_records(values, max_field_length)

    def valid_kafka_time(index: int) -> int:
        return kafka_time(index if positions is None else positions[index])

    return to_columns(records, max_skew_seconds, valid_kafka_time, max_field_length), invalid


def _parse_values_native(
    values: list[bytes | None],
    now: float,
    max_skew_seconds: int,
    kafka_time: Callable[[int], int],
    max_field_length: int,
    messages: list | None,
) -> tuple[NativeBatch, list[InvalidRecord]]:
    kafka = messages if messages is not None else [kafka_time(position) for position in range(len(values))]
    batch = _native.parse_batch(values, max_field_length, now, max_skew_seconds, kafka)
    invalid: list[InvalidRecord] = []
    for position in batch.deferred():  # the few records outside the native subset: exact rules
        record = decode_exact(values[position])
        if isinstance(record, str):
            invalid.append(InvalidRecord(position, record))
            batch.set_invalid(position)
            continue
        batch.set_record(
            position,
            not _clean_string(record.user_id, max_field_length),
            _clean_string(record.device_type, max_field_length),
            _clean_string(record.app_version, max_field_length),
            _clean_string(record.locale, max_field_length),
            _clean_string(record.ip, max_field_length),
            _clean_string(record.device_id, max_field_length),
            event_time_of(record.timestamp, kafka_time(position), max_skew_seconds),
        )
    for position in batch.fallback_rows():
        batch.set_fallback_time(position, kafka_time(position))
    return batch, invalid
