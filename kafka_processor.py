"""The long-running processor: user-login -> 30 s windows -> device-login-aggregates.

Data flows one way: record -> parse -> window -> aggregate -> publish -> commit.

* The main thread owns the consumer: it consumes batches, parses them
  (`parsing`), copies invalid records to the dead-letter topic and hands each
  partition's run of records to the `Aggregator` (one lock per run).
* A timer thread closes the windows the watermark has passed, publishes them,
  waits for the broker's acknowledgement, then works out which input offsets are
  safe to commit. The main thread performs the commit on its next turn, so the
  consumer is only ever touched by one thread.

Why this order gives "nothing lost, nothing counted twice" is in README.md
("Guarantees").
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from aggregator import Aggregator, ClosedWindow, WindowAggregate, iso_utc
from commits import CommitSlot, safe_offsets
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    env_name_of,
    exit_with_config_error,
    load_settings_or_exit,
)
from dead_letter import DeadLetterQueue
from kafka_io import (
    QUIET_CLIENT_LOGS,
    AuthenticationFailed,
    BrokerHealth,
    close_within,
    ensure_topics,
    read_topic_tail,
    topic_partition_count,
)
from log_setup import configure_logging
from merger import WindowMerger
from metrics import MetricsSnapshot, ProcessorMetrics
from parsing import NATIVE_PARSER_AVAILABLE, parse_values
from part_publisher import PartPublisher
from parts import encode_part

log = logging.getLogger("processor")

# How many of the last output records to read at start-up to learn which windows
# an earlier run already published. Windows are published in order, so the
# newest is near the end; a few extra cover a broker that reports the last
# batch's base offset as the end.
_TAIL_RECORDS = 50
# How long shutdown waits for the broker to acknowledge the last windows.
_SHUTDOWN_ACK_SECONDS = 10.0
# How long one publish attempt of the timer waits for acknowledgements.
_PUBLISH_ATTEMPT_SECONDS = 5.0
# How long shutdown waits for the consumer to leave its group.
_CLOSE_SECONDS = 10.0
# How long a rebalance waits for queued windows and dead-letter copies before it commits.
_REVOKE_FLUSH_SECONDS = 5.0
# How often to ask again for the input's partition count after a failed look-up.
_PARTITION_COUNT_RETRY_SECONDS = 2.0
OUTPUT_MESSAGE_MAX_BYTES = 16 * 1024 * 1024
# A part is split into pieces below Kafka's default message size limit (1 MB), so the
# partials topic needs no special configuration on any broker.
PART_MAX_BYTES = 900_000
# How long shutdown lets the merger publish the windows this run's last parts complete.
_MERGER_DRAIN_SECONDS = 10.0
_PROGRESS_LOG_SECONDS = 30.0


@dataclass
class ProcessorStats:
    """Running totals, for the progress log line, the benchmark and metrics.

    Stage times are measured per batch (never per record), so they cost nothing
    worth mentioning; `consume` is time inside consume() calls that returned data.
    """

    records: int = 0
    invalid: int = 0
    late: int = 0
    windows_published: int = 0
    consume_seconds: float = 0.0
    parse_seconds: float = 0.0
    dead_letter_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    publish_seconds: float = 0.0


def _tune_garbage_collector() -> None:
    """Collect cycles every 100k allocations instead of every 700.

    Each consumed batch allocates thousands of short-lived objects (one Message per
    record), so the default threshold ran a collection hundreds of times a second,
    some of them walking every open window's sets: a third of the processor's time
    in the benchmark (172k -> 249k records/s with this). The per-record data has no
    reference cycles, so collecting less often frees nothing later than it should.
    Objects alive at start-up (modules, clients) are frozen out of collections.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _epoch(iso: str) -> int:
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


def _kafka_seconds(message: Message, now: float) -> int:
    """The record's Kafka timestamp in epoch seconds (the wall clock if it has none)."""
    kind, millis = message.timestamp()
    return millis // 1000 if kind != 0 and millis > 0 else int(now)


