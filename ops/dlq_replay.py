"""Replay dead-lettered records into the input topic, once each, after fixing them.

Two steps, with a person in between (docs/operations.md, "Replay the DLQ"):

    python -m ops.dlq_replay export dlq.jsonl          # the DLQ records not replayed yet
    (fix the "value" of each line; delete the lines not to replay)
    python -m ops.dlq_replay replay dlq.jsonl --dry-run
    python -m ops.dlq_replay replay dlq.jsonl
    python -m ops.dlq_replay discard unfixable.jsonl   # set aside records nobody will fix

Once per source record: the DLQ is at-least-once (a processor that crashed, or a
recomputation, copies an invalid record again), and a replay may be run twice, or twice
at once. Each DLQ copy names its source (`dlq.source.topic/partition/offset`); a
replayed record is written to the input together with an entry keyed by that source in
the ledger topic `<DLQ_TOPIC>-replayed`, in one Kafka transaction, and a source already
in the ledger (or twice in the file) is skipped. The ledger is read only after this
run's transactional producer has fenced every other run of the same DLQ (one
transactional id per DLQ): what an older run had not committed by then is aborted, what
it had committed is in the ledger, and anything it still tries to send is refused. A
discard writes ledger entries the same way, so export no longer lists those sources.

The replayed record keeps its source partition, key and Kafka timestamp, and says where
it came from in the header `dlq.replayed.from`. Before sending, the tool says where
each record will be counted (`ops.replay_plan`) and questions any value the processor
would still refuse.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from confluent_kafka import KafkaError, KafkaException, Producer

from broker import authorization
from broker.authorization import TRANSACTIONAL_ID, NotAuthorized, Permission, check_permissions
from broker.kafka_io import (
    QUIET_CLIENT_LOGS,
    REAL_CLIENTS,
    AuthenticationFailed,
    BrokerHealth,
    ensure_topics,
    read_topic_tail,
    topic_partition_count,
)
from broker.pipeline_topics import newest_published
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    exit_with_config_error,
    load_settings_or_exit,
)
from core.errors import PipelineError
from core.window_value import iso_utc
from ops.dlq_file import DeadLetter, FileError, from_dlq, read_file
from ops.replay_plan import (
    COUNTING_RULE,
    DISCARDED,
    REPLAYED,
    discarded_entry,
    ledger_state,
    pending,
    place,
    replayed_entry,
    summary,
)
from telemetry.log_setup import configure_logging

log = logging.getLogger("dlq-replay")

PROG = "python -m ops.dlq_replay"
SETTINGS = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "INPUT_TOPIC",
    "DLQ_TOPIC",
    # Where a replayed record will be counted: this pipeline's newest window on its
    # output, and the processor's rules for a record's window.
    "OUTPUT_TOPIC",
    "CONSUMER_GROUP_ID",
    "WINDOW_SECONDS",
    "MAX_EVENT_TIME_SKEW_SECONDS",
    "TOPIC_REPLICATION_FACTOR",
    "TOPIC_MIN_INSYNC_REPLICAS",
    "LOG_LEVEL",
    "LOG_FORMAT",
)
# Records per transaction: each commit is a round trip; a failure redoes at most this many.
_BATCH = 500
_READ_SECONDS = 120.0
_PREVIEW = 100
# What a producer fenced by a newer one with the same transactional id is told.
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


class Overtaken(PipelineError):
    """Another run of this DLQ's replay (or discard) fenced this one mid-way."""

    def __init__(self, committed: int) -> None:
        super().__init__(committed)
        self.committed = committed


def ledger_topic(settings: Settings) -> str:
    return f"{settings.dlq_topic}-replayed"


def ledger(settings: Settings) -> dict[str, str]:
    """{source: REPLAYED or DISCARDED}, by the latest entry of each source in the ledger.
    A missing ledger topic reads as empty: nothing was replayed yet."""
    state: dict[str, str] = {}
    for message in read_topic_tail(settings, ledger_topic(settings), None, _READ_SECONDS):
        source = message.key().decode("utf-8", "replace")
        kind = ledger_state(message.value())
        if kind is None:
            state.pop(source, None)
        else:
            state[source] = kind
    return state


def export(settings: Settings, out: TextIO, discarded: bool = False) -> tuple[int, list[str]]:
    """Write the DLQ records not replayed nor discarded yet (`discarded`: those set aside),
    one JSON object per line. Returns how many, and what was left out (counted by why)."""
    done = ledger(settings)
    letters = [
        letter for m in read_topic_tail(settings, settings.dlq_topic, None, _READ_SECONDS) if (letter := from_dlq(m))
    ]
    if discarded:
        letters = [letter for letter in letters if done.get(letter.source) == DISCARDED]
        done = {}
    send, skipped = pending(letters, done)
    for letter in send:
        out.write(letter.as_line() + "\n")
    return len(send), [f"{count} {why}" for why, count in Counter(why for _, why in skipped).items()]


