"""The processor's Prometheus endpoint, scraped directly and by a real Prometheus server;
and its JSON log format, from the same run. First the metric families the alert rules
need (monitoring/alerts.yml), from a given snapshot."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded_broker import free_port
from telemetry.metrics import MetricsSnapshot, ProcessorMetrics
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


def test_the_health_figures_are_exported():
    samples = rendered(
        MetricsSnapshot(
            broker_reachable=False,
            ready=False,
            output_newest_window_end=1_800_000_030,
            output_last_publish_time=1_800_000_036.25,
            oldest_unacknowledged_part_seconds=61.5,
            oldest_unacknowledged_window_seconds=0.0,
            producers_recreated=2,
            group_lag={0: 120, 1: 0},
            clock_offset_seconds=-31.5,
            start_time=1_799_999_000.0,
        )
    )
    assert samples[("login_processor_broker_reachable", ())] == 0
    assert samples[("login_processor_ready", ())] == 0
    assert samples[("login_processor_output_newest_window_end_seconds", ())] == 1_800_000_030
    assert samples[("login_processor_output_last_publish_time_seconds", ())] == 1_800_000_036.25
    assert samples[("login_processor_oldest_unacknowledged_part_seconds", ())] == 61.5
    assert samples[("login_processor_oldest_unacknowledged_window_seconds", ())] == 0
    assert samples[("login_processor_producers_recreated_total", ())] == 2
    assert samples[("login_processor_group_lag_records", (("partition", "0"),))] == 120
    assert samples[("login_processor_clock_offset_seconds", ())] == -31.5
    assert samples[("login_processor_start_time_seconds", ())] == 1_799_999_000
    names = {name for name, _ in rendered(MetricsSnapshot())}
    assert "login_processor_clock_offset_seconds" not in names  # not measured: absent, not 0
    assert "login_processor_output_newest_window_end_seconds" not in names  # nothing on the output yet


def fake_group(members: int):
    """`members` processors of one group over the in-memory Kafka, with sim clocks."""
    import time

    from broker.pipeline_topics import Published
    from kafka_processor import Processor
    from tests.fake_kafka import FakeClients
    from tests.test_kafka_io import SimClock, fake_pipeline

    clock = SimClock(time.time())
    from tests.fake_kafka import Faults

    first, cluster, _commits = fake_pipeline(Faults(enabled=False), clock)
    processors = [first]
    for _ in range(members - 1):
        processors.append(Processor(first.settings, clients=FakeClients(cluster), clock=clock, monotonic=clock))
    for processor in processors:
        processor.resume_from(Published())
        processor.start_consuming()
        processor.merger.subscribe()
    return processors, cluster, clock


def test_every_member_reports_the_groups_newest_window_on_the_output_not_its_own_last_publish():
    """The stalled-pipeline alert follows what users see: the newest window on the output
    topic, read there by every member. A member's own memory of its last publish (the
    merger's only; a standby's start time) reset whenever a member started."""
    from telemetry.report import epoch_of
    from tests.test_kafka_io import output_of, turn

    processors, cluster, clock = fake_group(2)
    for _ in range(40):
        clock.now += 0.5
        for processor in processors:
            turn(processor)
    published = output_of(cluster)
    assert published
    newest_end = max(epoch_of(window["window_end"]) for window in published.values())
    newest_at = max(m.timestamp()[1] for m in cluster.logs["out"][0]) / 1000
    [merger] = [p for p in processors if p.merger.is_merger]
    [standby] = [p for p in processors if not p.merger.is_merger]
    for processor in processors:
        snapshot = processor.metrics_snapshot()
        assert snapshot.output_newest_window_end == newest_end
        assert snapshot.output_last_publish_time == newest_at
        assert snapshot.broker_reachable is True
    assert standby.metrics_snapshot().last_publish_time != newest_at  # its own memory: nothing published
    assert merger.metrics_snapshot().ready is True


def test_an_unacknowledged_part_shows_its_age_until_the_recreated_producer_stores_it():
    from tests.fake_kafka import FakeProducer
    from tests.test_kafka_io import turn

    [processor], cluster, clock = fake_group(1)
    for producer in cluster.clients.made:
        if isinstance(producer, FakeProducer):
            producer.unanswered = True
    ages = []
    for _ in range(140):  # 70 s
        clock.now += 0.5
        turn(processor)
        snapshot = processor.metrics_snapshot()
        ages.append((snapshot.oldest_unacknowledged_part_seconds, snapshot.producers_recreated, snapshot.ready))
    peak = max(age for age, _, _ in ages)
    assert 60 <= peak <= 62, peak  # ACK_TIMEOUT_SECONDS, then the new producer stores it
    assert ages[-1][:2] == (0.0, 2)  # the parts' producer, and the merger's alongside it
    assert any(not ready for _, _, ready in ages) and ages[-1][2]


def test_the_group_lag_is_the_brokers_end_minus_the_groups_commit_for_every_partition():
    """Every member reads it for the whole group, whoever owns the partitions."""
    import logging

    from confluent_kafka import TopicPartition

    from broker.kafka_io import BrokerHealth
    from telemetry.group_lag import GroupLag
    from tests.fake_kafka import FakeConsumer

    [processor], cluster, _clock = fake_group(1)
    ends = {p: cluster.end("in", p) for p in range(2)}
    committer = FakeConsumer(cluster, {"group.id": "g"})
    committer.commit(offsets=[TopicPartition("in", 0, ends[0] - 7)])
    lag = GroupLag(processor.settings, BrokerHealth("fake:9", logging.getLogger("test")), cluster.clients)
    assert lag.read() == {0: 7, 1: ends[1]}  # partition 1: nothing committed, from its start


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


def start_prometheus(binary: str, tmp_path, config: str) -> tuple[subprocess.Popen, int]:
    """Debian's Prometheus with `config` (YAML), its data in tmp_path, on a free port:
    (the server, its web port). The caller terminates it."""
    web_port = free_port()
    (tmp_path / "prometheus.yml").write_text(config)
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, web_port


def prometheus_query(web_port: int, expr: str) -> list[dict]:
    """An instant query's result ([] while Prometheus does not answer)."""
    query = urllib.parse.urlencode({"query": expr})
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/query?{query}", timeout=2).read()
    except OSError:
        return []
    return json.loads(body)["data"]["result"]


