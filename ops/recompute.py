"""Copy recomputed windows onto the output topic: the last step of a recomputation.

A recomputation (docs/operations.md, "Recovery") runs `kafka_processor.py --from T`
under a new consumer group that publishes to a staging topic of its own: the processor
learns what it has published from the end of its output topic, so sharing the live
output would let the live group's newest windows tell it that everything is
published, and its own old windows tell a restarted live processor that far less is.
This tool then copies the staged windows of the range onto the output topic, where
they replace the old values (same key, compacted topic).

While it copies, it keeps what the live processors read at start-up right: they take
the newest window among the output's last 50 records, so after every 40 windows
copied it produces the output's newest window again (the same key and bytes).

    python -m ops.recompute --source device-login-aggregates-recompute \\
        --from 2026-12-01T00:00:00Z --until 2026-12-02T00:00:00Z [--dry-run]

Each window is compared with the output's current value first (`ops.window_diff`):
new, same, or changed with the figures that differ, so that the dry run shows what the
copy would change. `python -m ops.recompute_cleanup` removes the recomputation's
topics and groups afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from broker import authorization
from broker.authorization import RECOMPUTE_READER_GROUP_PREFIX, NotAuthorized, check_permissions
from broker.kafka_io import (
    QUIET_CLIENT_LOGS,
    AuthenticationFailed,
    BrokerHealth,
    read_topic_tail,
    topic_partition_count,
)
from broker.pipeline_topics import OUTPUT_MESSAGE_MAX_BYTES
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    exit_with_config_error,
    load_settings_or_exit,
    utc_time,
)
from core.errors import PipelineError
from core.window_value import epoch_of, iso_utc
from ops.window_diff import CHANGED, NEW, SAME, compare
from telemetry.log_setup import configure_logging

log = logging.getLogger("recompute")

PROG = "python -m ops.recompute"
SETTINGS = ("KAFKA_BOOTSTRAP_SERVERS", "OUTPUT_TOPIC", "LOG_LEVEL", "LOG_FORMAT")
# How many windows to copy before producing the output's newest window again: below the
# 50 records the processor reads from the end of the output (pipeline_topics._TAIL_RECORDS).
CHUNK = 40
_READ_SECONDS = 120.0
# How far before a range the output is read from: a window's record is produced after the
# window ends, by a processor whose clock may be behind by up to this.
_CLOCK_MARGIN_SECONDS = 3600


class CopyFailed(PipelineError):
    """A topic could not be read to its end, or the output did not take the windows:
    nothing after it is trustworthy, so the run stops (exit 1) and can be run again."""


def staged_windows(settings: Settings, source: str, start: int, until: int | None) -> list[Message]:
    """The latest record of each window of `source` starting in [start, until), oldest first."""
    latest: dict[int, Message] = {}
    for message in read_topic_tail(settings, source, None, timeout=_READ_SECONDS):
        window = _window_start(message)
        if window is not None and window >= start and (until is None or window < until) and message.value():
            latest[window] = message
    return [latest[window] for window in sorted(latest)]


def _window_start(message: Message) -> int | None:
    try:
        return epoch_of(message.key().decode())
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None  # not a window


def current_windows(settings: Settings, start: int, until: int | None) -> dict[int, bytes]:
    """The output's latest value of each window starting in [start, until): what
    consumers that keep the latest record per key see now. Read from the first record
    produced at or after `start` less a margin (a window's record is produced after the
    window, by a clock that may be behind): the output holds every window ever
    published, and only the range's are kept in memory."""
    latest: dict[int, bytes] = {}
    for message in records_since(settings, settings.output_topic, start - _CLOCK_MARGIN_SECONDS):
        window = _window_start(message)
        if window is not None and window >= start and (until is None or window < until):
            if message.value():
                latest[window] = message.value()
            else:
                latest.pop(window, None)  # a tombstone: the window is gone
    return latest


