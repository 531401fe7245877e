"""The long-running processor: user-login -> 30 s windows -> device-login-aggregates.

Data flows one way, through two hops on the broker:

    user-login --consume--> parse --invalid--> user-login-dlq
                              |
                              v
          Aggregator: per (window, input partition) tallies, watermarks
                              | timer thread closes parts the watermark passed
                              v
          <group>-partials (parts, progress) --merge group--> WindowMerger
                                                             | every partition's part in
                                                             v
                                            device-login-aggregates
                                                             | read back (PublishedFollower)
                                                             v
          input offsets whose windows are published --> commit (main thread)

* The main thread owns the input consumer: it consumes batches, parses them
  (`ingest.parsing`), copies invalid records to the dead-letter topic and hands
  each partition's run of records to the `Aggregator` (one lock per run).
* A timer thread (`ingest.window_closer`) closes the window parts the watermarks
  have passed and publishes them to the partials topic (`ingest.part_publisher`).
* One member of the group (the merge group's owner) runs `merging.merger`: it
  merges every partition's part of a window and publishes the window once.
* The output follower tells each member which windows are published; only then
  are the input offsets their records held safe, and the main thread commits them
  on its next turn, so the consumer is only ever touched by one thread.

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
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from aggregator import Aggregator
from broker import authorization
from broker.authorization import NotAuthorized, PermissionWatch
from broker.broker_clock import BrokerClock
from broker.group_protocol import check_group_protocol
from broker.kafka_io import (
    QUIET_CLIENT_LOGS,
    REAL_CLIENTS,
    AuthenticationFailed,
    BrokerHealth,
    KafkaClients,
    RenewableProducer,
    close_within,
    partition_runs,
)
from broker.pipeline_topics import (
    OUTPUT_MESSAGE_MAX_BYTES,
    PipelineTopics,
    Published,
    PublishedFollower,
    describe_differences,
    differing_settings,
)
from broker.topic_watch import MissingTopics, RejoinWhenRecreated
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    env_name_of,
    exit_with_config_error,
    load_settings_or_exit,
)
from core.window_value import iso_utc
from ingest.assignment import InputAssignment
from ingest.checkpoint import Checkpoint
from ingest.commits import InputCommits
from ingest.dead_letter import DeadLetterQueue
from ingest.parsing import NATIVE_PARSER_AVAILABLE, kafka_time_of, parse_values
from ingest.part_publisher import PartPublisher
from ingest.poll_turns import PollTurns
from ingest.read_to_end import ReadToEnd
from ingest.window_closer import WindowCloser
from merging.merger import WindowMerger, newest_partials_shaping, pipeline_origin
from telemetry.group_lag import GroupLag
from telemetry.health import HealthEndpoint, Probes
from telemetry.log_setup import configure_logging
from telemetry.metrics import MetricsSnapshot, ProcessorMetrics
from telemetry.report import ProcessorReport

log = logging.getLogger("processor")

# How long one consume() call waits for records: the poll loop turns at least this often.
_CONSUME_TIMEOUT_SECONDS = 0.5
# The ACL watch asks only once the cluster has been steady this long (see PermissionWatch).
_PERMISSION_CHECK_CALM_SECONDS = 60.0
# How long shutdown waits for the broker to acknowledge the last parts.
_SHUTDOWN_ACK_SECONDS = 10.0
# How long shutdown waits for the consumer to leave its group.
_CLOSE_SECONDS = 5.0
# The longest a stop may take, whatever the broker does (docker-compose gives 30 s).
_STOP_DEADLINE_SECONDS = 15.0
# How long shutdown lets the merger publish the windows this run's last parts complete
# (it stops reading after 5 s of draining: merging/merger.py).
_MERGER_DRAIN_SECONDS = 7.0


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


def consumer_settings(settings: Settings) -> dict:
    config = {
        **QUIET_CLIENT_LOGS,
        # Our defaults first; a KAFKA_* setting from the user overrides them...
        # The default 1000 ms makes a busy consumer sit idle between fetches.
        "fetch.queue.backoff.ms": 10,
        # Notice a (re)created input topic or added partitions within seconds, not the
        # default five minutes: until then the processor would sit on no partitions.
        "topic.metadata.refresh.interval.ms": 5000,
        **settings.consumer_config(),
        # ...except these, which the guarantees depend on.
        "group.id": settings.consumer_group_id,
        # A new group reads the whole backlog (the windows of past events are wanted too),
        # and the client never starts a partition at its end by itself: KAFKA_AUTO_OFFSET_
        # RESET=latest is applied by the processor, to a new group only (ingest/assignment.py).
        # The client's own `latest` dropped unseen a partition added to the input, and reached
        # the merge group, which then missed the parts written before it joined.
        "auto.offset.reset": "earliest",
        # Offsets are committed by hand, only once their windows are acknowledged.
        "enable.auto.commit": False,
        # No EOF events: "caught up" is worked out from the fetch high watermark the
        # client caches (see ingest/read_to_end.py). On the embedded broker, EOF events
        # made every consume() call five times slower (benchmarks/, README).
        "enable.partition.eof": False,
    }
    return config


def merge_consumer_settings(settings: Settings) -> dict:
    """The merge stage's consumer: like the input's, in a group of its own (merging/merger.py),
    and quick to hand over parts (a window's latency grows by one partials round trip)."""
    return {**consumer_settings(settings), "fetch.wait.max.ms": 100}


def producer_settings(settings: Settings) -> dict:
    return {
        **QUIET_CLIENT_LOGS,
        # Keep the DLQ copies and windows flowing without waiting for big batches.
        "linger.ms": 5,
        # The broker drops a retried duplicate of a batch, so a DLQ copy is not written
        # twice by a retry. A default, not forced. A broker that forgot its producer ids
        # (the embedded broker, restarted) never answers an idempotent producer: past
        # ACK_TIMEOUT_SECONDS it is replaced by a new one (RenewableProducer, docs/design.md).
        "enable.idempotence": True,
        **settings.producer_config(),
        # Windows must reach the topic in the order they closed (a restart reads the
        # newest one to learn what is published): one request in flight at a time keeps
        # retries in order, idempotent or not. Every in-sync replica has a write before
        # it is acknowledged, and so before the offsets it covers are committed.
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
    """The poll loop; composes the owners of each concern: the aggregator (windows),
    the window closer (timer thread), the part publisher, the dead-letter queue, the
    commits, the assignment callbacks, the merger thread and the report."""

    def __init__(
        self,
        settings: Settings,
        clients: KafkaClients = REAL_CLIENTS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        # "Now" for the windows: the broker's time, measured from the partials topic's
        # acknowledgements (broker/broker_clock.py); `clock` is this machine's wall clock.
        self.clock = BrokerClock(clock, where=f"topic {settings.partials_topic}")
        self._monotonic = monotonic
        self.aggregator = Aggregator(
            window_seconds=settings.window_seconds,
            allowed_lateness_seconds=settings.allowed_lateness_seconds,
            top_ips=settings.top_ips,
            clock=self.clock.now,
            max_distinct_per_window=settings.max_distinct_per_window,
            max_profiles_per_window=settings.max_profiles_per_window,
        )
        self.health = BrokerHealth(settings.bootstrap_servers, log)
        self.stop_requested = threading.Event()
        self.host = socket.gethostname()
        # Set once something unexpected happened: from then on nothing is committed,
        # not even by the revoke that closing the consumer runs (the next run replays).
        self._crashed = threading.Event()
        # A client that would not close: the interpreter's exit would wait on it.
        self.exit_at_once = False
        reset = str(settings.consumer_config().get("auto.offset.reset", "earliest")).lower()
        self._reads_from_earliest = reset in ("earliest", "smallest", "beginning")
        self.report = ProcessorReport(settings, self.aggregator)
        self.stats = self.report.stats
        self.metrics = ProcessorMetrics(self.metrics_snapshot)
        self.report.publish_latency = self.metrics.publish_latency.observe
        # /healthz and /readyz beside /metrics (telemetry/health.py); the poll loop's period is
        # its consume() timeout.
        self.probes = Probes(
            settings.consumer_group_id,
            _CONSUME_TIMEOUT_SECONDS,
            settings.close_interval_seconds,
            lambda: self.health.down_since,
            self.stop_requested.is_set,
            producer_stall=self.health.producer_stall,
        )
        self.endpoint: HealthEndpoint | None = None
        # Asks the cluster now and then whether its ACLs still allow what this processor
        # does (broker/authorization.py); started once start-up is through.
        self.permissions = PermissionWatch(
            settings,
            authorization.processor(settings),
            lambda: clients.admin({**QUIET_CLIENT_LOGS, **settings.admin_config()}),
            steady=lambda: self.health.steady_for(_PERMISSION_CHECK_CALM_SECONDS),
        )
        # Why this processor stands by without acting (settings the group does not share).
        self.refused: str | None = None
        self.topics = PipelineTopics(settings, self.health, self.stop_requested.is_set, clients)
        self.published = PublishedFollower(settings, clients, Published())
        origin = pipeline_origin(settings)
        self._producer = RenewableProducer(
            "parts and dead-letter copies",
            {**producer_settings(settings), "error_cb": self.health.on_error},
            self.health,
            settings.ack_timeout_seconds,
            clients,
            monotonic,
        )
        self._consumer = clients.consumer({**consumer_settings(settings), "error_cb": self.health.on_error})
        self.dead_letters = DeadLetterQueue(self._producer, settings.dlq_topic, self.host, self.stop_requested.is_set)
        self.parts = PartPublisher(
            self._producer,
            settings.partials_topic,
            self.host,
            origin,
            self.clock,
            name=f"{settings.processor_name}[{os.getpid()}]",
        )
        self.commits = InputCommits(self._consumer, settings.input_topic, self._crashed)
        self.missing_topics = MissingTopics(settings, self._producer, self.topics, self.health, monotonic)
        self.checkpoint = Checkpoint(
            aggregator=self.aggregator,
            parts=self.parts,
            producer=self._producer,
            dead_letters=self.dead_letters,
            commits=self.commits,
            health=self.health,
            crashed=self._crashed,
        )
        self.closer = WindowCloser(
            settings,
            aggregator=self.aggregator,
            parts=self.parts,
            checkpoint=self.checkpoint,
            report=self.report,
            published=self.published,
            origin=origin,
            clock=self.clock,
        )
        self.assignment = InputAssignment(
            settings,
            aggregator=self.aggregator,
            parts=self.parts,
            commits=self.commits,
            producer=self._producer,
            publish_lock=self.closer.lock,
            health=self.health,
            topics=self.topics,
            checkpoint=self.checkpoint,
            monotonic=monotonic,
            reads_from_earliest=self._reads_from_earliest,
        )
        self.merger = WindowMerger(
            settings,
            consumer_config=merge_consumer_settings(settings),
            producer_config=producer_settings(settings),
            health=self.health,
            newest_published=self.topics.newest_published,
            on_published=self._window_published,
            host=self.host,
            clients=clients,
            clock=monotonic,
            wall=self.clock.now,
        )
        # Readiness, reachability, what the group published, unacknowledged writes, the group's lag.
        self.report.watch(
            self.health, self.probes.readiness, self.published, GroupLag(settings, self.health, clients).figures
        )
        # A fatal client error (one line from BrokerHealth) is a crash: nothing more committed, exit 1.
        self.health.when_fatal(self._crashed.set, self.merger.stop.set, self.stop_requested.set)
        self.read_to_end = ReadToEnd(
            settings,
            consumer=self._consumer,
            aggregator=self.aggregator,
            clock=self.clock,
            turns=PollTurns(monotonic),
            assignment=self.assignment,
            health=self.health,
            report=self.report,
        )

    # ---- start-up -------------------------------------------------------------------

    def prepare(self) -> bool:
        """Topics exist and we know what an earlier run published. False if stopped first."""
        # KAFKA_GROUP_PROTOCOL=consumer on a broker without KIP-848 is a bad setting, said
        # first (one line): the consumer would otherwise wait for ever without a word.
        if not check_group_protocol(self.settings, self.health, self.stop_requested.is_set, self.topics.clients):
            return False
        if not self.topics.ensure():
            return False
        # Which process this is, once the broker has taken its settings (a refused login or
        # TLS handshake before that is a bad setting: one line, nothing before it).
        log.info(
            "%s connected to %s: pid %d on host %s",
            self.settings.processor_name,
            self.settings.bootstrap_servers,
            os.getpid(),
            socket.gethostname(),
        )
        published = self.topics.newest_published_retrying()
        if published is None:
            return False
        group, source = published.shaping, f"its newest window on {self.settings.output_topic}"
        if group is None:  # nothing of this pipeline's on the output says: its parts may
            group, source = (
                newest_partials_shaping(self.settings, self.topics.clients),
                (f"its newest records on {self.settings.partials_topic}"),
            )
        differences = differing_settings(group, self.settings)
        if differences:
            self._refuse(differences, source)
            return True
        self.resume_from(published)
        return True

    def resume_from(self, published: Published) -> None:
        """What this pipeline has on the output already: replayed records of those
        windows are skipped (they were counted: below the offsets its parts counted up
        to, where the output says; records of those windows after them count as late)."""
        self.published.published = published
        if published.until:
            self.aggregator.restore_published_until(published.until, published.partition_count, published.accounted)
            if published.recomputing:
                log.info(
                    "recomputing from %s (RECOMPUTE_FROM): the windows before it count as published",
                    iso_utc(published.until),
                )
            else:
                log.info(
                    "resuming: windows up to the one ending %s were already published; their replayed records are"
                    " skipped",
                    iso_utc(published.until),
                )

    def _refuse(self, differences: list[tuple[str, int, int]], source: str) -> None:
        """This processor's window-shaping settings are not the group's: it must not act
        on them (skip records as published, commit, publish), or it would take windows it
        cannot see for published and commit past their records. One error line; not ready
        until restarted with the group's settings."""
        self.refused = (
            f"settings differ from what group {self.settings.consumer_group_id} uses ({source}):"
            f" {describe_differences(differences)}"
        )
        log.error(
            "%s; this processor consumes, commits and publishes nothing until it is restarted with the group's"
            ' settings (docs/operations.md, "Changing settings and upgrading")',
            self.refused,
        )
        self.probes.refuse(self.refused)

    def start_consuming(self) -> None:
        """Join the input group and the merge group."""
        a = self.assignment
        self._consumer.subscribe(
            [self.settings.input_topic], on_assign=self._on_assign, on_revoke=a.on_revoke, on_lost=self._on_lost
        )

    # ---- the poll loop -----------------------------------------------------------------

    def run(self) -> int:
        """Consume until asked to stop; returns the exit code."""
        if self.endpoint is None:
            self.serve_endpoint()
        try:
            return self._run()
        finally:
            if self.endpoint is not None:
                self.endpoint.close()

    def serve_endpoint(self) -> None:
        """From the start, so that probes answer while start-up waits for the broker."""
        port = self.settings.metrics_port
        if not port:
            return
        try:
            self.endpoint = HealthEndpoint(port, self.metrics.registry, self.probes).start()
        except OSError as error:
            raise ConfigError("METRICS_PORT", f"cannot listen on port {port}: {error.strerror}") from None
        log.info("metrics, health and readiness on http://0.0.0.0:%d/metrics, /healthz, /readyz", port)

    def _run(self) -> int:
        if not self.prepare():
            self._consumer.close()
            return self.health.exit_status_when_stopped()
        if self.refused:
            return self._stand_by()
        self.start_consuming()
        self.merger.start()
        self.health.when_topics_created(
            RejoinWhenRecreated(
                self.settings, self._consumer, self.start_consuming, self.probes.is_member, self.merger.rejoin
            )
        )
        self.permissions.start()
        _tune_garbage_collector()
        timer = threading.Thread(
            target=self.closer.run,
            args=(self.stop_requested, self._crashed, self.probes.window_closer.beat),
            name="window-closer",
            daemon=True,
        )
        timer.start()
        log.info("consuming %s (%s)", self.settings.input_topic, self.settings.describe())
        if NATIVE_PARSER_AVAILABLE:
            log.info("native parser in use")
        else:
            log.warning(
                "native parser not installed (pip install -r requirements.txt builds it with a C compiler):"
                " parsing in pure Python, at about 40%% of the native speed"
            )
        try:
            while not self.stop_requested.is_set():
                self.probes.poll_loop.beat()
                if self.merger.failed.is_set():
                    self._crashed.set()
                    break
                if self.permissions.refusal is not None:  # an ACL removed under it
                    raise self.permissions.refusal
                disagreement = self.published.disagreement
                if disagreement is not None:
                    differences = differing_settings(disagreement.shaping, self.settings)
                    self._refuse(differences, f"a window it published on {self.settings.output_topic}")
                    return self._stand_by(timer)
                self.poll_once(_CONSUME_TIMEOUT_SECONDS)
            self.stop_requested.set()
            timer.join()
            if not self._crashed.is_set():
                return self._shutdown()
        except NotAuthorized as refused:  # an ACL removed under it (or a topic it may not make again)
            why = f"{refused.line()}; stopping without committing anything more (exit status 2): the next run"
            return self._stop_without_committing(timer, f"{why} replays from the last commit", exit_status=2)
        except Exception:
            # A bug, not bad input (that goes to the DLQ); or a fatal client error, said already.
            if self.health.fatal is None:
                log.exception("processor crashed")
        return self._stop_without_committing(timer)

    def _stand_by(self, timer: threading.Thread | None = None) -> int:
        """Refused (`_refuse`): leave both groups committing nothing (what was read is
        replayed by whoever owns the partitions), then only answer probes, not ready,
        until asked to stop."""
        self._crashed.set()  # from here on nothing is committed, not even by the revoke below
        if timer is not None:
            stopping = self.stop_requested.is_set()
            self.stop_requested.set()  # the timer thread's stop
            timer.join()
            if not stopping:  # (a SIGTERM meanwhile still ends the process: _exit_if_stuck)
                self.stop_requested.clear()
            self.merger.finish(drain=False, timeout=10)
        self.published.close()
        if not close_within(self._consumer, _CLOSE_SECONDS):
            self.exit_at_once = True
        while not self.stop_requested.wait(_CONSUME_TIMEOUT_SECONDS):
            self.probes.poll_loop.beat()  # alive (not restarted by a liveness probe), not ready
            self.probes.window_closer.beat()
        log.info("stopped; it consumed, committed and published nothing (%s)", self.refused)
        return 0

    def poll_once(self, wait_seconds: float) -> None:
        """One turn of the poll loop: commit what the timer thread found safe, chores,
        one batch (parse, dead-letter, aggregate), then which partitions are read to
        their end."""
        turn_started = self.read_to_end.turns.turn_started()
        self.commits.commit_if_requested()
        self.topics.recreate_if_missing()
        self.missing_topics.check()
        self.assignment.retry_partition_count()
        self.assignment.retry_committed(self._consumer)
        self.dead_letters.retry_refused()
        self.health.recheck(self._consumer, self.settings.input_topic)
        started = time.perf_counter()
        messages = self._consumer.consume(self.settings.consume_batch_size, wait_seconds)
        if messages:
            self.stats.consume_seconds += time.perf_counter() - started
            self._process(messages)
        self.read_to_end.update(turn_started, wait_seconds)

    def _stop_without_committing(self, timer: threading.Thread, why: str | None = None, exit_status: int = 1) -> int:
        """After a bug (or `why`, said as an error): commit nothing more (the revoke run by
        close() included), so the next run replays from the last commit made while
        everything was sound."""
        self._crashed.set()
        self.stop_requested.set()
        self.permissions.stop()
        timer.join()
        self.merger.finish(drain=False, timeout=10)
        if why is None:
            log.critical("stopping without committing anything more; the next run replays from the last commit")
        else:
            log.error("%s", why)
        self._consumer.close()
        self._producer.flush(2.0)
        return exit_status

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment.on_assign(consumer, partitions)
        self.probes.group_joined()  # ready even with no partition: it stands by

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.probes.group_lost()
        self.assignment.on_lost(consumer, partitions)

    def _process(self, messages: list[Message]) -> None:
        """Hand each partition's run of a consumed batch over; note client errors."""
        runs, errors = partition_runs(messages)
        for partition, run in runs:
            self._process_run(run, partition)
        for error in errors:
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self.topics.note_missing()
            else:
                self.health.on_error(error)

    def _process_run(self, run: list[Message], partition: int) -> None:
        boundary = self.aggregator.replay_boundary(partition)
        if boundary is not None and run[0].offset() < boundary <= run[-1].offset():
            # Records of published windows below the boundary were counted, those at or
            # after it were not: the aggregator takes runs on one side of it.
            split = next(i for i, message in enumerate(run) if message.offset() >= boundary)
            self._process_run(run[:split], partition)
            self._process_run(run[split:], partition)
            return
        stats = self.stats
        started = time.perf_counter()
        now = self.clock.now()
        skew = self.settings.max_event_time_skew_seconds
        batch, invalid = parse_values(
            list(map(Message.value, run)),
            now,
            skew,
            lambda position: kafka_time_of(run[position].timestamp(), now, skew),
            self.settings.max_field_length,
            messages=run,
        )
        parsed = time.perf_counter()
        invalid_times = []
        for item in invalid:
            invalid_times.append(kafka_time_of(run[item.position].timestamp(), now, skew))
            self.dead_letters.copy(run[item.position], item.reason)
        dead_lettered = time.perf_counter()
        late = self.aggregator.add_batch(partition, run[0].offset(), run[-1].offset() + 1, batch, invalid_times)
        stats.aggregate_seconds += time.perf_counter() - dead_lettered
        stats.dead_letter_seconds += dead_lettered - parsed
        stats.parse_seconds += parsed - started
        stats.records += len(run)
        stats.invalid += len(invalid)
        stats.late += late

    # ---- what operators see ---------------------------------------------------------------

    def _window_published(self, window, acknowledged_at: float) -> None:
        """The merger published a window (its thread): an observer hook for the report."""
        self.report.window_published(window, acknowledged_at)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Read by the metrics endpoint when scraped (another thread): copies only."""
        merger = self.merger
        return self.report.snapshot(
            self.parts.parts_published,
            merger.is_merger,
            merger.merge_lag_seconds(),
            partials_skipped=dict(merger.skipped),
            merge_pending_windows=merger.pending_windows(),
            clock_offset_seconds=self.clock.offset_seconds,
            settings_refused=self.refused is not None,
        )

    # ---- shutdown ---------------------------------------------------------------------------

    def _shutdown(self) -> int:
        """Publish what the watermarks have passed, wait for the acks, commit, close."""
        started = time.monotonic()
        self.permissions.stop()
        acknowledged = self.closer.close_and_publish(wait_seconds=_SHUTDOWN_ACK_SECONDS, commit_now=True)
        if not acknowledged:
            log.warning("stopping with unacknowledged parts: their records stay uncommitted, replayed next run")
        # The merger (if this processor is it) publishes what the last parts complete.
        self.merger.finish(drain=True, timeout=_MERGER_DRAIN_SECONDS)
        still_open = self.aggregator.open_window_count()  # before close() revokes and drops them
        self._producer.flush(2.0)
        self.published.close()
        if not close_within(self._consumer, _CLOSE_SECONDS):
            log.warning(
                "the consumer did not leave group %s within %.0fs (%s); exiting anyway:"
                " what is safe was committed already",
                self.settings.consumer_group_id,
                _CLOSE_SECONDS,
                self.health.outage() or "a rebalance in progress?",
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
    configure_logging(settings.log_level, settings.log_format, tag=settings.processor_name)
    try:
        processor = Processor(settings)
        processor.serve_endpoint()  # before any line: a taken METRICS_PORT is a bad setting, in one line
    except KafkaException as error:  # librdkafka refused a KAFKA_* setting
        text = error.args[0].str() if isinstance(error.args[0], KafkaError) else str(error)
        exit_with_config_error("kafka_processor.py", ConfigError(_setting_in(text, environ), text))
    except ConfigError as error:  # METRICS_PORT taken
        exit_with_config_error("kafka_processor.py", error)

    def request_stop(signum: int, _frame: object) -> None:
        if processor.stop_requested.is_set():
            return
        log.info("%s received: finishing up", signal.Signals(signum).name)
        processor.stop_requested.set()
        threading.Thread(target=_exit_if_stuck, args=(processor.health,), name="shutdown-deadline", daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        code = processor.run()
    except AuthenticationFailed as refused:
        exit_with_config_error("kafka_processor.py", refused.as_config_error())
    except NotAuthorized as refused:  # the cluster's ACLs, at start-up
        print(f"kafka_processor.py: {refused.line()}", file=sys.stderr)
        return 2
    except ConfigError as error:  # a topic setting the cluster refused, a group protocol the broker lacks
        if "." in error.setting:  # a librdkafka property: named as the user wrote it
            error = ConfigError(env_name_of(error.setting, environ), error.problem)
        exit_with_config_error("kafka_processor.py", error)
    if processor.exit_at_once:
        logging.shutdown()
        os._exit(code)
    return code


def _exit_if_stuck(health: BrokerHealth) -> None:
    """A stop must end within a few seconds (an orchestrator kills after its grace
    period anyway). Each step of the shutdown is bounded, but a client call made
    while the group is rebalancing (another member left a moment ago) can wait on
    the coordinator for long (seen on the embedded broker). Nothing is lost by
    leaving then: offsets are only ever committed after what they cover is
    acknowledged, and whoever owns the partitions next replays from there."""
    time.sleep(_STOP_DEADLINE_SECONDS)
    log.warning(
        "shutdown still waiting on the broker after %.0fs (%s); exiting:"
        " uncommitted records are replayed by the next owner",
        _STOP_DEADLINE_SECONDS,
        health.outage() or "a rebalance in progress?",
    )
    logging.shutdown()
    os._exit(0)


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
