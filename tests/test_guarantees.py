"""The contract's guarantees, done for real: SIGKILL, rebalances, a broker that dies, junk input.

These are the slow tests (marked `slow`); CI runs them too.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer

from broker.embedded_broker import EmbeddedBroker, free_port
from testkit.oracle import decode_object, expected_windows
from testkit.processes import Topics, aligned_past, latest_by_key, produce, read_topic, run_script, wait_until
from testkit.workloads import invalid_record_positions, login_workload

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def oracle_input(records):
    return [(value, kafka_ms) for _, value, kafka_ms in records]


def published_values(bootstrap: str, topic: str) -> dict[str, dict]:
    return {key: json.loads(value) for key, value in latest_by_key(bootstrap, topic).items()}


def test_sigkill_at_random_moments_changes_nothing(topics, start_processor):
    """100k records, 8 minutes of event time, 4 partitions; killed up to 5 times, restarted each time."""
    rng = random.Random(20261125)
    topics.create(input_partitions=4)
    start = aligned_past(30)
    records = login_workload(start, seconds=480, count=100_000, partitions=4, seed=11)
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows(oracle_input(records))
    assert len(expected) == 16
    # Tiny batches make a run last seconds, so that kills land mid-stream. A short
    # session: each restart waits for the group to expire the member just killed.
    env = topics.env(CONSUME_BATCH_SIZE="5", KAFKA_SESSION_TIMEOUT_MS="3000", KAFKA_HEARTBEAT_INTERVAL_MS="1000")

    # An uninterrupted run, into its own output topic and group, as the yardstick.
    reference_topics = Topics(topics.bootstrap, topics.input, f"{topics.output}-ref", topics.dlq, f"{topics.group}-ref")
    reference = start_processor(reference_topics.env(CONSUME_BATCH_SIZE="5"))
    reference.wait_for_log("assigned all", timeout=60)
    started = time.monotonic()
    wait_until(
        lambda: len(latest_by_key(topics.bootstrap, reference_topics.output)) >= len(expected),
        timeout=180,
        message="the uninterrupted run",
    )
    run_seconds = time.monotonic() - started
    assert reference.terminate()[0] == 0
    uninterrupted = published_values(topics.bootstrap, reference_topics.output)
    assert uninterrupted == expected

    # Kill moments are tied to progress, not to the clock: a run gets through the
    # whole backlog in about a second.
    kills = []

    def output_complete() -> bool:
        return len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected)

    # Windows may all close in one burst at the end (when one partition is read last),
    # so kills are timed on the clock, as fractions of an uninterrupted run, as well as
    # on publish lines.
    # The clock-timed kills come first: commits only follow publishes, so every restart
    # redoes most of the run and a kill within half of one always lands mid-stream.
    plan = [("consuming", 0.2), ("consuming", 0.45), ("consuming", 0.3)]
    plan += [("right after a publish", None), ("during publishing", None)]
    for moment, fraction in plan:
        if output_complete():
            break
        processor = start_processor(env)
        processor.wait_for_log("assigned all", timeout=60)
        if fraction is not None:
            time.sleep(run_seconds * rng.uniform(fraction * 0.5, fraction))
        else:
            seen = processor.log().count("published window")
            wait_until(lambda p=processor, s=seen: p.log().count("published window") > s, 120, 0.002, "a publish")
            if moment == "during publishing":
                time.sleep(rng.uniform(0.0, 0.05))
        processor.kill()
        kills.append((moment, len(latest_by_key(topics.bootstrap, topics.output))))
    final = start_processor(env)
    wait_until(
        lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected), 180, message="the final run"
    )
    assert final.terminate()[0] == 0
    print(f"kills (moment, windows on the output topic at the kill): {kills}")
    # The kills must have interrupted real work, or the test proves nothing.
    assert sum(1 for _, windows_out in kills if windows_out < len(expected)) >= 3, kills
    assert published_values(topics.bootstrap, topics.output) == uninterrupted, kills
    # Every invalid record reached the DLQ at least once (copies may repeat after a kill).
    dead = {
        (int(h["dlq.source.partition"]), int(h["dlq.source.offset"]))
        for h in ({k: v.decode() for k, v in m.headers()} for m in read_topic(topics.bootstrap, topics.dlq))
    }
    assert invalid_record_positions(records) <= dead


def test_a_consumer_joining_and_leaving_the_group_changes_nothing(topics, start_processor):
    """Live input; another member takes partitions for a while and leaves without committing."""
    topics.extra_env = {"WINDOW_SECONDS": "5", "ALLOWED_LATENESS_SECONDS": "2"}
    topics.create(input_partitions=4)
    processor = start_processor(topics.env())
    processor.wait_for_log("assigned all 4", timeout=60)

    produced: list[tuple[int, bytes, int]] = []
    stop = threading.Event()

    def live_producer() -> None:
        rng = random.Random(3)
        index = 0
        while not stop.is_set():
            now = time.time()
            batch = login_workload(int(now), seconds=1, count=40, partitions=4, seed=rng.randint(0, 10**6))
            batch = [(p, v, int(now * 1000)) for p, v, _ in batch]
            produce(topics.bootstrap, topics.input, batch)
            produced.extend(batch)
            index += 1
            stop.wait(0.25)

    producer_thread = threading.Thread(target=live_producer)
    producer_thread.start()
    try:
        time.sleep(4)
        intruder = Consumer(
            {
                "bootstrap.servers": topics.bootstrap,
                "group.id": topics.group,
                "session.timeout.ms": 6000,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "log_level": 2,
            }
        )
        intruder.subscribe([topics.input])
        taken = wait_until(lambda: intruder.consume(100, 0.5) and intruder.assignment(), 30, message="a share")
        assert taken, "the second member got no partitions"
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            intruder.consume(100, 0.5)  # reads, never commits
        intruder.close()  # leaves the group
        processor.wait_for_log("assigned all 4", timeout=60)
        time.sleep(6)
    finally:
        stop.set()
        producer_thread.join()
    expected = expected_windows(oracle_input(produced), window=5)
    wait_until(lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= len(expected), 60, message="every window")
    code, _ = processor.terminate()
    assert code == 0
    log = processor.log()
    assert "revoked; their open windows dropped" in log and "of 4 partitions" in log, log
    assert published_values(topics.bootstrap, topics.output) == expected


def test_processor_survives_a_broker_that_dies_and_comes_back(tmp_path, start_processor):
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()
    try:
        tag = uuid.uuid4().hex[:6]
        topics = Topics(
            broker.bootstrap_servers,
            f"in-{tag}",
            f"out-{tag}",
            f"dlq-{tag}",
            f"group-{tag}",
            # Restarted, the in-memory broker forgets producer ids, and an idempotent
            # producer then waits forever for its acknowledgements (docs/design.md).
            {"WINDOW_SECONDS": "5", "ALLOWED_LATENESS_SECONDS": "2", "KAFKA_ENABLE_IDEMPOTENCE": "false"},
        )
        topics.create()
        processor = start_processor(topics.env())
        processor.wait_for_log("assigned all 4", timeout=60)
        before = login_workload(aligned_past(2, 5), seconds=30, count=300, partitions=4, seed=1)
        produce(topics.bootstrap, topics.input, before)
        wait_until(lambda: latest_by_key(topics.bootstrap, topics.output), 30, message="a first window")

        broker.kill()
        processor.wait_for_log("unreachable", timeout=30)
        time.sleep(3)
        assert processor.process.poll() is None
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()  # empty: memory storage
        processor.wait_for_log("reachable again", timeout=60)
        processor.wait_for_log("creating the pipeline's topics again", timeout=60)
        wait_until(lambda: processor.log().count("assigned all 4") >= 2, 60, message="partitions again")

        now = int(time.time())
        after = [(p, v, int(time.time() * 1000)) for p, v, _ in login_workload(now, 1, 200, 4, seed=2)]
        produce(topics.bootstrap, topics.input, after)
        expected = expected_windows(oracle_input(after), window=5)
        wait_until(
            lambda: all(k in latest_by_key(topics.bootstrap, topics.output) for k in expected),
            60,
            message="windows of the records produced after the restart",
        )
        published = published_values(topics.bootstrap, topics.output)
        assert {k: published[k] for k in expected} == expected
        code, _ = processor.terminate()
        assert code == 0
    finally:
        broker.stop()


def _junk_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(10**30), 10**30)
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, 1.7e9, 1.7e12 + 0.5, 5e-324])
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randint(0, 12)))
    if kind == 5:
        return "x" * rng.choice([1000, 100_000])
    if kind == 6 and depth < 3:
        return [_junk_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7 and depth < 3:
        return {str(rng.random()): _junk_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == 8:
        return rng.choice(["android", "iOS", " web ", "", "   ", "unknown", "10.0.0.1", "RU"])
    return rng.choice([1, 0, -1, 10**13, "1e400", "nan", "  1700000000 ", "0x10", "1_000", str(int(time.time()))])


def fuzz_record(rng: random.Random) -> bytes | None:
    """One arbitrary record: mostly objects with wrong types everywhere, plus plain junk."""
    roll = rng.random()
    if roll < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))  # random bytes
    if roll < 0.07:
        return b'{"ip": "\xff' + bytes([0xFF, 0xFE]) + b'"}'  # invalid UTF-8 in a string
    if roll < 0.08:
        depth = rng.choice([50, 5000])
        return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"  # deep JSON
    if roll < 0.09:
        return json.dumps([_junk_value(rng) for _ in range(3)]).encode()  # an array
    if roll < 0.10:
        return rng.choice([b"null", b"1", b'"s"', b"", None, b'{"ip": NaN}', b"{" * 3])
    fields = ("user_id", "app_version", "device_type", "ip", "locale", "device_id", "timestamp")
    record = {name: _junk_value(rng) for name in fields if rng.random() < 0.8}
    if rng.random() < 0.3:
        record["timestamp"] = int(time.time()) - rng.randint(0, 3600)  # some usable times too
    if rng.random() < 0.01:
        record["padding"] = "y" * 200_000  # a huge record
    return json.dumps(record).encode()


def test_ten_thousand_arbitrary_records_never_stop_it(broker, tmp_path_factory):
    """Every valid record counted, every invalid one in the DLQ with a reason, no crash."""
    from testkit.processes import ProcessorProcess

    tag = uuid.uuid4().hex[:8]
    topics = Topics(broker.bootstrap_servers, f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}")
    topics.create(input_partitions=2)
    base_ms = aligned_past(10) * 1000
    rng = random.Random(424242)
    values = [fuzz_record(rng) for _ in range(10_000)]
    records = [(i % 2, value, base_ms + i * 6) for i, value in enumerate(values)]  # one minute of Kafka time
    produce(topics.bootstrap, topics.input, records)
    processor = ProcessorProcess(topics.env(), tmp_path_factory.mktemp("fuzz") / "processor.log")
    try:

        def everything_counted() -> bool:
            windows = published_values(topics.bootstrap, topics.output).values()
            keys = ("message_count", "late_message_count", "invalid_message_count")
            return sum(w[k] for w in windows for k in keys) >= len(records)

        wait_until(everything_counted, 120, message="every record counted")
        assert processor.terminate()[0] == 0, processor.log()
    finally:
        processor.stop_quietly()
    published = published_values(topics.bootstrap, topics.output)
    totals = Counter()
    for window in published.values():
        totals.update({k: window[k] for k in ("message_count", "late_message_count", "invalid_message_count")})
    invalid = sum(1 for _, v, _ in records if decode_object(v) is None)
    # Absurd but usable past times (2023, 1970+1s) arrive behind the watermark: late, still counted.
    assert totals["message_count"] + totals["late_message_count"] == len(records) - invalid
    assert totals["invalid_message_count"] == invalid
    dead = read_topic(topics.bootstrap, topics.dlq)
    assert len(dead) == invalid
    assert all(dict(m.headers()).get("dlq.reason") for m in dead)
    assert "Traceback" not in processor.log()


@pytest.fixture(scope="module")
def authenticating_broker(tmp_path_factory):
    """A broker started with `--authentication`. Tansu 0.6.0 acknowledges `tansu user
    create` but its memory and S3 storage keep no SCRAM credentials (the login is
    answered `e=unknown-user`; README, "Guarantees"), so it refuses every login: for this
    test, any password is the wrong one."""
    log_path = tmp_path_factory.mktemp("auth-broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path, authentication=True) as running:
        yield running


@pytest.mark.parametrize(
    ("script", "args"),
    [("kafka_processor.py", ()), ("data_generator.py", ("--count", "10")), ("monitor_aggregated_data.py", ())],
)
def test_refused_credentials_fail_fast_with_one_line_and_no_secret(authenticating_broker, tmp_path, script, args):
    password = f"pw-{uuid.uuid4()}"
    env = {
        "PATH": "/usr/bin:/bin",
        "KAFKA_BOOTSTRAP_SERVERS": authenticating_broker.bootstrap_servers,
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "alice",
        "KAFKA_SASL_PASSWORD": password,
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "LOG_LEVEL": "DEBUG",  # even the most talkative level must not show the secret
    }
    started = time.monotonic()
    result = run_script(script, *args, env=env, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    print(script, result.returncode, f"{elapsed:.1f}s", result.stderr.strip())
    assert result.returncode == 2
    assert elapsed < 20, "a refused login must not be retried like an absent broker"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: bad setting KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD: ")
    assert f"the broker at {authenticating_broker.bootstrap_servers} refused them" in lines[0]
    assert "Traceback" not in result.stderr
    assert password not in result.stdout + result.stderr
