"""The processor's Prometheus endpoint, scraped directly and by a real Prometheus server;
and its JSON log format, from the same run. First the metric families the alert rules
need (monitoring/alerts.yml), from a given snapshot."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded_broker import free_port
from ops.metrics import MetricsSnapshot, ProcessorMetrics
from testkit.oracle import decode_object
from testkit.processes import published_backlog, require_tool, wait_until


def rendered(snapshot: MetricsSnapshot) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest

    text = generate_latest(ProcessorMetrics(lambda: snapshot).registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_alert_rules_figures_are_exported():
    samples = rendered(
        MetricsSnapshot(
            window_seconds=30,
            allowed_lateness_seconds=5,
            last_publish_time=1_800_000_000.5,
            capped_windows=2,
            partials_skipped={"damaged": 3, "other_pipeline": 1},
            merge_pending_windows=4,
        )
    )
    assert samples[("login_processor_window_seconds", ())] == 30
    assert samples[("login_processor_allowed_lateness_seconds", ())] == 5
    assert samples[("login_processor_last_publish_time_seconds", ())] == 1_800_000_000.5
    assert samples[("login_processor_capped_windows_total", ())] == 2
    assert samples[("login_processor_partials_skipped_total", (("reason", "damaged"),))] == 3
    assert samples[("login_processor_partials_skipped_total", (("reason", "other_pipeline"),))] == 1
    assert samples[("login_processor_merge_pending_windows", ())] == 4


def test_merger_only_figures_are_absent_on_other_processors():
    names = {name for name, _ in rendered(MetricsSnapshot())}
    assert "login_processor_merge_pending_windows" not in names
    assert "login_processor_last_publish_time_seconds" not in names
    assert "login_processor_capped_windows_total" in names  # a counter: 0 from the start


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def processor_with_metrics(topics, start_processor):
    topics.create(input_partitions=4)
    port = free_port()
    records, expected, processor = published_backlog(
        topics, start_processor, 180, 3000, seed=21, METRICS_PORT=str(port), LOG_FORMAT="json"
    )
    return processor, port, records, expected


@pytest.mark.broker
def test_metrics_report_what_was_processed(processor_with_metrics):
    processor, port, records, expected = processor_with_metrics
    invalid = sum(1 for _, v, _ in records if decode_object(v) is None)
    samples = wait_until(
        lambda: (s := scrape(port)) and s.get(("login_processor_windows_published_total", ())) == len(expected) and s,
        20,
        message="metrics of every window",
    )
    assert samples[("login_processor_records_total", ())] == len(records)
    assert samples[("login_processor_invalid_records_total", ())] == invalid
    assert samples[("login_processor_late_records_total", ())] == 0
    missing = Counter()
    for window in expected.values():
        missing.update(window["missing_field_counts"])
    for name, count in missing.items():
        assert samples[("login_processor_missing_fields_total", (("field", name),))] == count
    lags = {labels: value for (name, labels), value in samples.items() if name == "login_processor_consumer_lag"}
    assert len(lags) == 4 and set(lags.values()) == {0}
    newest = expected[max(expected)]
    assert samples[("login_window", (("measure", "message_count"),))] == newest["message_count"]
    assert samples[("login_window", (("measure", "unique_device_count"),))] == newest["unique_device_count"]
    for device, count in newest["device_counts"].items():
        assert samples[("login_window_device_logins", (("device_type", device),))] == count
    assert samples[("login_processor_publish_latency_seconds_count", ())] == len(expected)
    assert samples[("login_processor_stage_seconds_total", (("stage", "parse"),))] > 0
    assert samples[("login_processor_capped_windows_total", ())] == 0
    assert samples[("login_processor_window_seconds", ())] == 30

    # The same run logged JSON: one object per line, with a level and a message.
    processor.terminate()
    lines = [line for line in processor.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert sum("published window" in entry["message"] for entry in entries) == len(expected)


@pytest.mark.broker
def test_a_real_prometheus_scrapes_the_processor(processor_with_metrics, tmp_path):
    binary = require_tool("prometheus", "prometheus")
    _processor, port, records, _expected = processor_with_metrics
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: processor, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n"
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.urlencode({"query": "login_processor_records_total"})

        def answer():
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/query?{query}", timeout=2).read()
            except OSError:
                return None
            result = json.loads(body)["data"]["result"]
            return result[0] if result else None

        found = wait_until(answer, 60, 0.5, "Prometheus to scrape the processor")
        print(f"PromQL login_processor_records_total -> {found}")
        assert found["metric"]["job"] == "processor"
        assert float(found["value"][1]) == len(records)
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.broker
def test_windows_past_a_bound_are_counted(topics, start_processor):
    """MAX_DISTINCT_PER_WINDOW=20: every window with more distinct devices names them in
    capped_counts, and the counter the BoundReached alert watches counts those windows."""
    from testkit.processes import latest_by_key

    topics.create(input_partitions=4)
    port = free_port()
    published_backlog(topics, start_processor, 120, 1500, seed=22, METRICS_PORT=str(port), MAX_DISTINCT_PER_WINDOW="20")
    windows = [json.loads(value) for value in latest_by_key(topics.bootstrap, topics.output).values()]
    capped = sum("capped_counts" in window for window in windows)
    assert capped > 0
    samples = wait_until(
        lambda: (s := scrape(port)) and s.get(("login_processor_windows_published_total", ())) == len(windows) and s,
        20,
        message="metrics of every window",
    )
    assert samples[("login_processor_capped_windows_total", ())] == capped
