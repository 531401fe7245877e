"""kafka_processor against a real broker: exact windows, dead letters, shutdown and restart."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest

from testkit.oracle import decode_object, expected_windows
from testkit.processes import aligned_past, latest_by_key, produce, read_topic, run_script, wait_until
from testkit.workloads import login_workload

pytestmark = pytest.mark.broker


def as_oracle_input(records):
    return [(value, kafka_ms) for _, value, kafka_ms in records]


@pytest.mark.both_brokers
def test_ten_minute_backlog_becomes_twenty_exact_windows(topics, start_processor, tmp_path):
    topics.create(input_partitions=4)
    start = aligned_past(30)
    records = login_workload(start, seconds=600, count=8000, partitions=4)
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows(as_oracle_input(records))
    assert len(expected) == 20

    processor = start_processor(topics.env())
    published = wait_until(
        lambda: (got := latest_by_key(topics.bootstrap, topics.output)) and len(got) >= 20 and got,
        timeout=60,
        message="20 windows",
    )
    assert sorted(published) == sorted(expected)
    for key, value in published.items():
        assert json.loads(value) == expected[key], key
        assert list(json.loads(value)) == list(expected[key])  # field order of the contract
    assert sum(json.loads(v)["message_count"] for v in published.values()) == sum(
        w["message_count"] for w in expected.values()
    )
    log = processor.log()
    assert log.count("published window") == 20
    assert "Traceback" not in log and "ERROR" not in log

    # Every invalid record is in the DLQ, unchanged, with headers that say why and whence.
    invalid = [(p, v) for p, v, _ in records if decode_object(v) is None]
    dead = read_topic(topics.bootstrap, topics.dlq)
    assert len(dead) == len(invalid) > 0
    offsets_by_partition: dict[int, list[bytes | None]] = {}
    for partition, value, _ in records:
        offsets_by_partition.setdefault(partition, []).append(value)
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers()}
        assert headers["dlq.source.topic"] == topics.input
        source = offsets_by_partition[int(headers["dlq.source.partition"])][int(headers["dlq.source.offset"])]
        assert message.value() == source
        assert headers["dlq.reason"]

    # The monitor's --json output is the published windows, one object per line.
    monitor = run_script(
        "monitor_aggregated_data.py", "--json", "--from-beginning", "--exit-after", "20", env=topics.env(), cwd=tmp_path
    )
    assert monitor.returncode == 0, monitor.stderr
    lines = monitor.stdout.strip().splitlines()
    assert len(lines) == 20
    assert {json.loads(line)["window_start"]: json.loads(line) for line in lines} == expected


@pytest.mark.both_brokers
def test_sigterm_publishes_what_is_complete_and_a_restart_continues_exactly(topics, start_processor):
    """Short windows so that one is still open at the stop; it must come out once, complete, after restart."""
    topics.extra_env = {"WINDOW_SECONDS": "10", "ALLOWED_LATENESS_SECONDS": "2"}
    topics.create(input_partitions=3)
    backlog_start = aligned_past(10, window=10)
    backlog = login_workload(backlog_start, seconds=120, count=1500, partitions=3, seed=1)
    # A window still open at the stop: event times in the next full window of the wall clock.
    now = int(time.time())
    open_start = now - now % 10 + 20
    still_open = login_workload(open_start, seconds=10, count=300, partitions=3, seed=2)
    produce(topics.bootstrap, topics.input, backlog + still_open)
    expected = expected_windows(as_oracle_input(backlog + still_open), window=10)

    first = start_processor(topics.env())
    wait_until(lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= 12, timeout=60, message="backlog")
    code, seconds = first.terminate()
    assert code == 0, first.log()
    assert seconds < 5, f"shutdown took {seconds:.1f}s"
    after_first = read_topic(topics.bootstrap, topics.output)
    open_key = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(open_start))
    assert open_key not in {m.key().decode() for m in after_first}, "an open window must not be published"

    # More input while the processor is down, then a restart.
    later = login_workload(open_start + 10, seconds=5, count=100, partitions=3, seed=3)
    produce(topics.bootstrap, topics.input, later)
    expected = expected_windows(as_oracle_input(backlog + still_open + later), window=10)
    second = start_processor(topics.env())
    wait_until(
        lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected),
        timeout=90,
        message="windows after restart",
    )
    second.terminate()
    everything = read_topic(topics.bootstrap, topics.output)
    published = {m.key().decode(): json.loads(m.value()) for m in everything}
    assert published == expected
    # Nothing was published twice: a clean stop committed everything it published.
    assert max(Counter(m.key() for m in everything).values()) == 1
    assert "resuming: windows up to" in second.log()


def test_waits_for_a_broker_that_is_not_there_yet(tmp_path, start_processor):
    from broker.embedded_broker import EmbeddedBroker, free_port
    from testkit.processes import Topics

    port = free_port()
    topics = Topics(f"127.0.0.1:{port}", "in-late", "out-late", "dlq-late", "group-late")
    processor = start_processor(topics.env())
    processor.wait_for_log("unreachable", timeout=30)
    time.sleep(2)
    assert processor.process.poll() is None, "the processor must keep retrying"
    with EmbeddedBroker(port=port, log_path=tmp_path / "late-broker.log"):
        processor.wait_for_log("consuming in-late", timeout=60)
        start = aligned_past(5)
        records = login_workload(start, seconds=60, count=200, partitions=4, seed=5)
        produce(topics.bootstrap, topics.input, records)
        expected = expected_windows(as_oracle_input(records))
        wait_until(
            lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected), timeout=60, message="windows"
        )
        assert {k: json.loads(v) for k, v in latest_by_key(topics.bootstrap, topics.output).items()} == expected
        code, _ = processor.terminate()
        assert code == 0


def test_offset_reset_latest_skips_the_old_input_and_still_closes_windows(topics, start_processor):
    """A new group told to start at the end (KAFKA_AUTO_OFFSET_RESET=latest) has nothing
    read and nothing committed: its partitions count as caught up from the fetch's high
    watermark, so the watermark follows the clock and the new records' windows close.

    Tansu answers ListOffsets "latest" with the base offset of a partition's last
    batch plus one, not its end (a single 200-record batch: the consumer started at
    offset 1). So the old input ends with a batch of one record per partition, which
    makes that answer the true end, as Apache Kafka's would be."""
    topics.extra_env = {"WINDOW_SECONDS": "10", "ALLOWED_LATENESS_SECONDS": "2", "KAFKA_AUTO_OFFSET_RESET": "latest"}
    topics.create(input_partitions=4)
    old_start = aligned_past(3, window=10)
    old = login_workload(old_start, seconds=60, count=800, partitions=4, seed=21)
    produce(topics.bootstrap, topics.input, old)
    produce(topics.bootstrap, topics.input, login_workload(old_start + 60, seconds=4, count=4, partitions=4, seed=23))

    processor = start_processor(topics.env())
    processor.wait_for_log("assigned all 4 partitions", timeout=60)
    time.sleep(2)  # the first fetches settle each partition at its end
    now = int(time.time())
    new_start = now - now % 10 + 10  # the next window of the wall clock: not late on arrival
    # New records in partitions 0 and 1 only: 2 and 3 are never read, so only the
    # high watermark of their fetches can tell that they hold nothing new.
    new = login_workload(new_start, seconds=10, count=400, partitions=2, seed=22)
    produce(topics.bootstrap, topics.input, new)
    expected = expected_windows(as_oracle_input(new), window=10)

    def published() -> dict[str, dict]:
        return {k: json.loads(v) for k, v in latest_by_key(topics.bootstrap, topics.output).items()}

    wait_until(lambda: expected.keys() <= published().keys(), 60, message="the new records' windows")
    code, _ = processor.terminate()
    assert code == 0, processor.log()
    assert published() == expected  # no window of the old input: none of it was read