def consumer_settings(settings: Settings) -> dict:
    config = {
        **QUIET_CLIENT_LOGS,
        # Our defaults first; a KAFKA_* setting from the user overrides them...
        # The default 1000 ms makes a busy consumer sit idle between fetches.
        "fetch.queue.backoff.ms": 10,
        # A new group reads the whole backlog: the windows of past events are wanted too.
        "auto.offset.reset": "earliest",
        # Notice a (re)created input topic or added partitions within seconds, not the
        # default five minutes: until then the processor would sit on no partitions.
        "topic.metadata.refresh.interval.ms": 5000,
        **settings.consumer_config(),
        # ...except these, which the guarantees depend on.
        "group.id": settings.consumer_group_id,
        # Offsets are committed by hand, only once their windows are acknowledged.
        "enable.auto.commit": False,
        # No EOF events: "caught up" is worked out from the fetch high watermark the
        # client caches (see _update_caught_up). On the embedded broker, EOF events
        # made every consume() call five times slower (benchmarks/, README).
        "enable.partition.eof": False,
    }
    return config


def merge_consumer_settings(settings: Settings) -> dict:
    """The merge stage's consumer: like the input's, in a group of its own (merger.py),
    and quick to hand over parts (a window's latency grows by one partials round trip)."""
    return {**consumer_settings(settings), "fetch.wait.max.ms": 100}


def producer_settings(settings: Settings) -> dict:
    return {
        **QUIET_CLIENT_LOGS,
        # Keep the DLQ copies and windows flowing without waiting for big batches.
        "linger.ms": 5,
        **settings.producer_config(),
        # Windows must reach the topic in the order they closed (a restart reads the
        # newest one to learn what is published): one request in flight at a time keeps
        # retries in order. Not idempotence: a retried duplicate is harmless (same key,
        # same bytes), while an idempotent producer wedges when a broker loses its
        # producer state (an in-memory broker restarted).
        "acks": "all",
        "max.in.flight.requests.per.connection": 1,
        # A window with many distinct values can pass the 1 MB default; the output
        # topic is created to accept the same size.
        "message.max.bytes": OUTPUT_MESSAGE_MAX_BYTES,
        # Never give up on a window: while the broker is away, wait (offsets stay
        # uncommitted) instead of dropping it after the default five minutes.
        "message.timeout.ms": 0,
    }


