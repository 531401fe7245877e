"""Whether the broker speaks the consumer group protocol the settings ask for.

`KAFKA_GROUP_PROTOCOL=consumer` (KIP-848) needs brokers that know the
ConsumerGroupHeartbeat request: Apache Kafka 4.0 or newer. With a broker that does
not (the embedded one, Tansu 0.6.0; Kafka before 3.7) librdkafka gives up on the
group coordinator without a word to the application (no error callback, no
exception): the consumer simply never joins, and the processor would wait for ever
looking healthy. librdkafka states what each broker supports only in its debug log
(context "feature": "Feature BrokerBalancedConsumer: ConsumerGroupHeartbeat (..)
supported by broker", or "NOT supported"), so a short-lived admin client with that
context on asks for metadata and reads the verdict. It joins no group and writes
nothing.

The classic protocol needs no probe: every broker speaks it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException

from broker.kafka_io import QUIET_CLIENT_LOGS, REAL_CLIENTS, BrokerHealth, KafkaClients, sleep_unless_stopped
from config import ConfigError, Settings

log = logging.getLogger("kafka")

# librdkafka's verdict on each broker it connects to (debug context "feature").
_FEATURE = "Feature BrokerBalancedConsumer: ConsumerGroupHeartbeat"
# How long one probe waits for the broker's answer, and before asking again.
_PROBE_SECONDS = 5.0
_RETRY_SECONDS = 2.0


class _FeatureWatcher:
    """librdkafka `logger` of the probe: notes the brokers' verdicts and hands every
    line that is not debug chatter to `passed_on` (`BrokerHealth`'s TLS watcher, if any)."""

    def __init__(self, passed_on: object | None) -> None:
        self.supported = threading.Event()
        self.unsupported = threading.Event()
        self._passed_on = passed_on

    def log(self, level: int, fmt: str, *args: object) -> None:
        text = fmt % args if args else fmt
        if _FEATURE in text:
            (self.unsupported if "NOT supported" in text else self.supported).set()
        elif self._passed_on is not None and level > logging.DEBUG:  # confluent-kafka passes Python levels
            self._passed_on.log(level, "%s", text)


def check_group_protocol(
    settings: Settings,
    health: BrokerHealth,
    should_stop: Callable[[], bool],
    clients: KafkaClients = REAL_CLIENTS,
    probe_seconds: float = _PROBE_SECONDS,
) -> bool:
    """Under `group.protocol=consumer`: raise ConfigError naming the setting if a broker
    does not speak KIP-848; return True once they said they do (at once under the classic
    protocol), False if asked to stop first. A broker that does not answer is asked
    again: `health` says it is unreachable, and raises AuthenticationFailed when it
    refuses the client, as at any start."""
    if settings.group_protocol != "consumer":
        return True
    config = settings.admin_config()
    while not should_stop():
        callbacks = health.callbacks(config)
        watcher = _FeatureWatcher(callbacks.pop("logger", None))
        probe = clients.admin(
            {**QUIET_CLIENT_LOGS, **config, **callbacks, "debug": "feature", "log_level": 7, "logger": watcher}
        )
        try:
            probe.list_topics(timeout=probe_seconds)
        except KafkaException as error:
            health.raise_if_refused(probe)
            health.on_error(KafkaError(KafkaError._TRANSPORT, str(error.args[0] if error.args else error)))
            sleep_unless_stopped(_RETRY_SECONDS, should_stop)
            continue
        deadline = time.monotonic() + probe_seconds
        while not (watcher.supported.is_set() or watcher.unsupported.is_set()) and time.monotonic() < deadline:
            probe.poll(0.1)  # the verdicts come as log lines, served here
        if watcher.unsupported.is_set():
            raise ConfigError(
                "group.protocol",  # the caller names it as the user wrote it (config.env_name_of)
                f"'consumer' (KIP-848) is not supported by the broker at {settings.bootstrap_servers}"
                " (it lacks the ConsumerGroupHeartbeat request; Apache Kafka 4.0 or newer has it): use classic",
            )
        if watcher.supported.is_set():
            health.mark_reachable()
            return True
    return False
