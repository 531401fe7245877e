"""kafka_io.BrokerHealth: one log line per change of state, and refused logins at start-up.

The errors are the `KafkaError`s librdkafka hands to `error_cb`; the end-to-end
behaviour against a real broker is in test_guarantees.py (refused credentials) and
test_kafka_processor.py (a broker that is not there yet).
"""

from __future__ import annotations

import logging
import re

import pytest
from confluent_kafka import KafkaError, KafkaException

from broker.kafka_io import AuthenticationFailed, BrokerHealth, KafkaClients

REFUSED = KafkaError(
    KafkaError._AUTHENTICATION,
    "sasl_plaintext://127.0.0.1:9/bootstrap: SASL authentication error: SASL SCRAM authentication failed: "
    "broker responded with unknown-user (after 24ms in state AUTH_REQ)",
)
DOWN = KafkaError(
    KafkaError._TRANSPORT, "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused"
)


class ClientWithoutCallbacks:
    """Stands in for a client whose pending callbacks were already served."""

    def poll(self, _timeout: float) -> int:
        return 0


def test_a_login_refused_at_start_up_is_raised_with_the_brokers_reason():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.on_error(REFUSED)
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    error = raised.value.as_config_error()
    assert error.setting == "KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD"
    assert error.problem == (
        "the broker at 127.0.0.1:9 refused them: SASL authentication error: "
        "SASL SCRAM authentication failed: broker responded with unknown-user"
    )


def test_an_absent_broker_is_not_a_refused_login():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.on_error(DOWN)
    health.raise_if_refused(ClientWithoutCallbacks())  # nothing raised: it is retried
    assert health.down_since is not None


def test_a_refusal_after_the_broker_accepted_us_is_logged_once_and_retried(caplog):
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.mark_reachable()
    with caplog.at_level(logging.INFO, logger="test"):
        for _ in range(5):  # librdkafka repeats it on every reconnect
            health.on_error(REFUSED)
        health.raise_if_refused(ClientWithoutCallbacks())
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "refused the credentials" in caplog.records[0].getMessage()


def test_all_brokers_down_is_not_logged_and_an_outage_is_logged_once(caplog):
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    with caplog.at_level(logging.INFO, logger="test"):
        health.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        health.on_error(DOWN)
        health.on_error(DOWN)
    assert len(caplog.records) == 1 and "unreachable" in caplog.records[0].getMessage()


UNTRUSTED = KafkaError(
    KafkaError._SSL,
    "ssl://127.0.0.1:9/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: "
    "broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA "
    "certificates are installed (install ca-certificates package) (after 3ms in state SSL_HANDSHAKE)",
)
ALERT = KafkaError(
    KafkaError._SSL,
    "ssl://127.0.0.1:9/bootstrap: SSL handshake failed: error:0A000410:SSL routines::ssl/tls alert handshake "
    "failure: SSL alert number 40 (after 2ms in state SSL_HANDSHAKE)",
)
# What librdkafka logs (and never hands to error_cb) when a broker that requires a client
# certificate ends a TLS 1.3 connection after the handshake; seen through tests/tls_support.TlsProxy.
CLOSED_AFTER_HANDSHAKE = (
    "ssl://127.0.0.1:9/bootstrap: Disconnected: SSL connection closed by peer (after 0ms in state APIVERSION_QUERY)"
)
TLS_CONFIG = {"bootstrap.servers": "127.0.0.1:9", "security.protocol": "SSL", "ssl.ca.location": "/ca.pem"}


def test_an_untrusted_broker_certificate_names_the_ca_setting():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.on_error(UNTRUSTED)
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    error = raised.value.as_config_error()
    assert error.setting == "KAFKA_SSL_CA_LOCATION"
    assert error.problem.startswith("TLS with the broker at 127.0.0.1:9 failed: its certificate is not trusted (")
    assert "certificate verify failed" in error.problem and "after 3ms" not in error.problem