def _transactional_producer(settings: Settings, needs: list[Permission]) -> Producer | None:
    """This DLQ's one transactional producer, initialised: every other run of the replay
    or discard of this DLQ is fenced by then, its open transaction aborted, so a ledger
    read after this call is final until this run commits. None if asked to stop. Raises
    NotAuthorized when the cluster's ACLs lack one of `needs` (or Create on a missing ledger)."""
    health = BrokerHealth(settings.bootstrap_servers, log)
    topic = ledger_topic(settings)
    # Compacted: one entry per source record, kept as long as the DLQ might hold a copy.
    compacted = {topic: {"cleanup.policy": "compact"}}
    if not ensure_topics(settings, {topic: 1}, lambda: False, health, configs=compacted, permissions=needs):
        return None
    transactional_id = authorization.dlq_replay_transactional_id(settings)
    producer = Producer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.producer_config(),
            # One id per DLQ: a replay that died mid-transaction is fenced and its
            # transaction aborted when the next one starts; so is one still running.
            "transactional.id": transactional_id,
            **health.callbacks(settings.producer_config()),
        }
    )
    try:
        producer.init_transactions(30)
    except KafkaException as error:
        # The one ACL no question at start-up checks (broker/authorization.py).
        if error.args and error.args[0].code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            raise NotAuthorized([Permission(TRANSACTIONAL_ID, transactional_id, "Write")], settings) from None
        raise
    return producer


def _fenced(error: KafkaException) -> bool:
    return bool(error.args) and isinstance(error.args[0], KafkaError) and error.args[0].code() in _FENCED


def _input_partitions(settings: Settings) -> int:
    admin = REAL_CLIENTS.admin({**QUIET_CLIENT_LOGS, **settings.admin_config()})
    return topic_partition_count(admin, settings.input_topic)


def replay(settings: Settings, letters: list[DeadLetter], path: str, dry_run: bool) -> int:
    """Say what happens to each record of the file, then (unless `dry_run`) send the
    ones to send with their ledger entries, `_BATCH` per transaction. Returns the exit
    status: 2 when a record is still invalid (nothing is sent)."""
    producer = None if dry_run else _transactional_producer(settings, authorization.dlq_replay(settings, "replay"))
    if not dry_run and producer is None:
        return 1
    send, skipped = pending(letters, ledger(settings))  # after the fence: see _transactional_producer
    published = newest_published(settings, REAL_CLIENTS).until
    partitions = _input_partitions(settings)
    placements = place(send, published, settings.window_seconds, settings.max_event_time_skew_seconds, partitions)
    newest = f"the window ending {iso_utc(published)}" if published else "none yet"
    print(f"where each record will be counted: {COUNTING_RULE} ({settings.output_topic}: {newest})")
    for source, why in skipped:
        print(f"skip {source}: {why}")
    verb = "would send" if dry_run else "send"
    questioned = [p for p in placements if p.problem]
    for p in placements:
        shown = "question" if p.problem else verb
        print(f"{shown} {p.letter.source} (line {p.letter.line}) -> {settings.input_topic}: {p.where()}")
        print(f"    {_preview(p.letter.value)}")
    if questioned:
        lines = ", ".join(str(p.letter.line) for p in questioned)
        print(
            f"{PROG}: {path}: {len(questioned)} record(s) the processor would refuse again"
            f" (line{'s' if len(questioned) > 1 else ''} {lines}): fix them, delete their lines, or set them aside"
            f" with `discard`; nothing {'would be sent' if dry_run else 'sent'}",
            file=sys.stderr,
        )
        if producer is not None:
            producer.flush(10)
        return 2
    if placements:
        print("where they will be counted:")
        for line in summary(placements):
            print(line)
    if not dry_run:
        _send(settings, producer, send, partitions)
    print(f"{'would send' if dry_run else 'sent'} {len(send)} record(s), skipped {len(skipped)}")
    return 0


def _send(settings: Settings, producer: Producer, letters: list[DeadLetter], partitions: int) -> None:
    """Each letter to the input with its ledger entry, `_BATCH` per transaction; raises
    Overtaken if another run fenced this one (what this run committed before stays)."""
    ledger_name = ledger_topic(settings)
    replayed_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sent = 0
    try:
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
                producer.produce(
                    ledger_name, key=letter.source.encode(), value=replayed_entry(replayed_at, settings.input_topic)
                )
            producer.commit_transaction(60)
            sent = min(first + _BATCH, len(letters))
            log.info("replayed %d of %d records", sent, len(letters))
    except KafkaException as error:
        if _fenced(error):
            raise Overtaken(sent) from None
        raise