class Processor:
    """Owns the Kafka clients, the aggregator, the timer thread and the commit protocol."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.aggregator = Aggregator(
            window_seconds=settings.window_seconds,
            allowed_lateness_seconds=settings.allowed_lateness_seconds,
            top_ips=settings.top_ips,
            max_distinct_per_window=settings.max_distinct_per_window,
            max_profiles_per_window=settings.max_profiles_per_window,
        )
        self.health = BrokerHealth(settings.bootstrap_servers, log)
        self.stop_requested = threading.Event()
        self.host = socket.gethostname()
        self._publish_lock = threading.Lock()  # one publish (or revoke) at a time
        self._commits = CommitSlot()  # timer thread -> main thread
        # Set once something unexpected happened: from then on nothing is committed,
        # not even by the revoke that closing the consumer runs (the next run replays).
        self._crashed = threading.Event()
        self._partition_count_retry_at: float | None = None  # the look-up failed: when to retry
        # A client that would not close: the interpreter's exit would wait on it.
        self.exit_at_once = False
        self._last_unacknowledged_warning = 0.0
        self._topics_missing_since: float | None = None
        reset = str(consumer_settings(settings).get("auto.offset.reset", "earliest")).lower()
        self._reads_from_earliest = reset in ("earliest", "smallest", "beginning")
        self.stats = ProcessorStats()
        self._missing_fields: Counter[str] = Counter()  # over published windows
        self._consumer_lag: dict[int, int] = {}
        self._last_window: dict | None = None
        self.metrics = ProcessorMetrics(self.metrics_snapshot)
        self._progress_mark = (time.monotonic(), ProcessorStats())
        self._producer = Producer({**producer_settings(settings), "error_cb": self.health.on_error})
        self._consumer = Consumer({**consumer_settings(settings), "error_cb": self.health.on_error})
        self.dead_letters = DeadLetterQueue(self._producer, settings.dlq_topic, self.host, self.stop_requested.is_set)
        self.parts = PartPublisher(self._producer, settings.partials_topic, self.host)
        self.merger = WindowMerger(
            settings,
            merge_consumer_settings(settings),
            producer_settings(settings),
            self.health,
            self._published_until_or_unknown,
            self._window_published,
            self.host,
        )

    # ---- start-up -------------------------------------------------------------------

    def prepare(self) -> bool:
        """Topics exist and we know what an earlier run published. False if stopped first."""
        if not self._ensure_topics():
            return False
        while not self.stop_requested.is_set():
            try:
                published_until = self._published_until()
                break
            except KafkaException as error:
                self.health.on_error(KafkaError(KafkaError._TRANSPORT, str(error)))
                self.stop_requested.wait(2.0)
        else:
            return False
        if published_until:
            self.aggregator.restore_published_until(published_until)
            log.info(
                "resuming: windows up to %s were already published; their replayed records are skipped",
                iso_utc(published_until),
            )
        return True

    def _ensure_topics(self) -> bool:
        s = self.settings
        # The partials topic has one partition: its one consumer in the merge group is the merger.
        topics = {s.input_topic: s.input_partitions, s.output_topic: 1, s.dlq_topic: 1, s.partials_topic: 1}
        # The output is compacted: a consumer that keeps the latest record per key
        # (what the topic is for) never needs older copies of a republished window.
        configs = {s.output_topic: {"cleanup.policy": "compact", "max.message.bytes": str(OUTPUT_MESSAGE_MAX_BYTES)}}
        return ensure_topics(s, topics, self.stop_requested.is_set, self.health, configs=configs)

    def _recreate_missing_topics(self) -> None:
        """A broker that lost its topics (an in-memory one, restarted) gets them back,
        so producers and this processor can carry on without an operator."""
        since = self._topics_missing_since
        if since is None or time.monotonic() - since < 5.0:
            return
        log.warning("input topic %s is missing; creating the pipeline's topics again", self.settings.input_topic)
        self._topics_missing_since = None
        self._ensure_topics()

    def _published_until_or_unknown(self) -> int:
        """For a new merger: 0 (nothing known: windows are published again, same bytes)
        when the output topic cannot be read now."""
        try:
            return self._published_until()
        except KafkaException as error:
            log.warning("could not read the newest window on %s (%s)", self.settings.output_topic, error)
            return 0

    def _published_until(self) -> int:
        """End (epoch seconds) of the newest window on the output topic, 0 if none."""
        newest = 0
        for message in read_topic_tail(self.settings, self.settings.output_topic, _TAIL_RECORDS):
            try:
                start = _epoch(message.key().decode())
            except (AttributeError, UnicodeDecodeError, ValueError):
                continue  # not one of ours
            newest = max(newest, start + self.settings.window_seconds)
        return newest

    # ---- the poll loop -----------------------------------------------------------------

    def run(self) -> int:
        """Consume until asked to stop; returns the exit code."""
        if not self.prepare():
            self._consumer.close()
            return 0
        self._consumer.subscribe(
            [self.settings.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self.merger.start()
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", self.settings.metrics_port)
        _tune_garbage_collector()
        timer = threading.Thread(target=self._timer_loop, name="window-closer", daemon=True)
        timer.start()
        log.info("consuming %s (%s)", self.settings.input_topic, self.settings.describe())
        if NATIVE_PARSER_AVAILABLE:
            log.info("native parser in use")
        else:
            log.warning(
                "native parser not installed (pip install -r requirements.txt builds it with a C compiler):"
                " parsing in pure Python, at about 40%% of the native speed"
            )
        batch_size = self.settings.consume_batch_size
        try:
            while not self.stop_requested.is_set():
                if self.merger.failed.is_set():
                    self._crashed.set()
                    break
                self._commit_if_requested()
                self._recreate_missing_topics()
                self._retry_partition_count()
                self.dead_letters.retry_refused()
                started = time.perf_counter()
                messages = self._consumer.consume(batch_size, 0.5)
                if messages:
                    self.stats.consume_seconds += time.perf_counter() - started
                    self._process(messages)
                self._update_caught_up()
            self.stop_requested.set()
            timer.join()
            if not self._crashed.is_set():
                return self._shutdown()
        except Exception:
            # A bug, not bad input (that goes to the DLQ).
            log.exception("processor crashed")
        return self._stop_without_committing(timer)

    def _stop_without_committing(self, timer: threading.Thread) -> int:
        """After a bug: commit nothing more (the revoke run by close() included), so the
        next run replays from the last commit made while everything was sound."""
        self._crashed.set()
        self.stop_requested.set()
        timer.join()
        self.merger.finish(drain=False, timeout=10)
        log.critical("stopping without committing anything more; the next run replays from the last commit")
        self._consumer.close()
        self._producer.flush(2.0)
        return 1

    def _process(self, messages: list[Message]) -> None:
        """Split a consumed batch into runs of one partition and hand each over."""
        errors = list(map(Message.error, messages))
        partitions = list(map(Message.partition, messages))
        count = len(messages)
        # any() in C: None is false, a KafkaError true. (Not errors.count(None):
        # KafkaError.__eq__ fails on None.)
        if any(errors):
            self._process_with_errors(messages, errors, partitions)
            return
        # Partition runs found in C (index/count per distinct partition, a handful),
        # not by a per-record loop: librdkafka hands each partition over in one piece.
        order = list(dict.fromkeys(partitions))
        starts = [partitions.index(partition) for partition in order]
        lengths = [partitions.count(partition) for partition in order]
        if all(starts[i] + lengths[i] == (starts[i + 1] if i + 1 < len(order) else count) for i in range(len(order))):
            for partition, start, length in zip(order, starts, lengths, strict=True):
                self._process_run(messages[start : start + length], partition)
            return
        start, current = 0, partitions[0]  # interleaved partitions: split where they change
        for index in range(1, count):
            if partitions[index] != current:
                self._process_run(messages[start:index], current)
                start, current = index, partitions[index]
        self._process_run(messages[start:], current)

    def _update_caught_up(self) -> None:
        """A partition is caught up when everything up to the high watermark of its last
        fetch has been handed to the aggregator; records fetched but not yet consumed
        make it active again. One local (cached) look-up per partition, per batch."""
        topic = self.settings.input_topic
        lag = {}
        for partition, progress in self.aggregator.partition_summary().items():
            low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if high < 0:
                continue  # no fetch answered yet: unknown, so it keeps holding the watermark
            start = progress.next_offset
            if start is None:  # nothing read and nothing committed: where the reset policy starts
                start = low if self._reads_from_earliest else high
            lag[partition] = max(0, high - start)
            if start >= high:
                if not progress.caught_up or progress.next_offset != start:
                    self.aggregator.mark_caught_up(partition, start)
                    self.health.mark_reachable()
            elif progress.caught_up:
                self.aggregator.mark_active(partition)
        self._consumer_lag = lag

    def _process_with_errors(self, messages: list[Message], errors: list, partitions: list[int]) -> None:
        run: list[Message] = []
        for message, error, partition in zip(messages, errors, partitions, strict=True):
            if error is None:
                if run and run[-1].partition() != partition:
                    self._process_run(run, run[-1].partition())
                    run = []
                run.append(message)
                continue
            if run:
                self._process_run(run, run[-1].partition())
                run = []
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                if self._topics_missing_since is None:
                    self._topics_missing_since = time.monotonic()
            else:
                self.health.on_error(error)
        if run:
            self._process_run(run, run[-1].partition())

    def _process_run(self, run: list[Message], partition: int) -> None:
        stats = self.stats
        started = time.perf_counter()
        now = time.time()
        batch, invalid = parse_values(
            list(map(Message.value, run)),
            now,
            self.settings.max_event_time_skew_seconds,
            lambda position: _kafka_seconds(run[position], now),
            self.settings.max_field_length,
        )
        parsed = time.perf_counter()
        invalid_times = []
        for item in invalid:
            invalid_times.append(_kafka_seconds(run[item.position], now))
            self.dead_letters.copy(run[item.position], item.reason)
        dead_lettered = time.perf_counter()
        late = self.aggregator.add_batch(partition, run[0].offset(), run[-1].offset() + 1, batch, invalid_times)
        stats.aggregate_seconds += time.perf_counter() - dead_lettered
        stats.dead_letter_seconds += dead_lettered - parsed
        stats.parse_seconds += parsed - started
        stats.records += len(run)
        stats.invalid += len(invalid)
        stats.late += late

    # ---- closing and publishing (timer thread) ------------------------------------------------

    def _timer_loop(self) -> None:
        interval = self.settings.close_interval_seconds
        while not self.stop_requested.wait(interval):
            try:
                self.close_and_publish(wait_seconds=_PUBLISH_ATTEMPT_SECONDS)
                self._maybe_log_progress()
            except Exception:
                # A bug (a window that cannot be rendered, say): never a window that
                # silently disappears, never a timer that dies and stalls the pipeline.
                # Stop loudly, commit nothing: a restart replays from the last commit.
                log.exception("window closer failed; the processor stops")
                self._crashed.set()
                self.stop_requested.set()
                return

    def close_and_publish(self, wait_seconds: float) -> bool:
        """Close the (window, partition) parts the watermarks have passed, publish them
        to the partials topic in order, wait up to `wait_seconds` for the broker's
        acknowledgement, then request a commit of the offsets no longer needed.

        Never holds the publish lock longer than one attempt, so a rebalance or a
        shutdown is not blocked by a broker that is away; parts already handed to the
        producer are not produced again (librdkafka retries them itself).
        Returns True when everything closed so far is acknowledged.
        """
        with self._publish_lock:
            started = time.perf_counter()
            self.parts.add(self.aggregator.close_due_parts(self._encode_part))
            self.parts.send()
            # flush() also covers the DLQ copies produced so far.
            still_queued = self._producer.flush(wait_seconds)
            acknowledged = self.parts.take_acknowledged()
            if acknowledged:
                self.aggregator.acknowledge(acknowledged)
                self.health.mark_reachable()
            self.stats.publish_seconds += time.perf_counter() - started
            # Safe even while some are unacknowledged: unacknowledged parts and
            # dead-letter copies hold their offsets (see _request_commit).
            self._request_commit()
            if self.parts.pending() or still_queued:
                self._warn_unacknowledged()
                return False
            return True

    def _encode_part(self, partition: int, start: int, window: WindowAggregate) -> list[bytes]:
        return encode_part(
            start,
            partition,
            self.aggregator.total_partitions,
            window.tallies,
            window.invalid_message_count,
            window.late_message_count,
            PART_MAX_BYTES,
        )

    def _warn_unacknowledged(self) -> None:
        now = time.monotonic()
        if now - self._last_unacknowledged_warning < _PROGRESS_LOG_SECONDS:
            return
        self._last_unacknowledged_warning = now
        log.warning(
            "%d part(s) and %d record(s) in all waiting for the broker's acknowledgement; "
            "their input offsets stay uncommitted until then",
            self.parts.pending(),
            len(self._producer),
        )

    def _window_published(self, window: ClosedWindow, acknowledged_at: float) -> None:
        """Count it, feed the metrics, and log one line with its headline figures."""
        end = window.start + self.settings.window_seconds
        value = msgspec.json.decode(window.value)
        self.stats.windows_published += 1
        self._missing_fields.update(value["missing_field_counts"])
        self._last_window = value
        self.metrics.publish_latency.observe(max(0.0, acknowledged_at - end))
        missing = value["missing_field_counts"]
        log.info(
            "published window %s: %d logins, %d unique devices, %d invalid, %d late%s (%.0fs after window end)",
            value["window_start"],
            value["message_count"],
            value["unique_device_count"],
            value["invalid_message_count"],
            value["late_message_count"],
            f", missing {missing}" if missing else "",
            acknowledged_at - end,
        )
        if "capped_counts" in value:
            log.warning(
                "window %s had more distinct values than it keeps; lower bounds: %s"
                " (MAX_DISTINCT_PER_WINDOW %d, MAX_PROFILES_PER_WINDOW %d)",
                value["window_start"],
                ", ".join(value["capped_counts"]),
                self.settings.max_distinct_per_window,
                self.settings.max_profiles_per_window,
            )

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Read by the metrics endpoint when scraped (another thread): copies only."""
        stats = replace(self.stats)
        last = self._last_window
        return MetricsSnapshot(
            records=stats.records,
            invalid=stats.invalid,
            late=stats.late,
            windows_published=stats.windows_published,
            stage_seconds={
                "consume": stats.consume_seconds,
                "parse": stats.parse_seconds,
                "dead_letter": stats.dead_letter_seconds,
                "aggregate": stats.aggregate_seconds,
                "publish": stats.publish_seconds,
            },
            missing_fields=dict(self._missing_fields),
            consumer_lag=dict(self._consumer_lag),
            open_windows=self.aggregator.open_window_count(),
            watermark=self.aggregator.watermark(),
            last_window=last,
            last_window_end=None if last is None else _epoch(last["window_end"]),
            parts_published=self.parts.parts_published,
            is_merger=self.merger.is_merger,
            merge_lag_seconds=self.merger.merge_lag_seconds(),
        )

    def _safe_offsets(self) -> dict[int, int]:
        """Offsets no open or unacknowledged window, and no unacknowledged dead-letter
        copy, still needs."""
        return safe_offsets(self.aggregator.committable_offsets(), self.dead_letters.holds())

    def _request_commit(self) -> None:
        self._commits.offer(self._safe_offsets())

    # ---- commits (main thread) -----------------------------------------------------------------

    def _commit_if_requested(self) -> None:
        offsets = self._commits.take()
        if offsets and not self._commit(offsets):
            self._commits.put_back(offsets)

    def _commit(self, offsets: dict[int, int]) -> bool:
        """Commit synchronously; False if the broker did not take it (tried again later)."""
        if self._crashed.is_set():
            return True  # dropped on purpose: nothing is committed after a bug
        topic = self.settings.input_topic
        try:
            self._consumer.commit(
                offsets=[TopicPartition(topic, p, o) for p, o in sorted(offsets.items())], asynchronous=False
            )
        except KafkaException as error:
            if error.args[0].code() == KafkaError._NO_OFFSET:
                return True  # nothing new to commit
            log.warning("offset commit failed (%s); will commit again", error.args[0].str())
            return False
        self._commits.done(offsets)
        log.debug("committed %s", offsets)
        return True

    # ---- rebalances (called by the consumer inside consume(), main thread) ----------------

    def _partition_count(self, consumer: Consumer) -> int | None:
        """The input topic's partition count (0: no such topic), or None if the broker
        did not answer in time (a struggling broker during a rebalance must not crash
        the processor: windows wait until the count is known)."""
        try:
            total = topic_partition_count(consumer, self.settings.input_topic)
        except KafkaException as error:
            log.warning(
                "could not read the partition count of %s (%s); windows wait until it is known",
                self.settings.input_topic,
                error,
            )
            self._partition_count_retry_at = time.monotonic() + _PARTITION_COUNT_RETRY_SECONDS
            return None
        self._partition_count_retry_at = None
        return total

    def _retry_partition_count(self) -> None:
        retry_at = self._partition_count_retry_at
        if retry_at is None or time.monotonic() < retry_at:
            return
        total = self._partition_count(self._consumer)
        if total is not None:
            self.aggregator.assign([], total)
            log.info("partition count of %s is %d", self.settings.input_topic, total)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        total = self._partition_count(consumer)
        owned = sorted(tp.partition for tp in partitions)
        try:
            committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10) if tp.offset >= 0}
        except KafkaException as error:
            log.warning("could not read committed offsets (%s); partitions wait for their first fetch", error)
            committed = {}
        self.aggregator.assign(owned, total or 0, committed)
        self.health.mark_reachable()
        if total is None:
            pass  # said above; retried from the poll loop
        elif total == 0:
            log.warning("input topic %s does not exist (broker lost it?)", self.settings.input_topic)
            self._topics_missing_since = time.monotonic() - 5.0  # recreate at the next turn
        elif len(owned) < total:
            log.info(
                "assigned partitions %s (%d of %d partitions) of %s; the other processors of group %s own the rest",
                ",".join(map(str, owned)) or "none",
                len(owned),
                total,
                self.settings.input_topic,
                self.settings.consumer_group_id,
            )
        else:
            log.info("assigned all %d partitions of %s", total, self.settings.input_topic)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Wait for an in-flight publish, give queued dead-letter copies a moment to be
        # acknowledged, commit what is safe, then forget the open windows: the next
        # owner (maybe us) rebuilds them from the commit. After a bug: no commit at all.
        with self._publish_lock:
            self._commits.clear()
            if not self._crashed.is_set():
                self._producer.flush(_REVOKE_FLUSH_SECONDS)
                self.aggregator.acknowledge(self.parts.take_acknowledged())
                offsets = self._safe_offsets()
                if offsets:
                    self._commit(offsets)
            self.aggregator.revoke_all()
            self.parts.clear()
            self._commits.clear()
        log.info("partitions revoked; open windows dropped, to be rebuilt from committed offsets")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._publish_lock:
            self._commits.clear()
            self.aggregator.revoke_all()
            self.parts.clear()
        log.warning("partitions lost (session timed out); open windows dropped, to be rebuilt")

    # ---- progress and shutdown ---------------------------------------------------------------

    def _maybe_log_progress(self) -> None:
        now = time.monotonic()
        since, before = self._progress_mark
        elapsed = now - since
        if elapsed < _PROGRESS_LOG_SECONDS:
            return
        current = replace(self.stats)
        self._progress_mark = (now, current)
        records, invalid, late = (
            current.records - before.records,
            current.invalid - before.invalid,
            current.late - before.late,
        )
        watermark = self.aggregator.watermark()
        # INFO: invalid and late records are normal operation (they are counted and the
        # invalid ones copied to the DLQ); a WARNING is for what an operator must act on.
        log.info(
            "last %.0fs: %d records (%.0f/s), %d invalid (to %s), %d late, %d windows open, watermark %s",
            elapsed,
            records,
            records / elapsed,
            invalid,
            self.settings.dlq_topic,
            late,
            self.aggregator.open_window_count(),
            "unknown" if watermark is None else iso_utc(watermark),
        )

    def _shutdown(self) -> int:
        """Publish what the watermark has passed, wait for the acks, commit, close."""
        started = time.monotonic()
        acknowledged = self.close_and_publish(wait_seconds=_SHUTDOWN_ACK_SECONDS)
        self._commit_if_requested()
        if not acknowledged:
            log.warning("stopping with unacknowledged parts: their records stay uncommitted, replayed next run")
        # The merger (if this processor is it) publishes what the last parts complete.
        self.merger.finish(drain=True, timeout=_MERGER_DRAIN_SECONDS + 5)
        still_open = self.aggregator.open_window_count()  # before close() revokes and drops them
        self._producer.flush(2.0)
        if not close_within(self._consumer, _CLOSE_SECONDS):
            log.warning(
                "the consumer did not leave group %s within %.0fs (a rebalance in progress?); exiting anyway:"
                " what is safe was committed already",
                self.settings.consumer_group_id,
                _CLOSE_SECONDS,
            )
            self.exit_at_once = True
        log.info(
            "stopped in %.1fs; %d window part(s) still open were not published (they are rebuilt next run)",
            time.monotonic() - started,
            still_open,
        )
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="kafka_processor.py",
        description="Aggregate user-login events into tumbling windows and publish one result per window.",
    )
    add_settings_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    settings, _args, environ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        processor = Processor(settings)
    except KafkaException as error:  # librdkafka refused a KAFKA_* setting
        text = error.args[0].str() if isinstance(error.args[0], KafkaError) else str(error)
        exit_with_config_error("kafka_processor.py", ConfigError(_setting_in(text, environ), text))

    def request_stop(signum: int, _frame: object) -> None:
        if processor.stop_requested.is_set():
            return
        log.info("%s received: finishing up", signal.Signals(signum).name)
        processor.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        code = processor.run()
    except AuthenticationFailed as refused:
        exit_with_config_error("kafka_processor.py", refused.as_config_error())
    if processor.exit_at_once:
        logging.shutdown()
        os._exit(code)
    return code


def _setting_in(librdkafka_message: str, environ: dict[str, str]) -> str:
    """Name the KAFKA_* variable a librdkafka complaint is about, if we can tell."""
    for word in librdkafka_message.replace('"', " ").split():
        if "." in word:
            name = env_name_of(word.strip(":,"), environ)
            if name != word.strip(":,"):
                return name
    return "KAFKA_* settings"


if __name__ == "__main__":
    sys.exit(main())
