"""kafka_io.BrokerHealth: one log line per change of state, and refused logins at start-up.

The errors are the `KafkaError`s librdkafka hands to `error_cb`; the end-to-end
behaviour against a real broker is in test_guarantees.py (refused credentials) and
test_kafka_processor.py (a broker that is not there yet).
"""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from broker.kafka_io import AuthenticationFailed, BrokerHealth

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