def discard(settings: Settings, letters: list[DeadLetter], undo: bool, dry_run: bool) -> int:
    """Set the file's sources aside (`undo`: bring discarded ones back): a ledger entry
    each (a tombstone to undo), so export no longer lists them (lists them again)."""
    producer = None if dry_run else _transactional_producer(settings, authorization.dlq_replay(settings, "discard"))
    if not dry_run and producer is None:
        return 1
    done = ledger(settings)  # after the fence: see _transactional_producer
    chosen: list[DeadLetter] = []
    seen: set[str] = set()
    verb = "undiscard" if undo else "discard"
    for letter in letters:
        state = done.get(letter.source)
        if letter.source in seen:
            why = "a second copy of the same source record"
        elif state == REPLAYED:
            why = "already replayed"
        elif undo and state != DISCARDED:
            why = "not discarded"
        elif not undo and state == DISCARDED:
            why = "discarded already"
        else:
            seen.add(letter.source)
            chosen.append(letter)
            print(f"{'would ' if dry_run else ''}{verb} {letter.source} (line {letter.line})")
            continue
        print(f"skip {letter.source}: {why}")
    if chosen and producer is not None:
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            producer.begin_transaction()
            for letter in chosen:
                entry = None if undo else discarded_entry(at, letter.reason)
                producer.produce(ledger_topic(settings), key=letter.source.encode(), value=entry)
            producer.commit_transaction(60)
        except KafkaException as error:
            if _fenced(error):
                raise Overtaken(0) from None
            raise
    done_verb = {True: "undiscarded", False: "discarded"}[undo]
    print(f"{'would ' + verb if dry_run else done_verb} {len(chosen)} record(s), skipped {len(letters) - len(chosen)}")
    return 0


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
    out.add_argument("--discarded", action="store_true", help="write the records set aside with `discard` instead")
    back = commands.add_parser("replay", help="send the records of FILE (as exported, then fixed) to the input")
    back.add_argument("file")
    back.add_argument("--dry-run", action="store_true", help="show what would be sent and skipped; send nothing")
    aside = commands.add_parser(
        "discard", help="set aside the records of FILE: never replayed, no longer exported (--undo: bring them back)"
    )
    aside.add_argument("file")
    aside.add_argument("--undo", action="store_true", help="bring back records discarded earlier")
    aside.add_argument("--dry-run", action="store_true", help="show what would be set aside; change nothing")
    for command in (out, back, aside):  # the settings after the command: `replay FILE --bootstrap-servers ...`
        add_settings_arguments(command, only=SETTINGS)
    return parser


def _export(settings: Settings, path: str, discarded: bool, permitted: Callable[[], None]) -> int:
    try:
        out = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as error:
        raise FileError(path, error.strerror or str(error)) from None
    try:
        permitted()
        written, left_out = export(settings, out, discarded)
    finally:
        if out is not sys.stdout:
            out.close()
    what = "discarded record(s)" if discarded else "record(s)"
    print(f"exported {written} {what} to {path}; left out: {', '.join(left_out) or 'none'}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, args, _ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        # What this command reads and writes, allowed before anything is read from the
        # broker: a DLQ or ledger it may not see would look empty (broker/authorization.py).
        # The local file comes first: a mistake in it is said at once, without a broker.
        needed = authorization.dlq_replay(settings, args.command, getattr(args, "dry_run", False))

        def permitted() -> None:
            check_permissions(settings, needed)

        if args.command == "export":
            return _export(settings, args.file, args.discarded, permitted)
        letters = read_file(args.file)
        permitted()
        if args.command == "replay":
            return replay(settings, letters, args.file, args.dry_run)
        return discard(settings, letters, args.undo, args.dry_run)
    except FileError as error:
        print(f"{PROG}: {error.where}: {error.problem}", file=sys.stderr)
        return 2
    except ConfigError as error:
        exit_with_config_error(PROG, error)
    except AuthenticationFailed as refused:
        exit_with_config_error(PROG, refused.as_config_error())
    except NotAuthorized as refused:
        print(f"{PROG}: {refused.line()}", file=sys.stderr)
        return 2
    except Overtaken as overtaken:
        print(
            f"{PROG}: another run for {settings.dlq_topic} started meanwhile and took over (this one was fenced):"
            f" its open transaction is aborted, {overtaken.committed} record(s) were committed before;"
            " run it again (--dry-run) to see what is left",
            file=sys.stderr,
        )
        return 1
    except KafkaException as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