def test_a_handshake_alert_from_the_broker_names_the_client_certificate_settings():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.on_error(ALERT)
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    assert raised.value.as_config_error().setting == "KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION"


# What Apache Kafka (`ssl.client.auth=required`) answers a client without a certificate:
# an alert, where a TLS 1.3 proxy only closes (seen in tests/test_tls.py).
KAFKA_WANTS_A_CERTIFICATE = KafkaError(
    KafkaError._SSL,
    "ssl://127.0.0.1:9/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls alert bad certificate: "
    "SSL alert number 42 (after 5ms in state APIVERSION_QUERY)",
)


def test_an_alert_to_a_client_without_a_certificate_says_none_is_set():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.callbacks(TLS_CONFIG)  # no ssl.certificate.location
    health.on_error(KAFKA_WANTS_A_CERTIFICATE)
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    error = raised.value.as_config_error()
    assert error.setting == "KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION"
    assert error.problem.startswith(
        "TLS with the broker at 127.0.0.1:9 failed: it requires a client certificate (mutual TLS) and none is set"
    )
    assert "alert bad certificate" in error.problem  # what the broker said, kept


def test_a_broker_closing_tls_connections_after_the_handshake_wants_a_client_certificate():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    watcher = health.callbacks(TLS_CONFIG)["logger"]
    for _ in range(2):
        watcher.log(logging.INFO, "FAIL [rdkafka#producer-1] [thrd:x]: %s", CLOSED_AFTER_HANDSHAKE)
    health.raise_if_refused(ClientWithoutCallbacks())  # twice could be a blip: retried
    watcher.log(logging.INFO, "FAIL [rdkafka#producer-1] [thrd:x]: %s", CLOSED_AFTER_HANDSHAKE)
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    error = raised.value.as_config_error()
    assert error.setting == "KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION"
    assert "requires a client certificate (mutual TLS) and none is set" in error.problem


def test_with_a_client_certificate_the_close_says_it_was_not_accepted():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    watcher = health.callbacks({**TLS_CONFIG, "ssl.certificate.location": "/client.pem"})["logger"]
    for _ in range(3):
        watcher.log(logging.INFO, "%s", CLOSED_AFTER_HANDSHAKE)
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    assert "does not accept this client's certificate" in raised.value.as_config_error().problem


def test_plaintext_clients_get_no_log_watcher_and_other_log_lines_change_nothing():
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    assert set(health.callbacks({"bootstrap.servers": "127.0.0.1:9"})) == {"error_cb"}
    watcher = health.callbacks(TLS_CONFIG)["logger"]
    for _ in range(5):
        watcher.log(
            logging.INFO, "%s", "ssl://h:9/1: Disconnected: SSL connection closed by peer (after 9000ms in state UP)"
        )
    health.raise_if_refused(ClientWithoutCallbacks())  # an idle connection closed: not a refusal


def test_a_tls_refusal_after_the_broker_accepted_us_is_logged_once_and_retried(caplog):
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    health.mark_reachable()
    with caplog.at_level(logging.INFO, logger="test"):
        for _ in range(3):
            health.on_error(UNTRUSTED)
        health.raise_if_refused(ClientWithoutCallbacks())
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_the_transport_error_that_follows_a_failed_handshake_is_not_an_outage(caplog):
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"))
    with caplog.at_level(logging.INFO, logger="test"):
        health.on_error(
            KafkaError(
                KafkaError._TRANSPORT,
                "ssl://127.0.0.1:9/bootstrap: error:0A000086:SSL routines::certificate verify failed "
                "(after 1ms in state SSL_HANDSHAKE)",
            )
        )
    assert health.down_since is None and not caplog.records
    with pytest.raises(AuthenticationFailed) as raised:
        health.raise_if_refused(ClientWithoutCallbacks())
    assert raised.value.as_config_error().setting == "KAFKA_SSL_CA_LOCATION"


