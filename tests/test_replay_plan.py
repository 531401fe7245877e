"""ops.replay_plan: each source sent once, a value the processor would refuse questioned,
and where each record will be counted said by the processor's own rules."""

from __future__ import annotations

import json

import pytest

from core.window_value import iso_utc
from ops.dlq_file import DeadLetter
from ops.replay_plan import (
    DISCARDED,
    REPLAYED,
    discarded_entry,
    ledger_state,
    pending,
    place,
    replayed_entry,
    summary,
)

T0 = 1_796_083_200  # a window start for 30 s windows
NOW = T0 + 3600


LOGIN = object()  # a valid login at `timestamp`


def letter(source: str, value: bytes | None | object = LOGIN, timestamp: int = T0 + 12) -> DeadLetter:
    if value is LOGIN:
        value = json.dumps({"device_type": "iOS", "timestamp": timestamp}).encode()
    return DeadLetter(source, int(source.split("/")[1]), None, value, (T0 + 40) * 1000, "not JSON", 1)


def test_pending_skips_what_was_replayed_or_discarded_and_second_copies():
    letters = [letter("t/0/1"), letter("t/0/2"), letter("t/0/1"), letter("t/1/1"), letter("t/1/2")]
    send, skipped = pending(letters, done={"t/0/2": REPLAYED, "t/1/2": DISCARDED})
    assert [one.source for one in send] == ["t/0/1", "t/1/1"]
    assert skipped == [
        ("t/0/2", "already replayed"),
        ("t/0/1", "a second copy of the same source record"),
        ("t/1/2", "discarded"),
    ]


def test_the_ledger_tells_replayed_from_discarded_and_a_tombstone_undoes():
    assert ledger_state(replayed_entry("2026-12-01T00:00:00Z", "user-login")) == REPLAYED
    assert ledger_state(discarded_entry("2026-12-01T00:00:00Z", "not JSON")) == DISCARDED
    assert ledger_state(None) is None
    assert ledger_state(b"older release") == REPLAYED  # unreadable: taken as sent, never sent again


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b'["a list"]', "not a JSON object"),
        (b'{"timestamp": 1} junk', "not valid JSON"),
        (None, "empty record"),
    ],
)
def test_a_value_the_processor_would_refuse_is_questioned(value, problem):
    [placed] = place([letter("t/0/1", value)], 0, 30, 300, 4, now=NOW)
    assert problem in placed.problem
    assert placed.where().startswith("not sent: the processor would refuse it again")


def test_a_record_counts_in_its_window_while_that_window_is_not_published():
    published_until = T0  # the newest published window ends where the record's begins
    [placed] = place([letter("t/1/1", timestamp=T0 + 12)], published_until, 30, 300, 4, now=NOW)
    assert (placed.problem, placed.window, placed.late, placed.partition) == ("", T0, False, 1)
    assert placed.where() == (f"event time {iso_utc(T0 + 12)}: counted in window {iso_utc(T0)} (not published yet)")


def test_a_record_of_a_published_window_counts_as_late_on_its_source_partition():
    [placed] = place([letter("t/1/1", timestamp=T0 + 12)], T0 + 30, 30, 300, 4, now=NOW)
    assert placed.late and placed.window == T0
    assert placed.where() == (
        f"event time {iso_utc(T0 + 12)}: counted as late in the next window that closes on partition 1"
        f" (window {iso_utc(T0)} is published)"
    )


def test_the_event_time_is_the_processors_reading_of_the_fixed_value():
    """Milliseconds and numeric strings are times; a value without a usable time (none,
    or further ahead of the Kafka timestamp than the skew) counts at its Kafka timestamp,
    which the replay keeps: T0 + 40 here."""
    values = [
        json.dumps({"timestamp": (T0 + 95) * 1000}).encode(),
        json.dumps({"timestamp": f" {T0 + 65} "}).encode(),
        b'{"device_type": "iOS"}',
        json.dumps({"timestamp": T0 + 40 + 301}).encode(),
    ]
    placed = place([letter(f"t/0/{i}", value) for i, value in enumerate(values)], 0, 30, 300, 4, now=NOW)
    assert [p.event_time for p in placed] == [T0 + 95, T0 + 65, T0 + 40, T0 + 40]
    assert [p.window for p in placed] == [T0 + 90, T0 + 60, T0 + 30, T0 + 30]


def test_a_source_partition_the_input_no_longer_has_is_named_as_such():
    [placed] = place([letter("t/5/1")], T0 + 30, 30, 300, 4, now=NOW)
    assert placed.partition is None and "the partition its key hashes to" in placed.where()


def test_the_summary_counts_by_window_and_late_by_partition():
    letters = [
        letter("t/0/1", timestamp=T0 + 1),
        letter("t/1/2", timestamp=T0 + 2),
        letter("t/1/3", timestamp=T0 + 31),
        letter("t/0/4", timestamp=T0 + 61),
        letter("t/0/5", timestamp=T0 + 62),
        letter("t/0/6", b"{not json"),
    ]
    lines = summary(place(letters, T0 + 60, 30, 300, 4, now=NOW))
    assert lines == [
        f"  window {iso_utc(T0 + 60)}: 2 record(s)",
        "  late, in the next window that closes on partition 0: 1 record(s)",
        "  late, in the next window that closes on partition 1: 2 record(s)",
    ]
