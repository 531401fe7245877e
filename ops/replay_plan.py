"""What a DLQ replay will do with each record of its file, decided before anything is sent.

Pure: the ledger's entries, the output's newest published window and the input's
partition count are read by `ops.dlq_replay` and handed in.

- **Once per source.** A source in the ledger (`<DLQ_TOPIC>-replayed`, compacted, keyed
  by source) was replayed or set aside (discarded) already; a second line of the same
  source is a mistake in the file. Both are skipped, saying which.
- **Questioned, not sent.** A "fixed" value the processor would still refuse (by its own
  rules, `ingest.parsing`) would only come back into the DLQ under a new source, with no
  link to the first: the replay names it and sends nothing until the file is fixed.
- **Where it will be counted** (`COUNTING_RULE`, the processor's rule for a record
  carrying `dlq.replayed.from`; docs/semantics.md): in the window of its event time if
  that window is not yet published on the output topic, otherwise as late in the next
  window that closes on its source partition. The event time is the processor's own
  reading of the fixed value (`parse_values`), with the record's Kafka timestamp, which
  the replay keeps, where the value has none it can use.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka import TIMESTAMP_CREATE_TIME

from core.window_value import iso_utc
from ingest.parsing import kafka_time_of, parse_values
from ops.dlq_file import DeadLetter

REPLAYED = "replayed"
DISCARDED = "discarded"

COUNTING_RULE = (
    "a replayed record counts in the window of its event time if that window is not yet published on the"
    " output topic (this pipeline's newest published window), otherwise as late (late_message_count) in the"
    " next window that closes on its source partition"
)


def ledger_state(value: bytes | None) -> str | None:
    """What a ledger entry says of its source: REPLAYED, DISCARDED, or None (a tombstone:
    a discard undone)."""
    if value is None:
        return None
    try:
        entry = json.loads(value)
    except ValueError:
        return REPLAYED  # unreadable: the safe reading is "sent already"
    return DISCARDED if isinstance(entry, dict) and "discarded_at" in entry else REPLAYED


def replayed_entry(at: str, input_topic: str) -> bytes:
    return json.dumps({"replayed_at": at, "to": input_topic}).encode()


def discarded_entry(at: str, reason: str) -> bytes:
    return json.dumps({"discarded_at": at, "reason": reason}).encode()


def pending(letters: Iterable[DeadLetter], done: Mapping[str, str]) -> tuple[list[DeadLetter], list[tuple[str, str]]]:
    """The letters to send (first of each source, not in the ledger `done`) and the
    skipped ones, with why."""
    send: list[DeadLetter] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for letter in letters:
        state = done.get(letter.source)
        if state == REPLAYED:
            skipped.append((letter.source, "already replayed"))
        elif state == DISCARDED:
            skipped.append((letter.source, "discarded"))
        elif letter.source in seen:
            skipped.append((letter.source, "a second copy of the same source record"))
        else:
            seen.add(letter.source)
            send.append(letter)
    return send, skipped


@dataclass(frozen=True)
class Placement:
    """One record to send, judged by the processor's rules."""

    letter: DeadLetter
    problem: str = ""  # why the processor would refuse it; "" when it is valid
    event_time: int = 0
    window: int = 0  # start of the window of its event time
    late: bool = False  # that window is published already
    partition: int | None = None  # where it lands on the input (None: by its key's hash)

    def where(self) -> str:
        """Where it will be counted, in words."""
        if self.problem:
            return f"not sent: the processor would refuse it again ({self.problem})"
        on = f"partition {self.partition}" if self.partition is not None else "the partition its key hashes to"
        if self.late:
            return (
                f"event time {iso_utc(self.event_time)}: counted as late in the next window that closes on {on}"
                f" (window {iso_utc(self.window)} is published)"
            )
        return f"event time {iso_utc(self.event_time)}: counted in window {iso_utc(self.window)} (not published yet)"


def place(
    letters: list[DeadLetter],
    published_until: int,
    window_seconds: int,
    max_skew_seconds: int,
    input_partitions: int,
    now: float | None = None,
) -> list[Placement]:
    """Each letter's fate by the processor's rules (`published_until`: end of the
    pipeline's newest window on the output, 0 for none)."""
    now = time.time() if now is None else now

    def kafka_time(position: int) -> int:
        return kafka_time_of((TIMESTAMP_CREATE_TIME, letters[position].timestamp_ms), now, max_skew_seconds)

    # The pure-Python path: it keeps each valid record's event time (the native one gives
    # the same answer; the parser's tests hold them together).
    columns, invalid = parse_values(
        [letter.value for letter in letters], now, max_skew_seconds, kafka_time, native=False
    )
    refused = {item.position: item.reason for item in invalid}
    times = iter(columns.event_time)
    placed = []
    for position, letter in enumerate(letters):
        if position in refused:
            placed.append(Placement(letter, problem=refused[position]))
            continue
        seconds = next(times)
        window = seconds - seconds % window_seconds
        placed.append(
            Placement(
                letter,
                event_time=seconds,
                window=window,
                late=window + window_seconds <= published_until,
                partition=letter.partition if letter.partition < input_partitions else None,
            )
        )
    return placed


def summary(placements: list[Placement]) -> list[str]:
    """Where the records will be counted, by window (on time) and by partition (late)."""
    on_time = Counter(p.window for p in placements if not p.problem and not p.late)
    late = Counter(p.partition for p in placements if not p.problem and p.late)
    lines = [f"  window {iso_utc(window)}: {count} record(s)" for window, count in sorted(on_time.items())]
    for partition, count in sorted(late.items(), key=lambda item: (item[0] is None, item[0] or 0)):
        on = f"partition {partition}" if partition is not None else "the partitions their keys hash to"
        lines.append(f"  late, in the next window that closes on {on}: {count} record(s)")
    return lines