@pytest.mark.broker
@pytest.mark.both_brokers
def test_offsets_at_time_never_skip_a_record_at_or_after_the_time(topics, caplog):
    """Kafka timestamps 1 s apart on 2 partitions, written in four batches each;
    partition 1 in four transactions, so a commit marker takes an offset after each,
    stamped when its transaction ended (now, later than every record here).
    Apache Kafka's own answer (ListOffsets by time: the first offset, marker or
    record, stamped at or after the time; -1, the end, when none is) is taken as it
    is, with nothing read to doubt it and nothing logged: on partition 0 that is the
    first record at or after the time, on partition 1 from the first marker on it is
    that marker (read from there, records before the time come too: a recomputation
    skips them, docs/operations.md). The embedded broker answers 0 for every time:
    found wrong by reading the first record, the offsets are found by a search over
    reads (exact where timestamps grow), and that is said. Either way no record at or
    after the time is before the offset found."""
    import logging

    from confluent_kafka import Consumer, Producer, TopicPartition

    from broker.kafka_io import offsets_at_time
    from config import build_settings

    base = 1_790_000_000_000
    topics.create(input_partitions=2)
    plain = Producer({"bootstrap.servers": topics.bootstrap, "linger.ms": 50, "log_level": 2})
    transactional = Producer(
        {"bootstrap.servers": topics.bootstrap, "transactional.id": f"tx-{topics.group}", "log_level": 2}
    )
    transactional.init_transactions(15)
    for chunk in range(4):
        transactional.begin_transaction()
        for i in range(chunk * 25, chunk * 25 + 25):
            plain.produce(topics.input, b"x", partition=0, timestamp=base + i * 1000)
            transactional.produce(topics.input, b"x", partition=1, timestamp=base + i * 1000)
        assert plain.flush(10) == 0
        transactional.commit_transaction(15)
    # Where record i is: a marker after each 25 on partition 1 (at 25, 51, 77, 103).
    offsets = {0: list(range(100)), 1: [i + i // 25 for i in range(100)]}
    markers = {0: [], 1: [25, 51, 77, 103]}
    settings = build_settings(topics.env())
    consumer = Consumer({"bootstrap.servers": topics.bootstrap, "group.id": "probe", "log_level": 2})
    try:
        for seconds in (-5, 0, 0.5, 25, 37, 37.2, 99, 99.5, 500):
            at = base + int(seconds * 1000)
            asked = [TopicPartition(topics.input, p, at) for p in (0, 1)]
            brokers = [tp.offset for tp in consumer.offsets_for_times(asked, timeout=10)]
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="kafka"):
                found = offsets_at_time(settings, topics.input, [0, 1], at)
            print(f"time +{seconds}s: the broker says {brokers}, found {found}")
            late = [i for i in range(100) if base + i * 1000 >= at]
            doubted = [r.getMessage() for r in caplog.records]
            for partition in (0, 1):
                read = [i for i, offset in enumerate(offsets[partition]) if offset >= found[partition]]
                assert set(late) <= set(read), (seconds, partition, found)  # nothing late skipped
                if topics.broker == "kafka":
                    # Kafka's rule: the first offset stamped at or after the time, markers too.
                    stamped = [offsets[partition][i] for i in late] + markers[partition]
                    assert found[partition] == min(stamped, default=100 + len(markers[partition])), (seconds, found)
                else:
                    assert read == late, (seconds, partition, found)
            if topics.broker == "kafka":
                assert doubted == [], seconds
            elif at > base:
                assert len(doubted) == 2 and all("found by reading" in line for line in doubted), doubted
    finally:
        consumer.close()


def test_a_replication_factor_the_cluster_refuses_is_a_bad_setting(monkeypatch):
    """Apache Kafka refuses a factor above its broker count (the embedded broker takes
    any): injected at the admin client, the one place that sees it."""
    from concurrent.futures import Future

    from broker import kafka_io
    from broker.kafka_io import ensure_topics
    from config import ConfigError, build_settings

    class RefusingAdmin:
        def __init__(self, _config):
            pass

        def list_topics(self, timeout):
            return type("Metadata", (), {"topics": {}})()

        def create_topics(self, topics, operation_timeout):
            refused = Future()
            refused.set_exception(
                KafkaException(
                    KafkaError(
                        KafkaError.INVALID_REPLICATION_FACTOR, "Replication factor: 3 larger than available brokers: 1."
                    )
                )
            )
            return {topic.topic: refused for topic in topics}

    monkeypatch.setattr(kafka_io, "AdminClient", RefusingAdmin)
    settings = build_settings({"TOPIC_REPLICATION_FACTOR": "3"})
    with pytest.raises(ConfigError) as raised:
        ensure_topics(settings, {"t": 1}, lambda: False, BrokerHealth("x", logging.getLogger("test")))
    assert raised.value.setting == "TOPIC_REPLICATION_FACTOR"
    assert raised.value.problem == (
        "the cluster refused 3 for topic t: Replication factor: 3 larger than available brokers: 1."
    )


# ---- a fatal client error is a crash (the real Processor over the in-memory Kafka) ----------


def fake_pipeline(faults, clock=None, **env):
    """A Processor over tests/fake_kafka.py with five minutes of past input on 2 partitions
    (start-up's topic creation and tail read done here: the topics exist, nothing is
    published). `clock`: its wall and monotonic clock (default: the real ones, for `_run`
    and its threads). Returns (processor, cluster, commits): commits as (group, topic,
    partition, offset); `cluster.records` holds the input as the oracle takes it."""
    import time

    from config import build_settings
    from kafka_processor import Processor
    from testkit.workloads import login_workload
    from tests.fake_kafka import FakeClients, FakeCluster

    settings = build_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "fake:9",
            "INPUT_TOPIC": "in",
            "OUTPUT_TOPIC": "out",
            "DLQ_TOPIC": "dlq",
            "PARTIALS_TOPIC": "partials",
            "CONSUMER_GROUP_ID": "g",
            "CLOSE_INTERVAL_SECONDS": "0.05",
            **env,
        }
    )
    cluster = FakeCluster(clock or time.time, faults)
    for topic, count in (("in", 2), ("out", 1), ("dlq", 1), ("partials", 1)):
        cluster.create_topic(topic, count)
    start = int(cluster.clock()) - 600
    cluster.records = []
    for partition, value, kafka_ms in login_workload(start - start % 30, 300, 600, 2, seed=3):
        cluster.append("in", partition, None, value, timestamp_ms=kafka_ms)
        cluster.records.append((value, kafka_ms))
    commits = []
    cluster.on_commit = lambda *commit: commits.append(commit)
    clocks = {} if clock is None else {"clock": clock, "monotonic": clock}
    cluster.clients = FakeClients(cluster)
    processor = Processor(settings, clients=cluster.clients, **clocks)
    processor.prepare = lambda: True  # the topics exist and nothing is published yet
    return processor, cluster, commits


