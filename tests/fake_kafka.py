"""An in-memory Kafka at the client boundary, for faults a real broker will not make on cue.

The processor makes every client through `kafka_io.KafkaClients`; `FakeClients` hands
in these instead: the subset of confluent-kafka's `Producer` and `Consumer` the
processor uses, over logs kept in a `FakeCluster`, with real `confluent_kafka.Message`
objects. Faults come from a `Faults` plan, decided per call: a full local queue
(`BufferError`) at any produce, a delivery refused or delayed, a failed read of
committed offsets or of a topic's tail.

It keeps one rule of confluent-kafka that no broker shows on cue: a rebalance callback
must not call list_topics() (nor poll, consume, close) on its own consumer. Each of those
calls clears the call state confluent-kafka keeps for the consumer; a second callback
served by the same poll then aborts the process (an assertion in CallState_get, exit
-6). Under KIP-848 a poll serves an assignment and a revocation together: seen on
Apache Kafka 4.4 with confluent-kafka 2.16.1. The fake fails such a call at once.

It is a harsher world than a broker, on purpose: a group hands the new assignment to
each member as soon as that member next polls, so a member that has not polled yet
(a paused one, a zombie) still acts on partitions that are already someone else's,
and commits are never fenced. Real brokers do no worse.

Used by tests/test_part_publisher.py, tests/test_merger.py and the seeded
fault-schedule test (tests/test_fault_schedules.py). Not a model of the processor:
the processor's own code runs on it.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from broker.kafka_io import KafkaClients


@dataclass
class Faults:
    """Which faults happen, decided per call. Probabilities (0..1) with a seeded random,
    plus explicit one-off schedules (`buffer_errors_at`: the n-th produce calls, 1-based)."""

    seed: int = 0
    buffer_error: float = 0.0  # a produce() call raises BufferError
    refuse: float = 0.0  # a delivery is refused (the callback gets an error)
    delay: float = 0.0  # a delivery is not made at this flush (it stays queued, in order)
    committed_fails: float = 0.0  # consumer.committed() raises
    tail_read_fails: float = 0.0  # reading a topic's end (get_watermark_offsets uncached) raises
    buffer_errors_at: set[int] = field(default_factory=set)
    deliveries: list[str] = field(default_factory=list)  # explicit outcomes, used first: "ok", "refuse", "delay"
    produce_calls: int = 0
    enabled: bool = True
    # The n-th produce call (1-based) to a topic faults apply to makes its producer fail fatally, as librdkafka's
    # fatal errors do (an idempotent producer the cluster refuses, a sequence error after a
    # broker lost acknowledged data), reported `fatal_via` (FATAL_VIA): then every later
    # produce() of that producer raises `_FATAL`.
    fatal_at: int | None = None
    fatal_via: str = "flush"
    fatal_calls: int = 0  # produce calls to the topics faults apply to, for `fatal_at`
    # Topics whose produce/delivery faults apply (None: every topic).
    topics: set[str] | None = None

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)

    def _roll(self, probability: float) -> bool:
        return self.enabled and probability > 0 and self.random.random() < probability

    def applies(self, topic: str) -> bool:
        return self.topics is None or topic in self.topics

    def on_produce(self, topic: str) -> bool:
        """True: raise BufferError for this produce call."""
        self.produce_calls += 1
        if not self.applies(topic):
            return False
        return (self.enabled and self.produce_calls in self.buffer_errors_at) or self._roll(self.buffer_error)

    def fatal_now(self, topic: str) -> bool:
        """Whether this produce call (to `topic`) meets the fatal error."""
        if not self.applies(topic):
            return False
        self.fatal_calls += 1
        return self.enabled and self.fatal_at == self.fatal_calls

    def on_delivery(self, topic: str) -> str:
        if not self.applies(topic):
            return "ok"
        if self.deliveries:
            return self.deliveries.pop(0)
        if self._roll(self.delay):
            return "delay"
        if self._roll(self.refuse):
            return "refuse"
        return "ok"


# How a fatal error reaches the application: raised from the next poll()/flush() (what
# confluent-kafka does), handed to `error_cb` (what other bindings do), raised by the
# produce() call that met it, or raised from poll()/flush() as a SystemError caused by it
# (what confluent-kafka does when a delivery report runs while the error is pending; seen
# with a restarted broker refusing an old producer id).
FATAL_VIA = ("flush", "error_cb", "produce", "system_error")
FATAL_ERROR = KafkaError(
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    "ProduceRequest for partials [0] with 1 message(s) failed due to sequence desynchronization (injected)",
    fatal=True,
)


def _partition_for(key: bytes | None, partitions: int) -> int:
    return 0 if partitions == 1 or key is None else zlib.crc32(key) % partitions


class FakeCluster:
    """Topics (logs of Messages), committed offsets, consumer groups; a clock for timestamps."""

    def __init__(self, clock: Callable[[], float], faults: Faults | None = None) -> None:
        self.clock = clock
        self.faults = faults or Faults(enabled=False)
        self.logs: dict[str, list[list[Message]]] = {}
        self.committed: dict[tuple[str, str, int], int] = {}
        self.groups: dict[str, FakeGroup] = {}
        self.on_commit: Callable[[str, str, int, int], None] | None = None  # (group, topic, partition, offset)
        # Topics whose records the broker stamps with its own time (message.timestamp.type=LogAppendTime).
        self.log_append_time: set[str] = set()

    def create_topic(self, name: str, partitions: int, log_append_time: bool = False) -> None:
        self.logs.setdefault(name, [[] for _ in range(partitions)])
        if log_append_time:
            self.log_append_time.add(name)

    def add_partitions(self, name: str, total: int, notice: bool = True) -> None:
        """Partitions added to a topic; `notice=False`: the groups reading it learn of them
        only at `notice_partitions` (a client's metadata refresh comes later)."""
        log = self.logs[name]
        log.extend([] for _ in range(total - len(log)))
        if notice:
            self.notice_partitions(name)

    def notice_partitions(self, name: str) -> None:
        for group in self.groups.values():
            if any(name in member.topics for member in group.members):
                group.rebalance()

    def append(self, topic, partition, key, value, headers=None, timestamp_ms=None) -> Message:
        if topic not in self.logs:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, topic))
        log = self.logs[topic][partition]
        if topic in self.log_append_time:
            stamp = (TIMESTAMP_LOG_APPEND_TIME, int(self.clock() * 1000))
        else:
            stamp = (TIMESTAMP_CREATE_TIME, int(self.clock() * 1000) if timestamp_ms is None else timestamp_ms)
        message = Message(
            topic=topic,
            partition=partition,
            offset=len(log),
            key=key,
            value=value,
            headers=list(headers) if headers else None,
            timestamp=stamp,
        )
        log.append(message)
        return message

    def metadata(self, topic: str | None = None) -> SimpleNamespace:
        """What `list_topics` answers."""
        topics = {}
        for name, partitions in self.logs.items():
            if topic is None or name == topic:
                topics[name] = SimpleNamespace(partitions={p: None for p in range(len(partitions))}, error=None)
        return SimpleNamespace(topics=topics)

    def group(self, group_id: str) -> FakeGroup:
        return self.groups.setdefault(group_id, FakeGroup(self))

    def end(self, topic: str, partition: int) -> int:
        return len(self.logs[topic][partition])


