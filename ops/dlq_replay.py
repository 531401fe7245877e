"""Replay dead-lettered records into the input topic, once each, after fixing them.

Two steps, with a person in between (docs/operations.md, "Recovery"):

    python -m ops.dlq_replay export dlq.jsonl          # the DLQ records not replayed yet
    (fix the "value" of each line; delete the lines not to replay)
    python -m ops.dlq_replay replay dlq.jsonl --dry-run
    python -m ops.dlq_replay replay dlq.jsonl

Once per source record: the DLQ is at-least-once (a processor that crashed, or a
recomputation, copies an invalid record again), and a replay may be run twice. Each
DLQ copy names its source (`dlq.source.topic/partition/offset`); a replayed record
is written to the input together with an entry keyed by that source in the ledger
topic `<DLQ_TOPIC>-replayed`, in one Kafka transaction, and a source already in the
ledger (or twice in the file) is skipped. The replayed record keeps its source
partition, key and Kafka timestamp, and says where it came from in the header
`dlq.replayed.from`.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from confluent_kafka import KafkaException, Message, Producer

from broker.kafka_io import QUIET_CLIENT_LOGS, AuthenticationFailed, BrokerHealth, ensure_topics, read_topic_tail
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    exit_with_config_error,
    load_settings_or_exit,
)
from ops.log_setup import configure_logging

log = logging.getLogger("dlq-replay")

PROG = "python -m ops.dlq_replay"
SETTINGS = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "INPUT_TOPIC",
    "DLQ_TOPIC",
    "TOPIC_REPLICATION_FACTOR",
    "TOPIC_MIN_INSYNC_REPLICAS",
    "LOG_LEVEL",
    "LOG_FORMAT",
)
# Records per transaction: each commit is a round trip; a failure redoes at most this many.
_BATCH = 500
_READ_SECONDS = 120.0
_PREVIEW = 100


def ledger_topic(settings: Settings) -> str:
    return f"{settings.dlq_topic}-replayed"


@dataclass(frozen=True)
class DeadLetter:
    """One record to replay: where it came from, and what to send."""

    source: str  # "topic/partition/offset" of the record the processor refused
    partition: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    reason: str = ""

    def as_line(self) -> str:
        line: dict[str, object] = {"source": self.source, "reason": self.reason, "timestamp_ms": self.timestamp_ms}
        line.update(_encoded("key", self.key))
        line.update(_encoded("value", self.value))
        return json.dumps(line, ensure_ascii=False)


def _encoded(name: str, data: bytes | None) -> dict[str, object]:
    """Text where the bytes are UTF-8 (what a person edits), base64 where they are not."""
    if data is None:
        return {name: None}
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode()}


def _decoded(line: dict, name: str) -> bytes | None:
    if f"{name}_base64" in line:
        return base64.b64decode(line[f"{name}_base64"], validate=True)
    text = line.get(name)
    if text is not None and not isinstance(text, str):
        raise ValueError(f'"{name}" must be a string or null')
    return None if text is None else text.encode("utf-8")


def from_dlq(message: Message) -> DeadLetter | None:
    """A DLQ copy as a `DeadLetter`; None if it lacks the source headers."""
    headers = {name: value.decode("utf-8", "replace") for name, value in message.headers() or []}
    try:
        topic, partition, offset = (headers[f"dlq.source.{n}"] for n in ("topic", "partition", "offset"))
        timestamp_ms = int(headers.get("dlq.source.timestamp") or message.timestamp()[1])
        return DeadLetter(
            f"{topic}/{int(partition)}/{int(offset)}",
            int(partition),
            message.key(),
            message.value(),
            timestamp_ms,
            headers.get("dlq.reason", ""),
        )
    except (KeyError, ValueError):
        return None


def from_line(text: str) -> DeadLetter:
    """One line of an exported (and edited) file. Raises ValueError saying what is wrong."""
    line = json.loads(text)
    if not isinstance(line, dict):
        raise ValueError("not a JSON object")
    source = line.get("source")
    parts = source.split("/") if isinstance(source, str) else []
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError('"source" must be "topic/partition/offset", as exported')
    timestamp_ms = line.get("timestamp_ms")
    if not isinstance(timestamp_ms, int) or timestamp_ms < 0:
        raise ValueError('"timestamp_ms" must be a whole number of milliseconds')
    return DeadLetter(source, int(parts[1]), _decoded(line, "key"), _decoded(line, "value"), timestamp_ms)


def replayed_sources(settings: Settings) -> set[str]:
    """The sources in the ledger: replayed already, by any earlier run."""
    # A missing ledger topic reads as empty: nothing was replayed yet.
    return {m.key().decode() for m in read_topic_tail(settings, ledger_topic(settings), None, _READ_SECONDS)}


def pending(letters: Iterator[DeadLetter], done: set[str]) -> tuple[list[DeadLetter], list[tuple[str, str]]]:
    """The letters to send (first of each source, not in `done`) and the skipped ones, with why."""
    send: list[DeadLetter] = []
    skipped: list[tuple[str, str]] = []
    seen = set(done)
    for letter in letters:
        if letter.source in seen:
            why = "already replayed" if letter.source in done else "a second copy of the same source record"
            skipped.append((letter.source, why))
            continue
        seen.add(letter.source)
        send.append(letter)
    return send, skipped


def export(settings: Settings, out: TextIO) -> tuple[int, int]:
    """Write the DLQ records not replayed yet, one JSON object per line. Returns (written, skipped)."""
    done = replayed_sources(settings)
    letters = (
        letter for m in read_topic_tail(settings, settings.dlq_topic, None, _READ_SECONDS) if (letter := from_dlq(m))
    )
    send, skipped = pending(letters, done)
    for letter in send:
        out.write(letter.as_line() + "\n")
    return len(send), len(skipped)


def replay(settings: Settings, letters: list[DeadLetter]) -> int:
    """Produce `letters` to the input topic with their ledger entries, `_BATCH` per
    transaction. Returns how many were sent."""
    if not letters:
        return 0
    health = BrokerHealth(settings.bootstrap_servers, log)
    ledger = ledger_topic(settings)
    # Compacted: one entry per source record, kept as long as the DLQ might hold a copy.
    if not ensure_topics(settings, {ledger: 1}, lambda: False, health, configs={ledger: {"cleanup.policy": "compact"}}):
        return 0
    producer = Producer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.producer_config(),
            # One id per DLQ: a replay that died mid-transaction is fenced and its
            # transaction aborted when the next one starts.
            "transactional.id": f"dlq-replay-{settings.dlq_topic}",
            **health.callbacks(settings.producer_config()),
        }
    )
    producer.init_transactions(30)
    metadata = producer.list_topics(settings.input_topic, timeout=10).topics.get(settings.input_topic)
    partitions = len(metadata.partitions) if metadata is not None and metadata.error is None else 0
    replayed_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sent = 0
    for first in range(0, len(letters), _BATCH):
        producer.begin_transaction()
        for letter in letters[first : first + _BATCH]:
            where = {"partition": letter.partition} if letter.partition < partitions else {}
            producer.produce(
                settings.input_topic,
                key=letter.key,
                value=letter.value,
                timestamp=letter.timestamp_ms,
                headers=[("dlq.replayed.from", letter.source.encode())],
                **where,
            )
            entry = {"replayed_at": replayed_at, "to": settings.input_topic}
            producer.produce(ledger, key=letter.source.encode(), value=json.dumps(entry).encode())
        producer.commit_transaction(60)
        sent = min(first + _BATCH, len(letters))
        log.info("replayed %d of %d records", sent, len(letters))
    return sent


def _preview(data: bytes | None) -> str:
    if data is None:
        return "(no value)"
    text = data.decode("utf-8", "backslashreplace")
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write the DLQ records not replayed yet to FILE ('-': stdout)")
    out.add_argument("file")
    back = commands.add_parser("replay", help="send the records of FILE (as exported, then fixed) to the input")
    back.add_argument("file")
    back.add_argument("--dry-run", action="store_true", help="show what would be sent and skipped; send nothing")
    for command in (out, back):  # the settings after the command: `replay FILE --bootstrap-servers ...`
        add_settings_arguments(command, only=SETTINGS)
    return parser


def _read_file(path: str) -> list[DeadLetter]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    letters = []
    try:
        for number, text in enumerate(stream, 1):
            if not text.strip():
                continue
            try:
                letters.append(from_line(text))
            except ValueError as problem:  # json.JSONDecodeError and binascii.Error included
                raise ConfigError(f"{path} line {number}", str(problem)) from None
    finally:
        if stream is not sys.stdin:
            stream.close()
    return letters


def main(argv: Sequence[str] | None = None) -> int:
    settings, args, _ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "export":
            with sys.stdout if args.file == "-" else open(args.file, "w", encoding="utf-8") as out:
                written, skipped = export(settings, out)
            print(
                f"exported {written} record(s) to {args.file}; {skipped} skipped (replayed already, or second copies)",
                file=sys.stderr,
            )
            return 0
        letters = _read_file(args.file)
        send, skipped = pending(iter(letters), replayed_sources(settings))
        for source, why in skipped:
            print(f"skip {source}: {why}")
        verb = "would send" if args.dry_run else "send"
        for letter in send:
            print(f"{verb} {letter.source} -> {settings.input_topic} [{letter.partition}]: {_preview(letter.value)}")
        if not args.dry_run:
            replay(settings, send)
        print(f"{'would send' if args.dry_run else 'sent'} {len(send)} record(s), skipped {len(skipped)}")
    except ConfigError as error:
        exit_with_config_error(PROG, error)
    except OSError as error:
        exit_with_config_error(PROG, ConfigError(args.file, error.strerror or str(error)))
    except AuthenticationFailed as refused:
        exit_with_config_error(PROG, refused.as_config_error())
    except KafkaException as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
