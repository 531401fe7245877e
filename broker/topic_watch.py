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
        # Anything with librdkafka's list_topics(topic, timeout): a producer, whose connection
        # answers at once (a consumer's waits behind its fetch, half a second per request).
        client,
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


class RejoinWhenRecreated:
    """After the topics were created again, a group consumer of one it reads (the input's,
    the merge stage's partials) that joined its group while the topic was missing leaves
    the group and joins it again.

    Why: a consumer that joined while a subscribed topic was missing (a broker restarted
    empty: the group forms again before the processor recreates the topics) got no
    partition of it and keeps none: the embedded broker answers every later join of the
    same member with that first, empty, assignment (seen: a processor with no partition
    and no merger for minutes, while its metadata listed the new topic). Leaving and
    joining as a new member fixes it. A consumer that has not completed a join since the
    group dropped it is left alone: it joins by itself once it sees the topic, and leaving
    in the middle of a join makes the same broker wait for ever on the member that left.
    A `BrokerHealth.when_topics_created` hook, run on the poll loop's thread (which owns
    the input consumer)."""

    def __init__(
        self,
        settings: Settings,
        input_consumer,  # librdkafka's Consumer of the input, subscribed by `subscribe_input`
        subscribe_input: Callable[[], None],
        input_joined: Callable[[], bool],  # an assignment came since the group last dropped it
        rejoin_merge: Callable[[], None],  # the merge stage's own (it knows whether it joined)
    ) -> None:
        self._input_topic = settings.input_topic
        self._partials_topic = settings.partials_topic
        self._input_consumer = input_consumer
        self._subscribe_input = subscribe_input
        self._input_joined = input_joined
        self._rejoin_merge = rejoin_merge

    def __call__(self, created: list[str]) -> None:
        if self._input_topic in created and self._input_joined():
            log.info("leaving and joining the group again for the recreated input topic %s", self._input_topic)
            self._input_consumer.unsubscribe()
            self._subscribe_input()
        if self._partials_topic in created:
            self._rejoin_merge()