class FakeGroup:
    """A consumer group: range assignment over the members in join order. A change of
    members gives each member, on its next poll, a revoke of what it had and then its new
    assignment (the eager protocol); a member of the KIP-848 protocol
    (`group.protocol=consumer`) gets only the change, as librdkafka hands it over: a
    revoke of what it loses (if anything), then an assignment of what it gains (possibly
    empty)."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.members: list[FakeConsumer] = []
        self.assignment: dict[int, list[tuple[str, int]]] = {}  # id(member) -> partitions

    def join(self, member: FakeConsumer) -> None:
        if member not in self.members:
            self.members.append(member)
        self.rebalance()

    def leave(self, member: FakeConsumer) -> None:
        if member in self.members:
            self.members.remove(member)
            self.rebalance()

    def rebalance(self) -> None:
        new: dict[int, list[tuple[str, int]]] = {id(m): [] for m in self.members}
        topics = sorted({t for m in self.members for t in m.topics})
        for topic in topics:
            subscribed = [m for m in self.members if topic in m.topics]
            partitions = range(len(self.cluster.logs.get(topic, [])))
            for index, member in enumerate(subscribed):
                share = [p for p in partitions if p * len(subscribed) // max(len(partitions), 1) == index]
                new[id(member)].extend((topic, p) for p in share)
        self.assignment = new
        for member in self.members:
            member.pending_rebalance = True


class FakeProducer:
    def __init__(self, cluster: FakeCluster, config: dict) -> None:
        self.cluster = cluster
        self.config = config
        self.queue: list[tuple] = []  # (topic, partition, key, value, headers, on_delivery, timestamp)
        self.purged: list[tuple] = []  # purged, their (failed) delivery reports not yet served
        # Nothing it sends is ever acknowledged, nor refused: a broker that forgot this
        # idempotent producer's id (the embedded broker, restarted).
        self.unanswered = False
        self.fatal: KafkaError | None = None
        self._fatal_unreported = False

    def produce(self, topic, value=None, key=None, partition=-1, on_delivery=None, timestamp=0, headers=None):
        if self.fatal is not None:
            raise KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message: Local: Fatal error"))
        faults = self.cluster.faults
        if faults.on_produce(topic):
            raise BufferError("Local: Queue full")
        fatal_now = faults.fatal_now(topic)
        if fatal_now and faults.fatal_via == "produce":
            self._fail_fatally()
            raise KafkaException(self.fatal)
        if topic not in self.cluster.logs:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, topic))
        if partition is None or partition < 0:
            partition = _partition_for(key, len(self.cluster.logs[topic]))
        self.queue.append((topic, partition, key, value, headers, on_delivery, timestamp or None))
        if fatal_now:  # met while sending this one
            self._fail_fatally()

    def _fail_fatally(self) -> None:
        """librdkafka's fatal error: what is queued is purged (its reports fail), and the
        error is reported once, at the next poll()/flush()."""
        self.fatal = FATAL_ERROR
        self._fatal_unreported = self.cluster.faults.fatal_via != "produce"
        self.purge()

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        """Every queued message fails, its report served at the next poll()/flush()."""
        self.purged.extend(self.queue)
        self.queue = []

    def poll(self, timeout: float = 0) -> int:
        return self._deliver()

    def flush(self, timeout: float = 0) -> int:
        self._deliver()
        return len(self.queue)

    def _report_fatal(self) -> None:
        if not self._fatal_unreported:
            return
        self._fatal_unreported = False
        if self.cluster.faults.fatal_via == "error_cb":
            callback = self.config.get("error_cb")
            if callback is not None:
                callback(self.fatal)
        elif self.cluster.faults.fatal_via == "system_error":
            raise SystemError(
                "<built-in method poll of cimpl.Producer object> returned a result with an exception set"
            ) from KafkaException(self.fatal)
        else:
            raise KafkaException(self.fatal)

    def _deliver(self) -> int:
        served = 0
        self._report_fatal()  # librdkafka queues the error before the purge's reports
        purged, self.purged = self.purged, []
        for topic, partition, key, value, headers, on_delivery, _timestamp in purged:
            served += 1
            if on_delivery:
                message = Message(topic=topic, partition=partition, key=key, value=value, headers=headers)
                on_delivery(KafkaError(KafkaError._PURGE_QUEUE, "Local: Purged in queue"), message)
        while self.queue and not self.unanswered:
            topic, partition, key, value, headers, on_delivery, timestamp = self.queue[0]
            outcome = self.cluster.faults.on_delivery(topic)
            if outcome == "delay":
                break  # this and the rest stay queued, in order (one request in flight)
            self.queue.pop(0)
            served += 1
            if outcome == "refuse":
                error = KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, "refused (injected)")
                message = Message(topic=topic, partition=partition, key=key, value=value, headers=headers)
                if on_delivery:
                    on_delivery(error, message)
                continue
            message = self.cluster.append(topic, partition, key, value, headers, timestamp)
            if on_delivery:
                on_delivery(None, message)
        return served

    def __len__(self) -> int:
        return len(self.queue) + len(self.purged)

    def list_topics(self, topic=None, timeout=-1):
        return self.cluster.metadata(topic)


class FakeConsumer:
    def __init__(self, cluster: FakeCluster, config: dict) -> None:
        self.cluster = cluster
        self.config = config
        self.group_id = config.get("group.id", "")
        self.incremental = str(config.get("group.protocol", "classic")).lower() == "consumer"
        self.eof = str(config.get("enable.partition.eof", "false")).lower() == "true"
        self.reset_earliest = str(config.get("auto.offset.reset", "earliest")) in ("earliest", "smallest", "beginning")
        self.topics: list[str] = []
        self.callbacks: dict[str, Callable] = {}
        self.owned: list[tuple[str, int]] = []
        self.positions: dict[tuple[str, int], int] = {}  # next offset to read; absent: not fetched yet
        self.cached_high: dict[tuple[str, int], int] = {}
        self.unfetched: set[tuple[str, int]] = set()  # assigned, first fetch not yet answered
        self.eof_sent: set[tuple[str, int]] = set()
        # librdkafka reports a position only once a message was handed over (seen on the
        # embedded broker: -1001 for a partition read to its end before any record came).
        self.delivered_from: set[tuple[str, int]] = set()
        self.paused_at: set[tuple[str, int]] = set()
        self.pending_rebalance = False
        self.lost_pending = False
        self.inside_consume: Callable[[], None] | None = None
        self.inside_position: Callable[[], None] | None = None  # the same, inside position()
        self.in_group = False
        self.closed = False
        self._in_callback = 0  # rebalance callbacks running (see the module docstring)

    # -- group membership ---------------------------------------------------------

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        self.topics = list(topics)
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.in_group = True
        self.cluster.group(self.group_id).join(self)

    def unsubscribe(self) -> None:
        if self.in_group:
            self.in_group = False
            self.cluster.group(self.group_id).leave(self)
            self.pending_rebalance = False
            self._set_owned([], "revoke")

    def expire(self) -> None:
        """The group lost this member (its session timed out): it learns on its next poll."""
        if self.in_group:
            self.cluster.group(self.group_id).leave(self)
            self.in_group = False
            self.lost_pending = True

    def _serve_rebalance(self) -> None:
        if self.lost_pending:
            self.lost_pending = False
            self._set_owned([], "lost")
            # librdkafka rejoins by itself after a lost session
            self.in_group = True
            self.cluster.group(self.group_id).join(self)
        if self.pending_rebalance and self.in_group:
            self.pending_rebalance = False
            new = list(self.cluster.group(self.group_id).assignment.get(id(self), []))
            if self.incremental:
                self._change_owned(new)
                return
            self._set_owned([], "revoke")
            self._set_owned(new, "assign")

    def _change_owned(self, new: list[tuple[str, int]]) -> None:
        """KIP-848: revoke what is no longer ours (if anything), then assign what is new."""
        revoked = [tp for tp in self.owned if tp not in new]
        added = [tp for tp in new if tp not in self.owned]
        if revoked:
            self.owned = [tp for tp in self.owned if tp not in revoked]
            self._forget_positions(revoked)
            self._call_back(self.callbacks.get("revoke"), revoked)
        self.owned += added
        self._start_positions(added)
        self._call_back(self.callbacks.get("assign"), added)

    def _call_back(self, callback: Callable | None, partitions: list[tuple[str, int]]) -> None:
        if callback is None:
            return
        self._in_callback += 1
        try:
            callback(self, [TopicPartition(t, p) for t, p in partitions])
        finally:
            self._in_callback -= 1

    def _not_in_a_callback(self, call: str) -> None:
        if self._in_callback:
            raise AssertionError(
                f"{call}() on a consumer inside its own rebalance callback: confluent-kafka aborts the process"
                " (CallState_get) if the same poll serves another callback"
            )

    def _forget_positions(self, partitions: list[tuple[str, int]]) -> None:
        # Not the cached ends: librdkafka keeps a partition's watermarks when it is taken
        # away and answers them, as they were, when it comes back, until its first fetch
        # is answered (seen on the embedded broker, 2026-12-07: revoked at end 50, 100
        # written, assigned again at 120: cached (0, 50), position -1001).
        for tp in partitions:
            self.positions.pop(tp, None)
            self.delivered_from.discard(tp)

    def _start_positions(self, partitions: list[tuple[str, int]]) -> None:
        self.unfetched.update(partitions)
        for topic, partition in partitions:
            committed = self.cluster.committed.get((self.group_id, topic, partition))
            if committed is not None:
                self.positions[(topic, partition)] = committed

    def _set_owned(self, new: list[tuple[str, int]], how: str) -> None:
        if how in ("revoke", "lost"):
            old, self.owned = self.owned, []
            self._forget_positions(old)
            callback = self.callbacks.get("lost" if how == "lost" else "revoke")
            if how == "lost" and callback is None:
                callback = self.callbacks.get("revoke")
            if old or how == "revoke":
                self._call_back(callback, old)
            return
        self.owned = list(new)
        self._start_positions(new)
        self._call_back(self.callbacks.get("assign"), new)

    # -- manual assignment -------------------------------------------------------------

    def assign(self, partitions: list[TopicPartition]) -> None:
        if self.incremental and self.in_group:
            # What librdkafka answers a member of an incremental group (its message is
            # "Changes to the current assignment must be made using incremental_assign()").
            raise KafkaException(KafkaError(KafkaError._STATE, "Failed to set assignment: Local: Erroneous state"))
        self.owned = [(tp.topic, tp.partition) for tp in partitions]
        self._set_positions(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        """Add `partitions` (with their start offsets) to what this member reads."""
        self.owned += [(tp.topic, tp.partition) for tp in partitions if (tp.topic, tp.partition) not in self.owned]
        self._set_positions(partitions)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        gone = [(tp.topic, tp.partition) for tp in partitions]
        self.owned = [tp for tp in self.owned if tp not in gone]
        self._forget_positions(gone)

    def _set_positions(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            committed = self.cluster.committed.get((self.group_id, tp.topic, tp.partition))
            if tp.offset == OFFSET_END:
                self.positions[key] = self.cluster.end(tp.topic, tp.partition)
            elif tp.offset == OFFSET_INVALID and committed is not None:
                self.positions[key] = committed  # librdkafka: "no offset given" reads from the commit
            elif tp.offset in (OFFSET_BEGINNING, OFFSET_INVALID) or tp.offset < 0:
                self.positions[key] = 0
            else:
                self.positions[key] = tp.offset

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.owned]

    # -- reading ------------------------------------------------------------------------

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """`inside_consume`, when set, runs once after the fetch (the cached ends are
        taken) and before the call returns: a process paused inside its poll turn."""
        messages = self._consume(num_messages)
        pause, self.inside_consume = self.inside_consume, None
        if pause is not None:
            pause()
        return messages

    def _consume(self, num_messages: int) -> list[Message]:
        self._not_in_a_callback("consume")
        if self.closed:
            raise RuntimeError("Consumer closed")
        self._serve_rebalance()
        # librdkafka's fetcher asks for every assigned partition in each request, whatever
        # the application consumes, so every partition's cached end is as fresh as the last
        # fetch: here, this call.
        # A partition assigned by this very call is not fetched yet: its first fetch is
        # answered by the next one.
        for key in self.owned:
            if key not in self.paused_at and key not in self.unfetched and key[0] in self.cluster.logs:
                self.cached_high[key] = len(self.cluster.logs[key[0]][key[1]])
        out: list[Message] = []
        for key in list(self.owned):
            topic, partition = key
            if key in self.paused_at or key in self.unfetched or topic not in self.cluster.logs:
                continue
            log = self.cluster.logs[topic][partition]
            if key not in self.positions:
                committed = self.cluster.committed.get((self.group_id, topic, partition))
                self.positions[key] = committed if committed is not None else (0 if self.reset_earliest else len(log))
            start = self.positions[key]
            taken = log[start : start + max(0, num_messages - len(out))]
            out.extend(taken)
            self.positions[key] = start + len(taken)
            if taken:
                self.eof_sent.discard(key)
                self.delivered_from.add(key)
            if self.eof and self.positions[key] >= len(log) and key not in self.eof_sent:
                self.eof_sent.add(key)
                out.append(
                    Message(
                        topic=topic,
                        partition=partition,
                        offset=len(log),
                        error=KafkaError(KafkaError._PARTITION_EOF),
                    )
                )
            if len(out) >= num_messages:
                break
        self.unfetched.clear()  # fetched from now on
        return out

    def seek(self, partition: TopicPartition) -> None:
        self.positions[(partition.topic, partition.partition)] = partition.offset
        self.eof_sent.discard((partition.topic, partition.partition))

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused_at.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused_at.difference_update((tp.topic, tp.partition) for tp in partitions)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        pause, self.inside_position = self.inside_position, None
        if pause is not None:
            pause()

        def position(key: tuple[str, int]) -> int:
            return self.positions.get(key, OFFSET_INVALID) if key in self.delivered_from else OFFSET_INVALID

        return [TopicPartition(tp.topic, tp.partition, position((tp.topic, tp.partition))) for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout=None, cached=False) -> tuple[int, int]:
        key = (partition.topic, partition.partition)
        if cached:
            high = self.cached_high.get(key)
            return (OFFSET_INVALID, OFFSET_INVALID) if high is None else (0, high)
        if self.cluster.faults._roll(self.cluster.faults.tail_read_fails):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "list offsets timed out (injected)"))
        return 0, self.cluster.end(partition.topic, partition.partition)

    def list_topics(self, topic=None, timeout=-1):
        self._not_in_a_callback("list_topics")
        return self.cluster.metadata(topic)

    # -- offsets -------------------------------------------------------------------------

    def commit(self, message=None, offsets=None, asynchronous=True):
        for tp in offsets or []:
            self.cluster.committed[(self.group_id, tp.topic, tp.partition)] = tp.offset
            if self.cluster.on_commit is not None:
                self.cluster.on_commit(self.group_id, tp.topic, tp.partition, tp.offset)
        return offsets

    def committed(self, partitions: list[TopicPartition], timeout=None) -> list[TopicPartition]:
        if self.cluster.faults._roll(self.cluster.faults.committed_fails):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "committed offsets timed out (injected)"))
        return [
            TopicPartition(
                tp.topic, tp.partition, self.cluster.committed.get((self.group_id, tp.topic, tp.partition), -1001)
            )
            for tp in partitions
        ]

    def close(self) -> None:
        self._not_in_a_callback("close")
        if self.in_group:
            self.in_group = False
            self.cluster.group(self.group_id).leave(self)
        self.closed = True

    def poll(self, timeout=None):
        messages = self.consume(1, timeout or 0)
        return messages[0] if messages else None


class FakeClients(KafkaClients):
    """`KafkaClients` over a `FakeCluster`; remembers what it made (to crash a member:
    its clients are abandoned, never closed)."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.made: list[FakeConsumer | FakeProducer] = []

    def consumer(self, config: dict) -> FakeConsumer:
        consumer = FakeConsumer(self.cluster, config)
        self.made.append(consumer)
        return consumer

    def producer(self, config: dict) -> FakeProducer:
        producer = FakeProducer(self.cluster, config)
        self.made.append(producer)
        return producer

    def admin(self, config: dict):
        raise NotImplementedError("topics are created by the test")