@pytest.mark.broker
def test_a_real_prometheus_scrapes_the_processor(processor_with_metrics, tmp_path):
    binary = require_tool("prometheus", "prometheus")
    _processor, port, records, _expected = processor_with_metrics
    server, web_port = start_prometheus(
        binary,
        tmp_path,
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: processor, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n",
    )
    try:

        def answer():
            result = prometheus_query(web_port, "login_processor_records_total")
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


@pytest.mark.broker
@pytest.mark.slow
def test_a_real_prometheus_with_the_rules_fires_during_a_broker_outage_and_clears_after(tmp_path, start_processor):
    """Debian's Prometheus, with monitoring/alerts.yml, scraping a processor whose broker
    is stopped: it sees the processor unready and the broker unreachable within seconds,
    fires LoginBrokerUnreachable after its minute, and clears it once the broker is back."""
    from broker.embedded_broker import EmbeddedBroker
    from testkit.processes import ROOT, Topics, aligned_past, produce
    from testkit.workloads import login_workload

    binary = require_tool("prometheus", "prometheus")
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()
    server = None
    try:
        topics = Topics(broker.bootstrap_servers, "in-outage", "out-outage", "dlq-outage", "group-outage")
        topics.create(input_partitions=2)
        produce(topics.bootstrap, topics.input, login_workload(aligned_past(5), 60, 100, 2, seed=9))
        metrics_port = free_port()
        processor = start_processor(topics.env(METRICS_PORT=str(metrics_port)))
        server, web_port = start_prometheus(
            binary,
            tmp_path,
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{ROOT / 'monitoring' / 'alerts.yml'}']\n"
            "scrape_configs: [{job_name: login-processor, static_configs: "
            f"[{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n",
        )

        def value(expr: str) -> float | None:
            result = prometheus_query(web_port, expr)
            return float(result[0]["value"][1]) if result else None

        def firing(alert: str) -> bool:
            return bool(prometheus_query(web_port, f'ALERTS{{alertname="{alert}", alertstate="firing"}}'))

        wait_until(lambda: value("login_processor_ready") == 1, 60, 0.5, "a ready processor, seen by Prometheus")
        assert value("login_processor_broker_reachable") == 1 and not firing("LoginBrokerUnreachable")

        broker.stop()
        stopped = time.monotonic()
        wait_until(lambda: value("login_processor_broker_reachable") == 0, 30, 0.5, "the broker seen unreachable")
        seen_unreachable = time.monotonic() - stopped
        assert value("login_processor_ready") == 0
        # Pending at the next rule evaluation (every second here), which may come after the scrape.
        wait_until(
            lambda: prometheus_query(web_port, 'ALERTS{alertname="LoginBrokerUnreachable", alertstate="pending"}'),
            10,
            0.5,
            "LoginBrokerUnreachable pending",
        )
        wait_until(lambda: firing("LoginBrokerUnreachable"), 120, 1, "LoginBrokerUnreachable firing")
        fired = time.monotonic() - stopped
        print(
            f"broker stopped: unreachable in Prometheus after {seen_unreachable:.0f}s, alert firing after {fired:.0f}s"
        )
        assert 60 <= fired <= 90

        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker-again.log").start()
        back = time.monotonic()
        wait_until(lambda: value("login_processor_broker_reachable") == 1, 60, 0.5, "the broker reachable again")
        wait_until(lambda: not firing("LoginBrokerUnreachable"), 30, 1, "LoginBrokerUnreachable resolved")
        print(f"broker back: alert resolved after {time.monotonic() - back:.0f}s")
        code, seconds = processor.terminate()  # its group-lag reader (scraped) does not hold the exit up
        assert code == 0 and seconds < 15
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        broker.stop()