def test_a_window_past_the_distinct_bound_is_flagged_and_logged(topics, start_processor):
    topics.create(input_partitions=1)
    start = aligned_past(5)
    records = []
    for i in range(12):
        event = {"user_id": "u", "device_type": "iOS", "device_id": f"d{i}", "ip": f"10.0.0.{i % 3}"}
        records.append((0, json.dumps(event | {"timestamp": start + i}).encode(), (start + i) * 1000))
    produce(topics.bootstrap, topics.input, records)

    processor = start_processor(topics.env(MAX_DISTINCT_PER_WINDOW="5"))
    published = wait_until(lambda: latest_by_key(topics.bootstrap, topics.output), timeout=60, message="a window")
    window = json.loads(next(iter(published.values())))
    assert window["message_count"] == 12
    assert window["unique_device_count"] == 5  # a lower bound, and said to be one
    assert window["unique_ip_count"] == 3  # under the bound: exact
    assert window["capped_counts"] == ["unique_device_count"]
    processor.wait_for_log("lower bounds: unique_device_count (MAX_DISTINCT_PER_WINDOW 5,")


# ---- failure paths, in process (a fault injected where only a bug or a sick broker gets) ----


def _login(t: int, device: str = "android") -> bytes:
    return json.dumps(
        {"device_type": device, "locale": "RU", "app_version": "1", "device_id": "d", "timestamp": t}
    ).encode()


