"""Notices any of the pipeline's topics gone missing, and has them created again with
the project's own settings.

A broker that lost its state (the embedded one, restarted: it keeps topics in memory)
or an operator's mistake can leave the processor without its output, partials or
dead-letter topic while the input is still there, and the processor's clients would
not say so: writes to a missing topic just wait (producers never create topics,
broker/kafka_io.py says why), and the output follower reads nothing. So every
`CHECK_SECONDS` the poll loop asks the broker for each topic's metadata; a topic
missing for `GRACE_SECONDS` (a broker still starting, a topic being created by
another member) makes `PipelineTopics.ensure` create every missing topic with its
partition count and configs (output: 1 partition, compacted). Nothing is asked while
the broker is said to be unreachable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException

from broker.kafka_io import BrokerHealth
from config import Settings

log = logging.getLogger("processor")

# How often the broker is asked whether the topics exist: a few small metadata requests.
CHECK_SECONDS = 5.0
# How long a topic must be missing before the topics are created again.
GRACE_SECONDS = 5.0
# How long one metadata request may take (the poll loop waits on it).
_REQUEST_SECONDS = 2.0
# What a broker answers for a topic it does not have (other errors, a leader being
# elected say, are not "missing").
_UNKNOWN = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


class _Ensures(Protocol):
    def ensure(self) -> bool: ...


class MissingTopics:
    """Called once per poll-loop turn (`check`); costs a clock read between checks."""

    def __init__(
        self,
        settings: Settings,
        client,  # anything with librdkafka's list_topics(topic, timeout): the input consumer
        topics: _Ensures,
        health: BrokerHealth,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._topics = topics
        self._health = health
        self._clock = clock
        self._names = {
            settings.input_topic: "input",
            settings.output_topic: "output",
            settings.partials_topic: "partials",
            settings.dlq_topic: "dead-letter",
        }
        self._next_check = clock() + CHECK_SECONDS
        self._missing_since: dict[str, float] = {}

    def check(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_SECONDS
        if self._health.down_since is not None:
            return  # unreachable: not "missing"
        missing = self.missing()
        if missing is None:
            return
        self._missing_since = {name: self._missing_since.get(name, now) for name in missing}
        due = [name for name, since in self._missing_since.items() if now - since >= GRACE_SECONDS]
        if not due:
            return
        log.warning(
            "%s missing; creating the pipeline's missing topics again, with their own settings",
            ", ".join(f"{self._names[name]} topic {name}" for name in due),
        )
        self._missing_since = {}
        self._topics.ensure()

    def missing(self) -> list[str] | None:
        """The pipeline's topics the broker does not know; None if it did not answer."""
        missing = []
        for name in self._names:
            try:
                entry = self._client.list_topics(name, timeout=_REQUEST_SECONDS).topics.get(name)
            except KafkaException:
                return None
            if entry is None or (entry.error is not None and entry.error.code() in _UNKNOWN):
                missing.append(name)
        return missing
