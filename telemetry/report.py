"""What the processor tells operators: running totals, one line per published window,
a progress line every 30 s, the metrics snapshot. Nothing here changes the data.

Kept apart from the poll loop so that the loop reads as record -> parse -> window
-> part -> commit, and so that the benchmark can observe the same figures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgspec

from aggregator import Aggregator
from config import Settings
from core.window_value import ClosedWindow, epoch_of, iso_utc
from telemetry.metrics import MetricsSnapshot

log = logging.getLogger("processor")

_PROGRESS_LOG_SECONDS = 30.0


class BrokerState(Protocol):
    """What the report reads of broker/kafka_io.BrokerHealth."""

    down_since: float | None

    @property
    def producers(self) -> list: ...


class OutputFollower(Protocol):
    """What the report reads of broker/pipeline_topics.PublishedFollower."""

    published: Any  # .until: end of the newest window of this pipeline on the output (0: none)
    newest_timestamp: float | None  # Kafka timestamp of the newest one read since start


@dataclass(frozen=True)
class _Health:
    broker: BrokerState
    readiness: Callable[[], tuple[bool, str]]
    output: OutputFollower
    group_lag: Callable[[], Mapping[int, int]]

    def figures(self, settings: Settings) -> dict:
        producers = self.broker.producers
        until = self.output.published.until
        return {
            "broker_reachable": self.broker.down_since is None,
            "ready": self.readiness()[0],
            "output_newest_window_end": until or None,
            "output_last_publish_time": getattr(self.output, "newest_timestamp", None),
            "oldest_unacknowledged_part_seconds": max(
                (p.oldest_unacknowledged(settings.partials_topic) for p in producers), default=0.0
            ),
            "oldest_unacknowledged_window_seconds": max(
                (p.oldest_unacknowledged(settings.output_topic) for p in producers), default=0.0
            ),
            "producers_recreated": sum(p.renewals for p in producers),
            "group_lag": dict(self.group_lag()),
        }


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
    capped_windows: int = 0  # published with `capped_counts`: a per-window bound was reached
    consume_seconds: float = 0.0
    parse_seconds: float = 0.0
    dead_letter_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    publish_seconds: float = 0.0


class ProcessorReport:
    """Owns the totals and the last published window; read by the metrics endpoint
    (another thread) through `snapshot`, which copies."""

    def __init__(self, settings: Settings, aggregator: Aggregator) -> None:
        self.settings = settings
        self.aggregator = aggregator
        self.stats = ProcessorStats()
        self.consumer_lag: dict[int, int] = {}
        self.publish_latency: Callable[[float], None] = lambda _seconds: None
        self._missing_fields: Counter[str] = Counter()  # over published windows
        self._last_window: dict | None = None
        # Wall clock of the last acknowledged window, the start until then: the alert on
        # "no window published for too long" then also covers a processor that never published.
        self._last_publish_time = time.time()
        self._progress_mark = (time.monotonic(), ProcessorStats())
        self._last_unacknowledged_warning = 0.0
        self._lock = threading.Lock()  # windows are published on the merger's thread
        self._started_at = time.time()
        self._health: _Health | None = None

    def watch(
        self,
        broker: BrokerState,
        readiness: Callable[[], tuple[bool, str]],
        output: OutputFollower,
        group_lag: Callable[[], Mapping[int, int]] = dict,
    ) -> None:
        """Where the figures of health come from: BrokerHealth (reachability, the producers),
        the probes, the output topic's follower (what the group published) and the group's
        lag (telemetry/group_lag.py). Read when scraped."""
        self._health = _Health(broker, readiness, output, group_lag)

    def window_published(self, window: ClosedWindow, acknowledged_at: float) -> None:
        """Count it, feed the metrics, and log one line with its headline figures."""
        end = window.start + self.settings.window_seconds
        value = msgspec.json.decode(window.value)
        with self._lock:
            self.stats.windows_published += 1
            self.stats.capped_windows += "capped_counts" in value
            self._missing_fields.update(value["missing_field_counts"])
            self._last_window = value
            self._last_publish_time = acknowledged_at
        self.publish_latency(max(0.0, acknowledged_at - end))
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

    def warn_unacknowledged(self, parts_pending: int, records_queued: int) -> None:
        """At most one line every 30 s while the broker keeps parts waiting."""
        now = time.monotonic()
        if now - self._last_unacknowledged_warning < _PROGRESS_LOG_SECONDS:
            return
        self._last_unacknowledged_warning = now
        log.warning(
            "%d part(s) and %d record(s) in all waiting for the broker's acknowledgement; "
            "their input offsets stay uncommitted until then",
            parts_pending,
            records_queued,
        )

    def maybe_log_progress(self) -> None:
        """One line every 30 s. INFO: invalid and late records are normal operation
        (counted, and the invalid ones copied to the DLQ); WARNING is for what an
        operator must act on."""
        now = time.monotonic()
        since, before = self._progress_mark
        elapsed = now - since
        if elapsed < _PROGRESS_LOG_SECONDS:
            return
        current = replace(self.stats)
        self._progress_mark = (now, current)
        records = current.records - before.records
        watermark = self.aggregator.watermark()
        log.info(
            "last %.0fs: %d records (%.0f/s), %d invalid (to %s), %d late, %d windows open, watermark %s",
            elapsed,
            records,
            records / elapsed,
            current.invalid - before.invalid,
            self.settings.dlq_topic,
            current.late - before.late,
            self.aggregator.open_window_count(),
            "unknown" if watermark is None else iso_utc(watermark),
        )

    def snapshot(
        self,
        parts_published: int,
        is_merger: bool,
        merge_lag_seconds: float | None,
        partials_skipped: Mapping[str, int] | None = None,
        merge_pending_windows: int | None = None,
        clock_offset_seconds: float | None = None,
        settings_refused: bool = False,
    ) -> MetricsSnapshot:
        with self._lock:
            stats = replace(self.stats)
            last = self._last_window
            missing = dict(self._missing_fields)
            last_publish_time = self._last_publish_time
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
            missing_fields=missing,
            consumer_lag=dict(self.consumer_lag),
            open_windows=self.aggregator.open_window_count(),
            watermark=self.aggregator.watermark(),
            last_window=last,
            last_window_end=None if last is None else epoch_of(last["window_end"]),
            parts_published=parts_published,
            is_merger=is_merger,
            merge_lag_seconds=merge_lag_seconds,
            window_seconds=self.settings.window_seconds,
            allowed_lateness_seconds=self.settings.allowed_lateness_seconds,
            last_publish_time=last_publish_time,
            capped_windows=stats.capped_windows,
            partials_skipped=dict(partials_skipped or {}),
            merge_pending_windows=merge_pending_windows,
            clock_offset_seconds=clock_offset_seconds,
            settings_refused=int(settings_refused),
            start_time=self._started_at,
            **(self._health.figures(self.settings) if self._health is not None else {}),
        )