def _committed(bootstrap: str, group: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 2})
    try:
        return consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        consumer.close()


def _in_process_processor(topics):
    from config import build_settings
    from kafka_processor import Processor

    return Processor(build_settings(topics.env()))


def test_a_crash_commits_nothing(topics):
    """A bug in the poll loop right after windows were published and a commit was asked
    for: the processor exits 1, and closing the consumer (which runs the revoke callback)
    must not commit either. The next run replays from the last sound commit."""
    topics.create(input_partitions=1)
    start = aligned_past(10)
    produce(topics.bootstrap, topics.input, [(0, _login(start + 30 * i + 1), start * 1000) for i in range(4)])
    processor = _in_process_processor(topics)
    original = processor._process

    def publish_then_fail(messages):
        original(messages)
        processor.closer.close_and_publish(wait_seconds=10)  # windows acknowledged, commit asked for
        raise RuntimeError("injected bug")

    processor._process = publish_then_fail
    assert processor.run() == 1
    assert len(latest_by_key(topics.bootstrap, topics.output)) >= 1  # windows were published...
    assert _committed(topics.bootstrap, topics.group, topics.input) < 0  # ...and nothing committed


def test_a_failed_metadata_lookup_during_assignment_does_not_crash(topics, monkeypatch):
    """The partition-count look-up in the assign callback times out (a struggling broker
    during a rebalance): windows wait, the poll loop asks again, nothing crashes."""
    import threading

    from confluent_kafka import KafkaError, KafkaException

    from ingest import assignment

    topics.create(input_partitions=1)
    start = aligned_past(10)
    produce(topics.bootstrap, topics.input, [(0, _login(start + 30 * i + 1), start * 1000) for i in range(3)])
    real_lookup = assignment.topic_partition_count
    calls = []

    def first_call_times_out(consumer, topic):
        calls.append(topic)
        if len(calls) == 1:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected: metadata request timed out"))
        return real_lookup(consumer, topic)

    monkeypatch.setattr(assignment, "topic_partition_count", first_call_times_out)
    processor = _in_process_processor(topics)
    exit_code = []
    runner = threading.Thread(target=lambda: exit_code.append(processor.run()))
    runner.start()
    try:
        published = wait_until(
            lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= 3 or not runner.is_alive(),
            60,
            message="every window",
        )
        assert published and runner.is_alive(), "the processor stopped"
    finally:
        processor.stop_requested.set()
        runner.join(30)
    assert exit_code == [0]
    assert len(calls) >= 2