def run_until_it_stops(processor, seconds: float = 30.0) -> int | None:
    """Processor._run() on its own thread; its exit status, or None if still running after
    `seconds` (then stopped)."""
    import threading

    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("code", processor._run()), daemon=True)
    runner.start()
    runner.join(seconds)
    if runner.is_alive():
        processor.stop_requested.set()
        runner.join(30)
        return None
    return result["code"]


@pytest.mark.parametrize("via", ["flush", "error_cb", "produce", "system_error"])
@pytest.mark.parametrize("topic", ["partials", "out"], ids=["parts-producer", "window-producer"])
def test_a_fatal_producer_error_stops_the_processor_with_one_line_and_commits_nothing_after(topic, via, caplog):
    """librdkafka's fatal error (here an idempotent producer's sequence error), on the
    producer of parts or on the merger's producer of windows, reported as confluent-kafka
    does (raised from flush/poll, or as a SystemError caused by it), through error_cb, or
    raised by produce(): every write after it fails, so the processor stops with exit
    status 1 and one line saying why, commits nothing after it, and prints no traceback.
    Before: it logged the error and retried for ever (error_cb, produce), or crashed with
    a traceback (flush, system_error)."""
    from tests.fake_kafka import FATAL_ERROR, Faults

    faults = Faults(fatal_at=3, fatal_via=via, topics={topic})
    processor, cluster, commits = fake_pipeline(faults)
    fatal_at_commit = []  # how many commits there were when the fatal error happened
    fail = cluster.faults.fatal_now

    def fatal_now(name: str) -> bool:
        met = fail(name)
        if met:
            fatal_at_commit.append(len(commits))
        return met

    cluster.faults.fatal_now = fatal_now
    with caplog.at_level(logging.INFO):
        code = run_until_it_stops(processor)
    assert fatal_at_commit, "the fatal error was never met"
    assert code == 1, f"exit status {code} (None: still running 30 s after the fatal error)"
    assert commits[fatal_at_commit[0] :] == [], "committed after the fatal error"
    saying_why = [r for r in caplog.records if r.levelno >= logging.ERROR and "fatal" in r.getMessage().lower()]
    assert len(saying_why) == 1, [r.getMessage() for r in saying_why]
    assert FATAL_ERROR.str() in saying_why[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "a traceback: a fatal client error is not a bug"


# ---- a producer the broker never answers is recreated -------------------------------------


class SimClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def turn(processor) -> None:
    """One turn of each of the processor's loops, as its threads would take them."""
    processor.poll_once(0)
    processor.closer.close_and_publish(0)
    processor.merger.turn(0)


def output_of(cluster) -> dict[str, dict]:
    import json

    return {m.key().decode(): json.loads(m.value()) for m in cluster.logs["out"][0]}


@pytest.mark.parametrize("resent", ["taken", "refused"])
def test_producers_the_broker_never_answers_are_recreated_and_every_window_comes_out(resent, caplog):
    """A broker that lost its state (the embedded one, restarted) forgets the ids of
    idempotent producers, which then wait for ever: nothing they send is acknowledged, nor
    refused. Each producer, the processor's (parts, DLQ copies) and the merger's (windows),
    is not ready once ACK_TIMEOUT_SECONDS (60 s by default) pass without an acknowledgement
    (/readyz says so and names it), and is replaced: the new one sends what the old one
    held, and the windows come out exactly. Before, they waited for ever while /readyz said
    ready. `refused`: the new producers refuse their first 30 writes (a full queue), so what
    the old ones held goes back to each writer's own retry path (parts, DLQ copies, windows)."""
    import time

    from broker.pipeline_topics import Published
    from testkit.oracle import expected_windows
    from tests.fake_kafka import FakeProducer, Faults

    clock = SimClock(time.time())
    processor, cluster, commits = fake_pipeline(Faults(enabled=False), clock)
    made = cluster.clients.made
    for producer in made:
        if isinstance(producer, FakeProducer):
            producer.unanswered = True  # the broker forgot them
    if resent == "refused":
        clients = cluster.clients
        make = clients.producer

        def refusing_at_first(config):
            producer, refusals = make(config), iter(range(30))
            produce = producer.produce

            def first_refused(*args, **kwargs):
                if next(refusals, None) is not None:
                    raise BufferError("Local: Queue full (injected)")
                produce(*args, **kwargs)

            producer.produce = first_refused
            return producer

        clients.producer = refusing_at_first
    processor.resume_from(Published())
    processor.start_consuming()
    processor.merger.subscribe()
    seen: dict[str, float] = {}  # /readyz's answers, first seen at (seconds from the start)
    started = clock.now
    with caplog.at_level(logging.INFO):
        for _ in range(600):  # five minutes
            clock.now += 0.5
            for _ in ("before the turn", "after it"):
                ready, why = processor.probes.readiness()
                seen.setdefault("ready" if ready else re.sub(r"\d+s\b", "Ns", why), clock.now - started)
                turn(processor)
            if output_of(cluster) == expected_windows(cluster.records, now=clock.now + 10_000):
                break
    print("\n".join(f"{at:6.1f}s  {answer}" for answer, at in seen.items()))
    assert output_of(cluster) == expected_windows(cluster.records, now=clock.now + 10_000)
    stalls = {
        answer.split(" (the producer of ")[1].split(",")[0]: at for answer, at in seen.items() if "(the " in answer
    }
    # The parts' producer is the first to wait past the bound; the merger's is replaced
    # alongside it (a broker that forgot one producer id forgot them all, and an old
    # producer writing under an id handed out again is refused as fatal), so /readyz never
    # gets to name the windows' producer.
    assert set(stalls) == {"parts and dead-letter copies"}, seen
    assert 60 <= stalls["parts and dead-letter copies"] <= 61  # ACK_TIMEOUT_SECONDS, one turn
    assert all("no acknowledgement from the broker for Ns" in answer for answer in seen if "(the " in answer)
    recreated = [r.getMessage() for r in caplog.records if "recreated it" in r.getMessage()]
    assert len(recreated) == 2, recreated  # each producer once: the new ones are answered
    assert any(
        line.startswith("the producer of windows: replaced with the producer of parts and dead-letter copies;")
        for line in recreated
    ), recreated
    assert processor.probes.readiness()[0]
    assert processor._producer.renewals == processor.merger._producer.renewals == 1
    # The DLQ copies the first producer held were sent again: each invalid record is there.
    from testkit.oracle import decode_object

    invalid = sum(decode_object(value) is None for value, _ in cluster.records)
    copied = {
        (dict(m.headers())["dlq.source.partition"], dict(m.headers())["dlq.source.offset"])
        for m in cluster.logs["dlq"][0]
    }
    assert len(copied) == invalid > 0


class Answerable:
    """A stand-in for librdkafka's Producer: keeps what it is given until told to answer."""

    made: list[Answerable] = []

    def __init__(self, config: dict) -> None:
        self.config = config
        self.queue: list = []
        self.purged = False
        Answerable.made.append(self)

    def produce(self, topic, on_delivery=None, **kwargs) -> None:
        self.queue.append((topic, kwargs, on_delivery))

    def answer(self, error=None) -> None:
        queue, self.queue = self.queue, []
        for _topic, kwargs, on_delivery in queue:
            on_delivery(error, kwargs["value"])

    def poll(self, timeout=0) -> int:
        return 0

    def flush(self, timeout=0) -> int:
        return len(self.queue)

    def purge(self, in_queue=True, in_flight=True, blocking=True) -> None:
        self.purged = True

    def __len__(self) -> int:
        return len(self.queue)


class AnswerableClients(KafkaClients):
    def producer(self, config: dict) -> Answerable:
        return Answerable(config)


def renewable(clock, timeout: float = 60.0, accepts_connections=lambda _node: True):
    from broker.kafka_io import RenewableProducer

    Answerable.made = []
    # Back when the cluster answers: this test is about the producer, not the node check.
    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"), accepts_connections=accepts_connections)
    return RenewableProducer("parts", {"acks": "all"}, health, timeout, AnswerableClients(), clock), health


def test_a_renewed_producer_sends_again_in_order_and_each_write_is_reported_once():
    clock = SimClock(1000.0)
    producer, _health = renewable(clock)
    reports = []
    for value in (b"a", b"b", b"c"):
        producer.produce("partials", value=value, on_delivery=lambda error, value: reports.append((value, error)))
        clock.now += 1
    [first] = Answerable.made
    assert first.config["allow.auto.create.topics"] is False  # a topic is created with its settings, never by a write
    clock.now += 56  # 59 s since the first write
    assert producer.flush(0) == 3 and producer.renewals == 0
    clock.now += 2
    producer.flush(0)
    assert producer.renewals == 1 and first.purged
    [_, second] = Answerable.made
    assert [kwargs["value"] for _, kwargs, _ in second.queue] == [b"a", b"b", b"c"]
    first.answer(KafkaError(KafkaError._PURGE_QUEUE))  # the old one's reports: not passed on
    first_values = list(reports)
    second.answer()
    assert first_values == [] and reports == [(b"a", None), (b"b", None), (b"c", None)]
    assert producer.stall() is None and producer.unacknowledged_for() == 0


def test_the_wait_stands_still_while_the_broker_is_down_and_renewals_that_do_not_help_are_spaced_out():
    clock = SimClock(1000.0)
    nodes = Nodes()
    producer, health = renewable(clock, accepts_connections=nodes)
    producer.produce("partials", value=b"a", on_delivery=lambda *_: None)
    nodes.down.add("127.0.0.1:9")
    health.on_error(DOWN)  # the broker is away: that is /readyz's reason, a new producer would not help
    for _ in range(10):
        clock.now += 30
        producer.flush(0)
    assert producer.renewals == 0 and producer.stall() is None
    nodes.down.clear()
    health.mark_reachable()
    back_at = clock.now
    clock.now += 30
    producer.flush(0)
    assert producer.renewals == 0  # counted from when the broker was back
    renewed_at = []
    for _ in range(int(3600 / 5)):  # an hour in which nothing is ever acknowledged
        clock.now += 5
        before = producer.renewals
        producer.flush(0)
        if producer.renewals > before:
            renewed_at.append(clock.now)
        stall = producer.stall()  # not ready from ACK_TIMEOUT_SECONDS on, until an acknowledgement
        assert (stall is not None) == (clock.now - back_at > 60), (clock.now - back_at, stall)
    gaps = [later - earlier for earlier, later in zip(renewed_at, renewed_at[1:], strict=False)]
    assert renewed_at[0] - back_at == 65  # past ACK_TIMEOUT_SECONDS after the broker was back (5 s turns)
    assert gaps[:4] == [120, 240, 480, 480], gaps  # doubling, up to 8 x ACK_TIMEOUT_SECONDS
    Answerable.made[-1].answer()
    assert producer.stall() is None


# ---- one node of a cluster ---------------------------------------------------------------------

CLUSTER = "127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003"


def refused(node: str, handle: str = "2") -> KafkaError:
    """What librdkafka reports for each failed reconnect to `node` (host:port)."""
    return KafkaError(KafkaError._TRANSPORT, f"{node}/{handle}: Connect to ipv4#{node} failed: Connection refused")


class Nodes:
    """Which nodes accept TCP connections: what BrokerHealth checks before it calls one back."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    def __call__(self, node: str) -> bool:
        return node not in self.down


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_one_node_of_a_cluster_down_is_said_once_when_it_goes_and_once_when_it_is_back(caplog, monkeypatch):
    """One node of three SIGKILLed: every client of the processor reports each failed
    reconnect to it, while the other two answer (acknowledgements, metadata). Each answer
    used to end the trouble ("reachable again after 0s") and the next failed reconnect to
    begin it again: 4 to 10 pairs of lines per processor per kill, on Apache Kafka. The
    node is back when it accepts connections again and the cluster answers."""
    nodes = Nodes()
    health = BrokerHealth(CLUSTER, logging.getLogger("test"), accepts_connections=nodes)
    clock = [100.0]
    monkeypatch.setattr("broker.kafka_io.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="test"):
        health.mark_reachable()
        nodes.down.add("127.0.0.1:9002")
        for _ in range(5):  # its reconnects fail; the other nodes answer meanwhile
            health.on_error(refused("127.0.0.1:9002"))
            health.on_error(KafkaError(KafkaError._TRANSPORT, "GroupCoordinator: 127.0.0.1:9002: Connect failed"))
            clock[0] += 1.5
            health.mark_reachable()
        assert health.down_since == 100.0, "still down: /readyz says so all along"
        nodes.down.clear()
        clock[0] += 1.5
        health.mark_reachable()
        health.on_error(refused("127.0.0.1:9002"))  # an error from before it came back, served late
        clock[0] += 1.5
        health.mark_reachable()
    assert messages(caplog) == [
        "broker 127.0.0.1:9002 unreachable (127.0.0.1:9002/2: Connect to ipv4#127.0.0.1:9002 failed: Connection"
        " refused); retrying until it is back",
        "broker 127.0.0.1:9002 reachable again after 9s",
    ]
    assert health.down_since is None


def test_a_refused_connection_served_late_for_a_node_that_accepts_connections_is_not_an_outage(caplog, monkeypatch):
    """A client polled seldom serves a failed reconnect from an outage long after the node
    came back, even one this processor never said was down (its other clients did not
    try that node meanwhile): seen on the 3-node Kafka, 24 and 31 s after two nodes came
    back, "unreachable" with no "reachable again" before the processors stopped, and
    /readyz red meanwhile. A refused connection to a node that accepts connections now
    is from before: nothing to say."""
    nodes = Nodes()
    health = BrokerHealth(CLUSTER, logging.getLogger("test"), accepts_connections=nodes)
    clock = [100.0]
    monkeypatch.setattr("broker.kafka_io.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="test"):
        health.mark_reachable()
        clock[0] += 30
        health.on_error(refused("127.0.0.1:9001", "1"))
        assert health.down_since is None
        nodes.down.add("127.0.0.1:9001")  # and one that does not: an outage, said
        health.on_error(refused("127.0.0.1:9001", "1"))
    assert messages(caplog) == [
        "broker 127.0.0.1:9001 unreachable (127.0.0.1:9001/1: Connect to ipv4#127.0.0.1:9001 failed: Connection"
        " refused); retrying until it is back",
    ]
    assert health.down_since == 130.0


def test_two_nodes_down_are_each_said_and_the_trouble_ends_when_both_are_back(caplog, monkeypatch):
    nodes = Nodes()
    health = BrokerHealth(CLUSTER, logging.getLogger("test"), accepts_connections=nodes)
    clock = [100.0]
    monkeypatch.setattr("broker.kafka_io.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="test"):
        nodes.down |= {"127.0.0.1:9001", "127.0.0.1:9003"}
        health.on_error(refused("127.0.0.1:9001", "1"))
        health.on_error(refused("127.0.0.1:9003", "3"))
        health.on_error(refused("127.0.0.1:9001", "bootstrap"))
        clock[0] += 2
        health.mark_reachable()  # the third node answers metadata
        nodes.down.discard("127.0.0.1:9001")
        clock[0] += 2
        health.mark_reachable()
        assert health.down_since == 100.0
        nodes.down.clear()
        clock[0] += 2
        health.mark_reachable()
    assert [m.split(" (")[0] for m in messages(caplog)] == [
        "broker 127.0.0.1:9001 unreachable",
        "broker 127.0.0.1:9003 unreachable",
        "broker 127.0.0.1:9001 reachable again after 4s",
        "broker 127.0.0.1:9003 reachable again after 6s",
    ]
    assert health.down_since is None


def test_an_error_that_names_no_broker_is_the_bootstraps(caplog):
    """A failed request of ours (a time-out) names no broker: the trouble is the cluster's,
    said with the bootstrap servers, and ends at the next answer."""
    health = BrokerHealth(CLUSTER, logging.getLogger("test"), accepts_connections=Nodes())
    with caplog.at_level(logging.INFO, logger="test"):
        health.on_error(KafkaError(KafkaError._TRANSPORT, "Local: Timed out"))
        health.mark_reachable()
    assert [m.split(" (")[0] for m in messages(caplog)] == [
        f"broker {CLUSTER} unreachable",
        f"broker {CLUSTER} reachable again after 0s",
    ]
