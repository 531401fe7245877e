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
def test_offsets_at_time_are_exact_where_the_brokers_own_answer_is_not(topics):
    """Kafka timestamps 1 s apart on 2 partitions, produced in several batches. The
    embedded broker answers ListOffsets-by-time with 0 whatever the time (printed);
    `offsets_at_time` finds the first record at or after each time by reading."""
    from confluent_kafka import Consumer, TopicPartition

    from broker.kafka_io import offsets_at_time
    from config import build_settings
    from testkit.processes import produce

    base = 1_790_000_000_000
    topics.create(input_partitions=2)
    for chunk in range(4):  # four batches per partition: the broker's listed end is the last one's base
        produce(
            topics.bootstrap,
            topics.input,
            [(p, b"x", base + i * 1000) for p in (0, 1) for i in range(chunk * 25, chunk * 25 + 25)],
        )
    settings = build_settings(topics.env())
    consumer = Consumer({"bootstrap.servers": topics.bootstrap, "group.id": "probe", "log_level": 2})
    try:
        for seconds, expected in [(-5, 0), (0, 0), (0.5, 1), (37, 37), (37.2, 38), (99, 99), (99.5, 100), (500, 100)]:
            at = base + int(seconds * 1000)
            brokers = [
                tp.offset
                for tp in consumer.offsets_for_times([TopicPartition(topics.input, p, at) for p in (0, 1)], timeout=10)
            ]
            found = offsets_at_time(settings, topics.input, [0, 1], at)
            print(f"time +{seconds}s: broker says {brokers}, found {found}, expected {expected}")
            assert found == {0: expected, 1: expected}
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