def test_a_record_with_a_lone_surrogate_goes_to_the_dlq_and_every_window_is_published(topics, start_processor):
    """The issue's four records: three normal ones in three windows, and one whose
    lone surrogate escape came after a number msgspec cannot hold. It used to be
    accepted, made its window unrenderable, and no window was ever published."""
    topics.create(input_partitions=1)
    start = aligned_past(10)
    poison = b'{"ip": 1e400, "device_type": "\\ud800", "timestamp": %d}' % (start + 5)
    records = [(0, _login(start + 1), start * 1000), (0, poison, start * 1000)]
    records += [(0, _login(start + 31), start * 1000), (0, _login(start + 61), start * 1000)]
    produce(topics.bootstrap, topics.input, records)
    processor = start_processor(topics.env())
    published = wait_until(
        lambda: (got := latest_by_key(topics.bootstrap, topics.output)) and len(got) >= 3 and got,
        60,
        message="3 windows",
    )
    first = json.loads(published[min(published)])
    assert (first["message_count"], first["invalid_message_count"]) == (1, 1)
    assert [m.value() for m in read_topic(topics.bootstrap, topics.dlq)] == [poison]
    assert processor.terminate()[0] == 0


def test_kafka_timestamps_far_ahead_are_counted_at_the_wall_clock_and_hold_no_commit(topics):
    """Kafka timestamps a year ahead (a producer with a wrong clock), on an invalid record
    and on a record without an event time: both are counted at the wall clock instead,
    like an event time past the skew. Before, each opened a window a year ahead that held
    the partition's commits until then (a restart would replay everything after them)."""
    import threading

    topics.create(input_partitions=1)
    start = aligned_past(10, window=5)
    future_ms = (int(time.time()) + 365 * 86400) * 1000
    no_event_time = json.dumps({"device_type": "iOS", "locale": "RU", "device_id": "d"}).encode()
    records = [(0, _login(start + 1), start * 1000), (0, _login(start + 6), start * 1000)]
    records += [(0, b"not json", future_ms), (0, no_event_time, future_ms)]
    produce(topics.bootstrap, topics.input, records)
    from config import build_settings
    from kafka_processor import Processor

    processor = Processor(build_settings(topics.env(WINDOW_SECONDS="5", ALLOWED_LATENESS_SECONDS="1")))
    exit_code = []
    runner = threading.Thread(target=lambda: exit_code.append(processor.run()))
    started = time.time()
    runner.start()
    try:
        committed = wait_until(
            lambda: _committed(topics.bootstrap, topics.group, topics.input) == 4,
            40,
            interval=1,
            message="offset 4 committed",
        )
        assert committed, "the partition's commits are held"
    finally:
        processor.stop_requested.set()
        runner.join(30)
    assert exit_code == [0]
    windows = [json.loads(value) for value in latest_by_key(topics.bootstrap, topics.output).values()]
    by_start = {window["window_start"]: window for window in windows}
    from core.window_value import iso_utc

    assert by_start[iso_utc(start)]["message_count"] == 1
    assert by_start[iso_utc(start + 5)]["message_count"] == 1
    recent = [w for w in windows if w["window_start"] >= iso_utc(int(started) - 20)]
    assert sum(w["invalid_message_count"] for w in recent) == 1
    assert sum(w["missing_field_counts"].get("timestamp", 0) for w in recent) == 1


def test_input_written_in_transactions_is_read_to_its_end(topics, start_processor):
    """A transactional producer's commit marker takes an offset of its own after the
    last record: the partition's end is one past it. The consumer's position moves past
    the marker; "the offset after the last record" never reaches the end, so the
    partition never counted as caught up and its last window never closed."""
    from confluent_kafka import Producer

    topics.extra_env = {"WINDOW_SECONDS": "10", "ALLOWED_LATENESS_SECONDS": "2"}
    topics.create(input_partitions=2)
    records = login_workload(aligned_past(2, window=10), seconds=40, count=400, partitions=2, seed=31)
    producer = Producer(
        {"bootstrap.servers": topics.bootstrap, "transactional.id": f"tx-{topics.group}", "log_level": 2}
    )
    producer.init_transactions(10)
    producer.begin_transaction()
    for partition, value, kafka_ms in records:
        producer.produce(topics.input, value=value, partition=partition, timestamp=kafka_ms)
    producer.commit_transaction(10)
    expected = expected_windows(as_oracle_input(records), window=10)
    processor = start_processor(topics.env())

    def published() -> dict[str, dict]:
        return {k: json.loads(v) for k, v in latest_by_key(topics.bootstrap, topics.output).items()}

    wait_until(lambda: expected.keys() <= published().keys(), 40, message="every window, the last one too")
    assert published() == expected
    code, _ = processor.terminate()
    assert code == 0, processor.log()


