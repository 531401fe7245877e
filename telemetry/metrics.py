"""Prometheus metrics of the processor, read at scrape time.

Nothing here runs per record: the collector asks the processor for a snapshot of
the counters it keeps anyway, when Prometheus scrapes. Only the publish latency
is observed as it happens, once per window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "login_processor"
# Locales are open-ended; the latest window's gauges keep the largest ones only.
LOCALE_LABELS = 20


@dataclass
class MetricsSnapshot:
    """What the processor reports at one instant (cumulative counters, latest values)."""

    records: int = 0
    invalid: int = 0
    late: int = 0
    windows_published: int = 0
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    missing_fields: Mapping[str, int] = field(default_factory=dict)
    consumer_lag: Mapping[int, int] = field(default_factory=dict)
    open_windows: int = 0
    watermark: int | None = None
    last_window: Mapping | None = None  # the latest published window's value
    last_window_end: int | None = None
    parts_published: int = 0  # (window, partition) parts acknowledged on the partials topic
    is_merger: bool = False  # this processor merges the parts and publishes the windows
    merge_lag_seconds: float | None = None  # newest part's window end - newest published window end
    # For the alert rules (monitoring/alerts.yml), so that their thresholds follow the settings.
    window_seconds: int = 0
    allowed_lateness_seconds: int = 0
    # Wall clock of this processor's last acknowledged window; its start time before the first.
    last_publish_time: float | None = None
    capped_windows: int = 0  # windows published with `capped_counts` (a bound was reached)
    partials_skipped: Mapping[str, int] = field(default_factory=dict)  # partials records the merger skipped, by reason
    merge_pending_windows: int | None = None  # windows the merger holds, not yet published (merger only)
    # This machine's clock minus the broker's (broker/broker_clock.py); None: not measured.
    clock_offset_seconds: float | None = None
    settings_refused: int = 0  # 1: its window-shaping settings are not the group's; it acts on nothing
    # What the probes and the alert rules need to tell the truth (docs/operations.md, Metrics):
    broker_reachable: bool | None = None  # as /readyz says it
    ready: bool | None = None  # /readyz answers 200
    # The newest window of this pipeline on the output topic, as this processor reads it
    # there (the group's, whoever published it): its end, and its Kafka timestamp.
    output_newest_window_end: int | None = None
    output_last_publish_time: float | None = None
    # How long the oldest part (window) handed to its producer has waited for an acknowledgement.
    oldest_unacknowledged_part_seconds: float | None = None
    oldest_unacknowledged_window_seconds: float | None = None
    producers_recreated: int = 0  # after ACK_TIMEOUT_SECONDS without an acknowledgement
    group_lag: Mapping[int, int] = field(default_factory=dict)  # per input partition: end - committed, from the broker
    start_time: float | None = None  # when this processor started (epoch s)


# One row per metric read from the snapshot: (name after the prefix, kind, help, the
# snapshot's field). A field that is None is not exported.
_SCALARS = (
    ("records", CounterMetricFamily, "Records consumed from the input topic", "records"),
    ("invalid_records", CounterMetricFamily, "Records sent to the dead-letter topic", "invalid"),
    ("late_records", CounterMetricFamily, "Records for windows already closed", "late"),
    ("windows_published", CounterMetricFamily, "Windows acknowledged", "windows_published"),
    ("open_windows", GaugeMetricFamily, "Windows open in memory", "open_windows"),
    ("parts_published", CounterMetricFamily, "Window parts acknowledged on the partials topic", "parts_published"),
    ("is_merger", GaugeMetricFamily, "1 if this processor merges parts and publishes windows", "is_merger"),
    (
        "merge_lag_seconds",
        GaugeMetricFamily,
        "Newest part's window end minus the newest published window's end (merger only)",
        "merge_lag_seconds",
    ),
    (
        "merge_pending_windows",
        GaugeMetricFamily,
        "Windows the merger holds, not yet published (merger only)",
        "merge_pending_windows",
    ),
    (
        "capped_windows",
        CounterMetricFamily,
        "Windows published with capped_counts: a MAX_*_PER_WINDOW bound was reached",
        "capped_windows",
    ),
    ("window_seconds", GaugeMetricFamily, "WINDOW_SECONDS", "window_seconds"),
    ("allowed_lateness_seconds", GaugeMetricFamily, "ALLOWED_LATENESS_SECONDS", "allowed_lateness_seconds"),
    (
        "last_publish_time_seconds",
        GaugeMetricFamily,
        "When this processor last had a window acknowledged (epoch s, wall clock); its start before the first",
        "last_publish_time",
    ),
    (
        "clock_offset_seconds",
        GaugeMetricFamily,
        "This processor's wall clock minus the broker's, measured from the partials topic (absent: not measurable)",
        "clock_offset_seconds",
    ),
    (
        "settings_refused",
        GaugeMetricFamily,
        "1 if this processor's window-shaping settings are not its group's: it consumes, commits, publishes nothing",
        "settings_refused",
    ),
    ("watermark_seconds", GaugeMetricFamily, "Stream watermark (epoch s)", "watermark"),
    (
        "broker_reachable",
        GaugeMetricFamily,
        "1 while this processor reaches the broker, 0 while it is unreachable (what /readyz says)",
        "broker_reachable",
    ),
    (
        "ready",
        GaugeMetricFamily,
        "1 while /readyz answers 200: a member of the group, the broker reachable, writes acknowledged",
        "ready",
    ),
    (
        "output_newest_window_end_seconds",
        GaugeMetricFamily,
        "End of the newest window of this pipeline on the output topic, read there (epoch s): the group's",
        "output_newest_window_end",
    ),
    (
        "output_last_publish_time_seconds",
        GaugeMetricFamily,
        "Kafka timestamp of the newest window of this pipeline read on the output topic since this processor"
        " started (epoch s)",
        "output_last_publish_time",
    ),
    (
        "oldest_unacknowledged_part_seconds",
        GaugeMetricFamily,
        "How long the oldest part handed to the producer has waited for the broker's acknowledgement (0: none)",
        "oldest_unacknowledged_part_seconds",
    ),
    (
        "oldest_unacknowledged_window_seconds",
        GaugeMetricFamily,
        "How long the window the merger handed to its producer has waited for the broker's acknowledgement (0: none)",
        "oldest_unacknowledged_window_seconds",
    ),
    (
        "producers_recreated",
        CounterMetricFamily,
        "Producers replaced after ACK_TIMEOUT_SECONDS without an acknowledgement",
        "producers_recreated",
    ),
    ("start_time_seconds", GaugeMetricFamily, "When this processor started (epoch s)", "start_time"),
    ("last_window_end_seconds", GaugeMetricFamily, "End of the newest published window (epoch s)", "last_window_end"),
)
# (name after the prefix, kind, help, label, the snapshot's mapping of label value -> value)
_LABELLED = (
    (
        "missing_fields",
        CounterMetricFamily,
        "Missing or invalid fields in published windows",
        "field",
        "missing_fields",
    ),
    ("stage_seconds", CounterMetricFamily, "Time spent per processing stage", "stage", "stage_seconds"),
    ("consumer_lag", GaugeMetricFamily, "Records fetched-to-end not yet aggregated", "partition", "consumer_lag"),
    (
        "group_lag_records",
        GaugeMetricFamily,
        "The consumer group's lag as the broker reports it: end offset minus committed offset",
        "partition",
        "group_lag",
    ),
    (
        "partials_skipped",
        CounterMetricFamily,
        "Partials records the merger skipped, by reason",
        "reason",
        "partials_skipped",
    ),
)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        for name, family, help_text, field_name in _SCALARS:
            value = getattr(s, field_name)
            if value is not None:  # None: not known here (not the merger, no window yet)
                yield family(f"{PREFIX}_{name}", help_text, value=value)
        for name, family, help_text, label, field_name in _LABELLED:
            metric = family(f"{PREFIX}_{name}", help_text, labels=[label])
            for key, value in sorted(getattr(s, field_name).items()):
                metric.add_metric([str(key)], value)
            yield metric
        yield from _window_gauges(s.last_window)


def _window_gauges(window: Mapping | None):
    """The latest window's headline aggregates, as gauges for dashboards."""
    if window is None:
        return
    headline = GaugeMetricFamily("login_window", "Latest published window", labels=["measure"])
    for measure in (
        "message_count",
        "unique_device_count",
        "unique_ip_count",
        "invalid_message_count",
        "late_message_count",
    ):
        headline.add_metric([measure], window[measure])
    yield headline
    devices = GaugeMetricFamily(
        "login_window_device_logins", "Latest window: logins by device type", labels=["device_type"]
    )
    for device, count in window["device_counts"].items():
        devices.add_metric([device], count)
    yield devices
    locales = GaugeMetricFamily(
        "login_window_locale_logins", "Latest window: logins by locale (largest)", labels=["locale"]
    )
    for locale, count in list(window["locale_counts"].items())[:LOCALE_LABELS]:
        locales.add_metric([locale], count)
    yield locales


class ProcessorMetrics:
    """The processor's registry: the snapshot collector plus the publish-latency histogram."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot))
        self.publish_latency = Histogram(
            f"{PREFIX}_publish_latency_seconds",
            "From a window's end to the broker's acknowledgement of it",
            buckets=(1, 2, 5, 6, 7, 10, 15, 30, 60, 120, 300, 900),
            registry=self.registry,
        )
