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


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        yield CounterMetricFamily(f"{PREFIX}_records", "Records consumed from the input topic", value=s.records)
        yield CounterMetricFamily(f"{PREFIX}_invalid_records", "Records sent to the dead-letter topic", value=s.invalid)
        yield CounterMetricFamily(f"{PREFIX}_late_records", "Records for windows already closed", value=s.late)
        yield CounterMetricFamily(f"{PREFIX}_windows_published", "Windows acknowledged", value=s.windows_published)
        missing = CounterMetricFamily(
            f"{PREFIX}_missing_fields", "Missing or invalid fields in published windows", labels=["field"]
        )
        for name, count in sorted(s.missing_fields.items()):
            missing.add_metric([name], count)
        yield missing
        stages = CounterMetricFamily(f"{PREFIX}_stage_seconds", "Time spent per processing stage", labels=["stage"])
        for name, seconds in s.stage_seconds.items():
            stages.add_metric([name], seconds)
        yield stages
        lag = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag", "Records fetched-to-end not yet aggregated", labels=["partition"]
        )
        for partition, records in sorted(s.consumer_lag.items()):
            lag.add_metric([str(partition)], records)
        yield lag
        yield GaugeMetricFamily(f"{PREFIX}_open_windows", "Windows open in memory", value=s.open_windows)
        yield CounterMetricFamily(
            f"{PREFIX}_parts_published", "Window parts acknowledged on the partials topic", value=s.parts_published
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_is_merger", "1 if this processor merges parts and publishes windows", value=int(s.is_merger)
        )
        if s.merge_lag_seconds is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_merge_lag_seconds",
                "Newest part's window end minus the newest published window's end (merger only)",
                value=s.merge_lag_seconds,
            )
        if s.merge_pending_windows is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_merge_pending_windows",
                "Windows the merger holds, not yet published (merger only)",
                value=s.merge_pending_windows,
            )
        skipped = CounterMetricFamily(
            f"{PREFIX}_partials_skipped", "Partials records the merger skipped, by reason", labels=["reason"]
        )
        for reason, count in sorted(s.partials_skipped.items()):
            skipped.add_metric([reason], count)
        yield skipped
        yield CounterMetricFamily(
            f"{PREFIX}_capped_windows",
            "Windows published with capped_counts: a MAX_*_PER_WINDOW bound was reached",
            value=s.capped_windows,
        )
        yield GaugeMetricFamily(f"{PREFIX}_window_seconds", "WINDOW_SECONDS", value=s.window_seconds)
        yield GaugeMetricFamily(
            f"{PREFIX}_allowed_lateness_seconds", "ALLOWED_LATENESS_SECONDS", value=s.allowed_lateness_seconds
        )
        if s.last_publish_time is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_last_publish_time_seconds",
                "When this processor last had a window acknowledged (epoch s, wall clock); its start before the first",
                value=s.last_publish_time,
            )
        if s.watermark is not None:
            yield GaugeMetricFamily(f"{PREFIX}_watermark_seconds", "Stream watermark (epoch s)", value=s.watermark)
        if s.last_window_end is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_last_window_end_seconds",
                "End of the newest published window (epoch s)",
                value=s.last_window_end,
            )
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