def test_stopped_before_ever_reaching_the_broker_exits_3_and_its_lines_name_it(tmp_path, start_processor):
    """A processor that never reached its broker exited 0 on Ctrl-C, which scripts and
    supervisors read as a clean run; and its log lines did not say which processor (or
    process) wrote them. (Where it runs is said once the broker took it: see below.)"""
    from broker.embedded_broker import free_port
    from testkit.processes import Topics

    topics = Topics(f"127.0.0.1:{free_port()}", "in-never", "out-never", "dlq-never", "group-never")
    processor = start_processor(topics.env(PROCESSOR_NAME="processor-7"))
    processor.wait_for_log("unreachable", timeout=30)
    processor.process.send_signal(signal.SIGINT)
    assert processor.wait(20) == 3
    pid = processor.process.pid
    lines = processor.log().splitlines()
    assert all(f" processor-7[{pid}] " in line for line in lines), lines
    assert "it never reached the broker at 127.0.0.1:" in lines[-1] and "exit status 3" in lines[-1]


def test_a_record_for_a_published_window_written_after_a_restart_is_counted_once_as_late(topics, start_processor):
    """A dead letter fixed and replayed after the processor restarted, its window long
    published: the restarted processor skipped it as a replay ("windows up to ... already
    published; their replayed records are skipped") and nothing counted it. The output
    says up to which offset each partition's records were counted, so it counts as late
    (in the next window that closes on its partition), once, across further restarts."""
    topics.extra_env = {"WINDOW_SECONDS": "10", "ALLOWED_LATENESS_SECONDS": "2"}
    topics.create(input_partitions=1)
    backlog = login_workload(aligned_past(5, window=10), seconds=60, count=300, partitions=1, seed=7)
    produce(topics.bootstrap, topics.input, backlog)
    expected = expected_windows(as_oracle_input(backlog), window=10)
    first = start_processor(topics.env())
    wait_until(lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected), 60, message="backlog")
    assert first.terminate()[0] == 0
    second = start_processor(topics.env())
    second.wait_for_log("resuming: windows up to", timeout=30)
    second.wait_for_log("assigned all 1 partitions", timeout=30)
    # Three fixed records of the first window, as the DLQ replay tool writes them (source
    # partition and Kafka timestamp), then a live record so that a window closes after them.
    first_window = min(expected)
    start = int(time.mktime(time.strptime(first_window, "%Y-%m-%dT%H:%M:%SZ"))) - time.timezone
    fixed = [
        (0, json.dumps({"device_id": f"fixed{i}", "timestamp": start + i}).encode(), (start + i) * 1000)
        for i in range(3)
    ]
    produce(topics.bootstrap, topics.input, fixed)
    now = time.time()
    produce(
        topics.bootstrap,
        topics.input,
        [(0, json.dumps({"device_id": "live", "timestamp": int(now)}).encode(), int(now * 1000))],
    )

    def late_total() -> int:
        return sum(json.loads(v)["late_message_count"] for v in latest_by_key(topics.bootstrap, topics.output).values())

    wait_until(lambda: late_total() == 3, 60, message="the three replayed records counted as late")
    assert second.terminate()[0] == 0
    third = start_processor(topics.env())  # and after one more restart, not again
    third.wait_for_log("assigned all 1 partitions", timeout=30)
    time.sleep(15)
    assert third.terminate()[0] == 0
    output = {k: json.loads(v) for k, v in latest_by_key(topics.bootstrap, topics.output).items()}
    assert late_total() == 3
    assert {k: output[k] for k in expected} == expected  # the published windows are unchanged
