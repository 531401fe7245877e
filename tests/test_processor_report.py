"""telemetry/report.py: the figures it feeds the metrics with, from each published window."""

from __future__ import annotations

import json
import time

from aggregator import Aggregator
from config import Settings
from core.window_value import ClosedWindow
from telemetry.report import ProcessorReport


def window(start: int, capped: list[str] | None = None) -> ClosedWindow:
    value = {
        "window_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "window_end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + 30)),
        "message_count": 3,
        "unique_device_count": 3,
        "invalid_message_count": 0,
        "late_message_count": 0,
        "missing_field_counts": {"locale": 1},
    }
    if capped:
        value["capped_counts"] = capped
    return ClosedWindow(start, b"key", json.dumps(value).encode())


def report(**settings) -> ProcessorReport:
    chosen = Settings(**settings)
    return ProcessorReport(chosen, Aggregator(chosen.window_seconds, chosen.allowed_lateness_seconds, chosen.top_ips))


def test_windows_published_with_capped_counts_are_counted():
    r = report()
    r.window_published(window(1_800_000_000), acknowledged_at=1_800_000_040.0)
    r.window_published(window(1_800_000_030, ["unique_device_count", "unique_ip_count"]), 1_800_000_070.0)
    r.window_published(window(1_800_000_060), 1_800_000_100.0)
    snapshot = r.snapshot(parts_published=0, is_merger=True, merge_lag_seconds=None)
    assert (snapshot.windows_published, snapshot.capped_windows) == (3, 1)
    assert snapshot.last_publish_time == 1_800_000_100.0
    assert snapshot.missing_fields == {"locale": 3}


def test_last_publish_time_is_the_start_until_a_window_is_published():
    before = time.time()
    r = report(window_seconds=60, allowed_lateness_seconds=7)
    snapshot = r.snapshot(parts_published=0, is_merger=False, merge_lag_seconds=None)
    assert before <= snapshot.last_publish_time <= time.time()
    assert (snapshot.window_seconds, snapshot.allowed_lateness_seconds) == (60, 7)
    assert (snapshot.partials_skipped, snapshot.merge_pending_windows) == ({}, None)


def test_merger_figures_are_passed_through():
    snapshot = report().snapshot(
        parts_published=4,
        is_merger=True,
        merge_lag_seconds=30.0,
        partials_skipped={"damaged": 2},
        merge_pending_windows=3,
    )
    assert (snapshot.partials_skipped, snapshot.merge_pending_windows, snapshot.parts_published) == (
        {"damaged": 2},
        3,
        4,
    )
