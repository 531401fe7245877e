"""The consumer group's lag as the broker reports it: per input partition, the end offset
minus the group's committed offset.

`login_processor_consumer_lag` is each member's own view: records its last fetch saw
and it has not aggregated yet, for the partitions it owns. A member that is stuck, cut
off or gone reports nothing (or an old figure) for its partitions, so a sum of those
can say "no lag" while records pile up. Here every member asks the broker for the
whole group instead, every `READ_SECONDS`, so any one of them tells the truth about
all partitions (the alert takes the largest answer per partition). Committed offsets
only move once a window's parts are acknowledged, so the steady lag is about one
window plus the lateness of input.

Its own consumer (never subscribed, so never a member of the group) on its own daemon
thread, started by the first scrape: nothing here touches the poll loop, and a
processor without METRICS_PORT never starts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaException, TopicPartition

from broker.kafka_io import QUIET_CLIENT_LOGS, REAL_CLIENTS, BrokerHealth, KafkaClients, topic_partition_count
from config import Settings

log = logging.getLogger("metrics")

# How often the lag is read: a metadata request, one committed-offsets request and one
# end-offset request per partition.
READ_SECONDS = 15.0
# How long each of those requests may take.
_REQUEST_SECONDS = 5.0


class GroupLag:
    def __init__(
        self,
        settings: Settings,
        health: BrokerHealth,
        clients: KafkaClients = REAL_CLIENTS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._health = health
        self._clients = clients
        self._sleep = sleep
        self._lock = threading.Lock()
        self._lag: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._consumer = None

    def figures(self) -> dict[int, int]:
        """The last lag read, per input partition ({} until the first read); starts the reader."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="group-lag", daemon=True)
                self._thread.start()
            return dict(self._lag)

    def _run(self) -> None:
        while True:
            if self._health.down_since is None:
                try:
                    lag = self.read()
                except KafkaException as error:
                    log.debug("group lag not read: %s", error)
                else:
                    with self._lock:
                        self._lag = lag
            self._sleep(READ_SECONDS)

    def read(self) -> dict[int, int]:
        """Per input partition: end offset minus the group's committed offset (the low
        watermark where the group has committed nothing)."""
        if self._consumer is None:
            self._consumer = self._clients.consumer(
                {
                    **QUIET_CLIENT_LOGS,
                    **self.settings.consumer_config(),
                    # The pipeline's group, to read its committed offsets; this consumer never
                    # subscribes, so it never joins the group nor takes a partition.
                    "group.id": self.settings.consumer_group_id,
                    "enable.auto.commit": False,
                }
            )
        topic = self.settings.input_topic
        count = topic_partition_count(self._consumer, topic, timeout=_REQUEST_SECONDS)
        partitions = [TopicPartition(topic, p) for p in range(count)]
        if not partitions:
            return {}
        committed = {tp.partition: tp.offset for tp in self._consumer.committed(partitions, timeout=_REQUEST_SECONDS)}
        lag = {}
        for tp in partitions:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=_REQUEST_SECONDS)
            start = committed.get(tp.partition, -1)
            lag[tp.partition] = max(0, high - (start if start >= 0 else low))
        return lag