def records_since(settings: Settings, topic: str, since: int) -> Iterator[Message]:
    """Every record of `topic` from the first one with a Kafka timestamp at or after
    `since` (epoch s) to the end each partition reports by an EOF event, as read. A
    broker that cannot find offsets by time (the embedded one answers 0) is read whole."""
    consumer = Consumer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.consumer_config(),
            # A throwaway group: this reader assigns partitions itself and never commits.
            "group.id": f"{RECOMPUTE_READER_GROUP_PREFIX}{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        count = topic_partition_count(consumer, topic)
        asked = [TopicPartition(topic, partition, max(since, 0) * 1000) for partition in range(count)]
        found = consumer.offsets_for_times(asked, timeout=_READ_SECONDS) if asked else []
        assignment = [
            # The end: no record at or after the time there. No answer: from the beginning.
            TopicPartition(topic, tp.partition, tp.offset if tp.error is None and tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in found
            if tp.offset != OFFSET_END or tp.error is not None
        ]
        if not assignment:
            return
        consumer.assign(assignment)
        waiting = {tp.partition for tp in assignment}
        deadline = time.monotonic() + _READ_SECONDS
        while waiting:
            if time.monotonic() > deadline:
                raise CopyFailed(f"could not read {topic} to its end in {_READ_SECONDS:.0f}s")
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is None:
                    yield message
                elif error.code() == KafkaError._PARTITION_EOF:
                    waiting.discard(message.partition())
                else:
                    raise KafkaException(error)
    finally:
        consumer.close()


def newest_window(settings: Settings, records: int) -> Message | None:
    """The record of the newest window among the output's last `records` records."""
    tail = []
    for message in read_topic_tail(settings, settings.output_topic, records):
        window = _window_start(message)
        if window is not None and message.value():
            tail.append((window, message))
    return max(tail, key=lambda pair: (pair[0], pair[1].offset()))[1] if tail else None


def copy(settings: Settings, windows: list[Message], source: str) -> int:
    """Produce `windows` to the output topic; returns how many."""
    health = BrokerHealth(settings.bootstrap_servers, log)
    producer = Producer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.producer_config(),
            # Every in-sync replica has each window, in order, with no duplicate from a retry.
            "acks": "all",
            "enable.idempotence": True,
            "max.in.flight.requests.per.connection": 1,
            "message.max.bytes": OUTPUT_MESSAGE_MAX_BYTES,
            **health.callbacks(settings.producer_config()),
        }
    )
    failures: list[str] = []

    def delivered(error, _message) -> None:
        if error is not None:
            failures.append(error.str())

    for first in range(0, len(windows), CHUNK):
        for message in windows[first : first + CHUNK]:
            headers = [*(message.headers() or []), ("recomputed.from", source.encode())]
            producer.produce(
                settings.output_topic, key=message.key(), value=message.value(), headers=headers, on_delivery=delivered
            )
        if producer.flush(60) or failures:
            raise CopyFailed(f"the broker did not take the windows: {failures[:1] or 'no acknowledgement in 60s'}")
        newest = newest_window(settings, CHUNK + 60)
        if newest is not None and _window_start(newest) > _window_start(windows[min(first + CHUNK, len(windows)) - 1]):
            producer.produce(
                settings.output_topic,
                key=newest.key(),
                value=newest.value(),
                headers=newest.headers(),
                on_delivery=delivered,
            )
            producer.flush(60)
        log.info("copied %d of %d windows", min(first + CHUNK, len(windows)), len(windows))
    if failures:
        raise CopyFailed(f"the broker did not take a window: {failures[0]}")
    return len(windows)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the recomputation's staging output topic")
    parser.add_argument("--from", dest="start", required=True, help="first window to copy (2026-12-01T00:00:00Z)")
    parser.add_argument("--until", default="", help="copy windows starting before this time (default: all)")
    parser.add_argument(
        "--dry-run", action="store_true", help="show what the copy would change, window by window; copy nothing"
    )
    add_settings_arguments(parser, only=SETTINGS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    settings, args, _ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        start = utc_time("--from", args.start)
        until = utc_time("--until", args.until) or None
    except ConfigError as error:
        exit_with_config_error(PROG, error)
    if args.source == settings.output_topic:
        exit_with_config_error(PROG, ConfigError("--source", "must be the staging topic, not OUTPUT_TOPIC itself"))
    try:
        # A staging topic it may not see would look empty: "copied 0 windows".
        check_permissions(settings, authorization.recompute(settings, args.source, args.dry_run))
        windows = staged_windows(settings, args.source, start, until)
        current = current_windows(settings, start, until)
        verdicts: Counter[str] = Counter()
        for message in windows:
            window = _window_start(message)
            change = compare(current.pop(window, None), message.value())
            verdicts[change.verdict] += 1
            head, *figures = change.describe()
            print(f"{'would copy' if args.dry_run else 'copy'} window {iso_utc(window)}: {head}")
            for line in figures:
                print(line)
        for window in sorted(current):  # on the output, not recomputed: the copy leaves them be
            print(f"keep window {iso_utc(window)}: not in {args.source}, stays as it is")
        if not args.dry_run:
            copy(settings, windows, args.source)
    except AuthenticationFailed as refused:
        exit_with_config_error(PROG, refused.as_config_error())
    except NotAuthorized as refused:
        print(f"{PROG}: {refused.line()}", file=sys.stderr)
        return 2
    except (CopyFailed, KafkaException) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    verb = "would copy" if args.dry_run else "copied"
    counts = ", ".join(f"{verdicts[v]} {v}" for v in (CHANGED, NEW, SAME))
    print(
        f"{verb} {len(windows)} window(s) from {args.source} to {settings.output_topic}: {counts};"
        f" {len(current)} kept as they are"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
