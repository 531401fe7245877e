"""kafka_io.BrokerHealth: one log line per change of state, and refused logins at start-up.

The errors are the `KafkaError`s librdkafka hands to `error_cb`; the end-to-end
behaviour against a real broker is in test_guarantees.py (refused credentials) and
test_kafka_processor.py (a broker that is not there yet).
"""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError

from kafka_io import AuthenticationFailed, BrokerHealth

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
