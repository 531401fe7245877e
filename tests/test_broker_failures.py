"""Broker failures, on a 3-node Apache Kafka cluster (RF 3, `min.insync.replicas=2`).

A live stream shared by three processors while nodes fail under it:

- the node leading the input partitions is SIGKILLed and restarted, then the output's
  leader, then the partials topic's leader, then the group coordinator;
- a rolling restart: each node in turn stopped (SIGTERM) and started again;
- two nodes of three down at once: no controller quorum, no write can be taken
  (min.insync.replicas=2); the pipeline waits, commits nothing, reports not ready,
  and resumes when they return.

Every window must equal the oracle's (nothing lost, nothing counted twice), and each
processor must say once when the trouble begins and once when it ends. The stream is
written as a careful producer writes (idempotent, acks=all): a broker failure then
neither loses nor repeats an input record. Its acknowledgements measure how long writes
to the killed node's partitions stalled (printed per kill, for docs/design.md).

The lateness is above that stall: a record held back in its producer for longer than
the lateness reaches its partition after its window closed there, and counts as late,
by the contract (docs/semantics.md). Operators set ALLOWED_LATENESS_SECONDS above their
cluster's failover time for the same reason (docs/operations.md).

Zombies too: a bare member SIGSTOPped past its session has its commits refused by the
broker; a processor SIGSTOPped past its session writes nothing that wins over its
successors.

`make test` runs the KIP-848 zombie; BROKER_FAILURES=all runs the kills (every role's
node in turn), the rolling restart, the lost quorum and the other zombies too (`make
test-broker-failures`), BROKER_FAILURES_SEED=N changes the streams' records.

All in one module: `kafka_cluster3` is one cluster per module, and two must never run
at once on these two cores. Every test leaves the three nodes running, replicas in sync.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, ElectionType, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from broker.apache_kafka import KafkaCluster, KafkaNode
from broker.embedded_broker import free_port
from merging.parts import PartPiece, decode_partial
from testkit.oracle import expected_windows
from testkit.processes import Topics, new_topics, read_topic, wait_for_windows, wait_until
from tests.test_chaos import LiveStream

pytestmark = [pytest.mark.broker, pytest.mark.kafka, pytest.mark.slow]

WINDOW = 5
# Above the longest write stall a node's failure causes here (about 5 to 9 s: the
# controller fences a silent node after 3 s, then leaders move): see the module docstring.
LATENESS = 15
PARTITIONS = 6  # two led by each node
CAREFUL_PRODUCER = {"enable.idempotence": True, "acks": "all", "message.timeout.ms": 600_000}
# What the broker answers a commit from a member the group has fenced, by protocol.
FENCED_COMMIT = {
    "classic": {"ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REBALANCE_IN_PROGRESS"},
    "consumer": {"STALE_MEMBER_EPOCH", "FENCED_MEMBER_EPOCH", "UNKNOWN_MEMBER_ID"},
}
SEED = int(os.environ.get("BROKER_FAILURES_SEED", "11"))
long_variant = pytest.mark.skipif(
    os.environ.get("BROKER_FAILURES") != "all", reason="a long variant: BROKER_FAILURES=all (make test-broker-failures)"
)


@dataclass
class Trouble:
    """One failure and what it did."""

    what: str
    victims: list[str]  # the nodes' addresses, as the processors name them
    started: float  # monotonic
    started_at: float  # wall clock, to place the processors' log lines
    ended: float | None = None
    stalls: dict[int, float] = field(default_factory=dict)  # input partition -> seconds without an ack

    def line(self) -> str:
        stall = max(self.stalls.values()) if self.stalls else None
        stalled = f"writes to its input partitions {sorted(self.stalls)} stalled {stall:.1f}s" if stall else ""
        return f"{self.what} ({', '.join(self.victims)}): {stalled}"


class Pipeline:
    """Three processors over a live stream on the 3-node cluster, and what the test sees."""

    def __init__(self, cluster: KafkaCluster, start_processor, seed: int, **env: str) -> None:
        self.cluster = cluster
        self.topics: Topics = new_topics(cluster.bootstrap_servers, "kafka", -1)
        self.topics.create(input_partitions=PARTITIONS)
        self.ports = [free_port() for _ in range(3)]
        self.processors = [
            start_processor(
                self.topics.env(
                    WINDOW_SECONDS=str(WINDOW),
                    ALLOWED_LATENESS_SECONDS=str(LATENESS),
                    LOG_FORMAT="json",  # times to the millisecond, to place each line in a trouble
                    PROCESSOR_NAME=f"processor-{index}",
                    METRICS_PORT=str(port),
                    **env,
                )
            )
            for index, port in enumerate(self.ports)
        ]
        for processor in self.processors:
            processor.wait_for_log("assigned", timeout=90)
        wait_until(self._partials_exist, 30, message="the partials topic")
        self.in_sync()
        self.seed = seed
        self.streams: list[LiveStream] = []
        self.stream = self.new_stream()  # the one writing now
        self.troubles: list[Trouble] = []

    def new_stream(self) -> LiveStream:
        """Start writing (again): a stream stopped while no write could be taken, say."""
        stream = LiveStream(
            self.topics.bootstrap,
            self.topics.input,
            PARTITIONS,
            per_second=300,
            seed=self.seed + len(self.streams),
            producer_config=CAREFUL_PRODUCER,
        ).start()
        self.streams.append(stream)
        self.stream = stream
        return stream

    def _partials_exist(self) -> bool:
        return self.topics.partials in self.cluster.admin().list_topics(timeout=5).topics

    def in_sync(self) -> None:
        """Every replica in sync and every partition led by its preferred replica again
        (Kafka moves leaders back only every 5 minutes by itself), so that each node leads
        two input partitions when it is killed."""
        self.cluster.wait_for_full_isr(timeout=90)
        names = (self.topics.input, self.topics.output, self.topics.partials, "__consumer_offsets")
        metadata = self.cluster.admin().list_topics(timeout=10).topics
        partitions = [TopicPartition(name, p) for name in names for p in metadata[name].partitions]
        # ELECTION_NOT_NEEDED: led by its preferred replica already. PREFERRED_LEADER_NOT_
        # AVAILABLE: a node just back is in sync before the controller lets it lead; asked again.
        deadline = time.monotonic() + 60
        while True:
            try:
                outcome = self.cluster.admin().elect_leaders(ElectionType.PREFERRED, partitions).result(15)
            except (TimeoutError, KafkaException) as error:  # seen once: no answer in 30 s after a restart
                assert time.monotonic() < deadline, f"no answer to a leader election: {error!r}"
                time.sleep(1)
                continue
            failed = {tp: e for tp, e in outcome.items() if e is not None and "ELECTION_NOT_NEEDED" not in str(e)}
            if not failed:
                return
            assert time.monotonic() < deadline, failed
            partitions = list(failed)
            time.sleep(1)

    def input_partitions_led_by(self, node: KafkaNode) -> list[int]:
        return [p for p in range(PARTITIONS) if self.cluster.leader_of(self.topics.input, p) is node]

    def begin(self, what: str, nodes: list[KafkaNode]) -> Trouble:
        trouble = Trouble(what, [node.bootstrap_servers for node in nodes], time.monotonic(), time.time())
        self.troubles.append(trouble)
        return trouble

    def writes_resumed(self, trouble: Trouble, partitions: list[int], timeout: float = 60) -> None:
        """Until writes to each of `partitions` flow again after their longest pause since
        the trouble began (for a second at least); notes that pause. (Acknowledgements are
        timed when the stream serves them, every 0.1 s: a pause shorter than that is noise.)"""

        def resumed() -> bool:
            acks = list(self.stream.acknowledged)
            stalls = {}
            for partition in partitions:
                times = [t for t, p in acks if p == partition and t >= trouble.started - 1]
                if len(times) < 2 or times[-1] < trouble.started + 1:
                    return False
                gap, ended = max((b - a, b) for a, b in zip(times, times[1:], strict=False))
                if times[-1] < ended + 1:
                    return False  # not flowing again for a second yet
                stalls[partition] = gap
            trouble.stalls = stalls
            return True

        wait_until(resumed, timeout, 0.2, f"writes to input partitions {partitions} after {trouble.what}")

    def finish(self) -> dict[str, dict]:
        """Stop the stream; wait for the oracle's windows; stop the processors (exit 0)."""
        if not self.stream.stopped:
            self.stream.stop(flush_seconds=120)
        records = [record for stream in self.streams for record in stream.records]
        expected = expected_windows(records, window=WINDOW)

        got = wait_for_windows(self.topics.bootstrap, self.topics.output, expected, 120, self.report())
        assert sum(w["message_count"] for w in got.values()) == len(records)
        codes = [processor.terminate()[0] for processor in self.processors]
        assert codes == [0, 0, 0], [p.log()[-3000:] for p in self.processors]
        print(f"seed {self.seed}: {self.report()}")
        return got

    def report(self) -> str:
        return "; ".join(trouble.line() for trouble in self.troubles)

    def log_lines(self, processor) -> list[dict]:
        """The processor's JSON log lines, each with "at": its time in epoch seconds."""
        entries = [json.loads(line) for line in processor.log().splitlines() if line.startswith("{")]
        for entry in entries:
            moment = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            entry["at"] = moment.timestamp()
        return entries


def said_once_each(pipeline: Pipeline, heard_by_one: bool = True) -> None:
    """Each processor said of each trouble, about each node that failed, "unreachable"
    once when it began and "reachable again" once when it ended, and nothing else of the
    kind; or nothing at all of a node none of its clients spoke to meanwhile (with two
    nodes down, a processor's clients may fail only on one). With `heard_by_one`, each
    node that failed was said by at least one processor. (A node stopped in order hands
    its leaders over before it goes: a client may never fail a request to it.)"""
    ends = [trouble.started_at for trouble in pipeline.troubles[1:]] + [time.time()]
    for trouble, until in zip(pipeline.troubles, ends, strict=True):
        heard: dict[str, int] = dict.fromkeys(trouble.victims, 0)
        for processor in pipeline.processors:
            said = [
                entry["message"].split(" (")[0].rsplit(" after", 1)[0]
                for entry in pipeline.log_lines(processor)
                if trouble.started_at <= entry["at"] < until and "reachable" in entry["message"]
            ]
            nodes = {line.split()[1] for line in said}
            assert nodes <= set(trouble.victims), (trouble.what, said)
            for node in nodes:
                of_node = [line for line in said if line.split()[1] == node]
                assert of_node == [f"broker {node} unreachable", f"broker {node} reachable again"], (
                    trouble.what,
                    said,
                )
                heard[node] += 1
        assert all(heard.values()) or not heard_by_one, f"a node nobody said lost and back: {trouble.what}, {heard}"
        print(f"{trouble.what}: said once when it began and once when it ended, per node: {heard} (of 3 processors)")


# ---- the tests ---------------------------------------------------------------------------


# Not in `make test` again: in the clean-clone CI at 80ada4c (after 5 of 5 alone) one
# processor lost its partitions after the partials leader's kill, was not given them back
# for 44 s, and never said the node back (every window exact); not diagnosed yet.
@long_variant
def test_a_live_stream_survives_the_kill_of_each_leader_and_of_the_group_coordinator(
    kafka_cluster3: KafkaCluster, start_processor
):
    cluster = kafka_cluster3
    pipeline = Pipeline(cluster, start_processor, seed=SEED)
    topics = pipeline.topics
    roles = [
        ("the input's leader", lambda: cluster.leader_of(topics.input, 0)),
        ("the output's leader", lambda: cluster.leader_of(topics.output, 0)),
        ("the partials' leader", lambda: cluster.leader_of(topics.partials, 0)),
        ("the group coordinator", lambda: cluster.coordinator_of(topics.group)),
    ]
    time.sleep(5)
    for what, role in roles:
        victim = role()
        led = pipeline.input_partitions_led_by(victim)
        trouble = pipeline.begin(f"SIGKILL of {what}", [victim])
        victim.kill()
        pipeline.writes_resumed(trouble, led)
        victim.restart()
        pipeline.in_sync()
        trouble.ended = time.monotonic()
        time.sleep(3)
    pipeline.finish()
    said_once_each(pipeline)


@long_variant
def test_a_rolling_restart_of_every_node_loses_and_repeats_nothing(kafka_cluster3: KafkaCluster, start_processor):
    """Each node in turn stopped as an operator stops it (SIGTERM: a controlled shutdown,
    its leaders moved first) and started again once every replica is back in sync."""
    cluster = kafka_cluster3
    pipeline = Pipeline(cluster, start_processor, seed=SEED + 10)
    time.sleep(5)
    for node in cluster.nodes:
        led = pipeline.input_partitions_led_by(node)
        trouble = pipeline.begin(f"rolling restart of node {node.node_id}", [node])
        node.restart()
        pipeline.writes_resumed(trouble, led)
        pipeline.in_sync()
        time.sleep(3)
    pipeline.finish()
    said_once_each(pipeline, heard_by_one=False)


def readiness(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def committed_offsets(cluster: KafkaCluster, group: str, topic: str) -> dict[int, int] | None:
    """The group's committed offsets of `topic`, as its coordinator answers now (None: no answer)."""
    request = [ConsumerGroupTopicPartitions(group)]
    try:
        answer = cluster.admin().list_consumer_group_offsets(request, request_timeout=5)[group].result(10)
    except KafkaException:
        return None
    return {tp.partition: tp.offset for tp in answer.topic_partitions if tp.topic == topic}


@long_variant
def test_with_two_nodes_of_three_down_the_pipeline_waits_uncommitted_and_not_ready_then_resumes_exactly(
    kafka_cluster3: KafkaCluster, start_processor
):
    """Two nodes of three SIGKILLed: no controller quorum, and no write can be taken
    (min.insync.replicas=2). The node left is the group's coordinator, so the committed
    offsets can still be read: they must not move while the two are away (the input's
    records not yet in published windows stay uncommitted, to be read again), each
    processor must report not ready and why, and once the two are back every window is
    exact. The stream stops while no write can be taken: records held back in their
    producer longer than the lateness would be late input, not the pipeline's doing."""
    cluster = kafka_cluster3
    # DEBUG: each input commit the broker took is logged ("committed {...}").
    pipeline = Pipeline(cluster, start_processor, seed=SEED + 20, LOG_LEVEL="DEBUG")
    topics = pipeline.topics
    time.sleep(10)
    survivor = cluster.coordinator_of(topics.group)
    victims = [node for node in cluster.nodes if node is not survivor]
    pipeline.stream.stop(flush_seconds=60)
    before = committed_offsets(cluster, topics.group, topics.input)
    assert before, "the group committed nothing before the trouble"
    trouble = pipeline.begin("SIGKILL of two nodes of three", victims)
    for node in victims:
        node.kill()
    down_at = time.time()
    samples: list[tuple[float, list[tuple[int, str]]]] = []
    offsets_seen = []
    while time.monotonic() - trouble.started < 25:
        samples.append((time.monotonic() - trouble.started, [readiness(port) for port in pipeline.ports]))
        offsets_seen.append(committed_offsets(cluster, topics.group, topics.input))
        time.sleep(1)
    back_at = time.time()
    for node in victims:
        node.launch()
    cluster.wait_for_brokers(90, {node.node_id for node in victims})
    pipeline.in_sync()
    trouble.ended = time.monotonic()
    pipeline.new_stream()
    time.sleep(10)
    pipeline.finish()
    after = committed_offsets(cluster, topics.group, topics.input)

    # Nothing committed while the two were away: the coordinator's answer did not move,
    # and no processor logged a commit the broker took.
    answered = [seen for seen in offsets_seen if seen is not None]
    assert answered and all(seen == before for seen in answered), (before, offsets_seen)
    for processor in pipeline.processors:
        commits = [entry["at"] for entry in pipeline.log_lines(processor) if entry["message"].startswith("committed {")]
        during = [at - down_at for at in commits if down_at + 1 < at < back_at]
        assert not during, f"commits taken {during} s into the outage"
    assert after and all(after[p] >= before.get(p, 0) for p in after) and after != before, (before, after)
    # Not ready, saying why, from a few seconds in until they came back.
    late = [answers for at, answers in samples if at > 5]
    assert late
    for answers in late:
        for status, why in answers:
            assert status == 503 and "unreachable" in why, (status, why)
    print(f"/readyz while two nodes were down: {late[-1]}")
    said_once_each(pipeline)


# ---- zombies -------------------------------------------------------------------------------

# A bare member of a consumer group that commits a fixed offset of each partition it
# holds after every 50 ms poll, and prints one JSON line per assignment and per commit outcome
# (the error's name as the broker or librdkafka gave it). SIGSTOPped past its session,
# it wakes up still believing it holds its partitions: its first commits are a zombie's.
ZOMBIE_MEMBER = r"""
import json, sys, time
from confluent_kafka import Consumer, KafkaException, TopicPartition

bootstrap, topic, group, protocol, offset = sys.argv[1:6]
config = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "log_level": 2}
if protocol == "classic":
    config |= {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
else:
    config |= {"group.protocol": "consumer"}
held = set()

def say(**what):
    print(json.dumps({"at": time.time(), **what}), flush=True)

def assigned(consumer, partitions):
    held.update(tp.partition for tp in partitions)
    say(event="assigned", partitions=sorted(held))

def revoked(consumer, partitions):
    held.difference_update(tp.partition for tp in partitions)
    say(event="revoked", partitions=sorted(tp.partition for tp in partitions))

consumer = Consumer(config)
consumer.subscribe([topic], on_assign=assigned, on_revoke=revoked, on_lost=revoked)
while True:
    consumer.poll(0.05)
    if not held:
        continue
    partitions = sorted(held)
    sent = time.time()  # a commit in flight when the process is stopped is answered after it wakes
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, int(offset)) for p in partitions], asynchronous=False)
        say(event="commit", partitions=partitions, error=None, sent=sent)
    except KafkaException as error:
        say(event="commit", partitions=partitions, error=error.args[0].name(), sent=sent)
"""


class ZombieMember:
    """One `ZOMBIE_MEMBER` process and what it printed."""

    def __init__(self, bootstrap: str, topic: str, group: str, protocol: str, offset: int, log_path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZOMBIE_MEMBER, bootstrap, topic, group, protocol, str(offset)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def holds(self) -> bool:
        assigned = [e for e in self.events() if e["event"] in ("assigned", "revoked")]
        return bool(assigned) and assigned[-1]["event"] == "assigned" and bool(assigned[-1]["partitions"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


# Under classic the broker's answer is rarely seen (librdkafka finds the session lost
# first and sends no commit): that variant runs with BROKER_FAILURES=all.
@pytest.mark.parametrize("protocol", [pytest.param("classic", marks=long_variant), "consumer"])
def test_a_member_paused_past_its_session_has_its_commits_refused_by_the_broker(
    kafka_cluster3: KafkaCluster, protocol: str, tmp_path
):
    """A member SIGSTOPped past its session wakes up still holding, as far as it knows,
    its partitions, and commits at once. The broker refuses those commits (classic: its
    generation is stale or its member id unknown; KIP-848: its member epoch is stale or
    fenced, or its member id unknown) until the group has taken it in again: none of
    them is taken. (librdkafka may learn it is out first and send none: then it serves
    the loss before anything else. A commit sent before the stop and answered after the
    wake is not the zombie's.) The processor's own rules (commit only what published windows cover, publish nothing
    past what was read) do not rely on this: on Tansu they stand alone."""
    cluster = kafka_cluster3
    topic, group = f"zombie-{protocol}-{uuid.uuid4().hex[:8]}", f"zombie-{protocol}-{uuid.uuid4().hex[:8]}"
    cluster.admin().create_topics([NewTopic(topic, 2, 3)])[topic].result(30)
    zombie = ZombieMember(cluster.bootstrap_servers, topic, group, protocol, 100, tmp_path / "zombie.log")
    successor = None
    try:
        wait_until(zombie.holds, 60, message="the first member's assignment")
        wait_until(lambda: any(e["event"] == "commit" and not e["error"] for e in zombie.events()), 30)
        zombie.process.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        successor = ZombieMember(cluster.bootstrap_servers, topic, group, protocol, 200, tmp_path / "successor.log")
        # Past the 6 s session: the group takes the partitions from the stopped member
        # and gives them all to its successor, whose commits (offset 200) the broker takes.
        wait_until(
            lambda: (
                successor.holds()
                and any(
                    e["event"] == "commit" and not e["error"] and len(e["partitions"]) == 2 for e in successor.events()
                )
            ),
            60,
            message="the successor holding both partitions and committing",
        )
        woke_at = time.time()  # before: it may act before this process runs again
        zombie.process.send_signal(signal.SIGCONT)
        time.sleep(5)
    finally:
        zombie.stop()
        if successor is not None:
            successor.stop()

    after_waking = [e for e in zombie.events() if e["at"] >= woke_at]
    rejoined = next((e["at"] for e in after_waking if e["event"] == "assigned"), float("inf"))
    # A commit sent before the stop and answered after the wake was taken while the
    # member was still in the group (CI on 2026-12-07 saw one): only commits sent after
    # the wake count.
    zombie_commits = [e for e in after_waking if e["event"] == "commit" and e["sent"] >= woke_at and e["at"] < rejoined]
    print(
        f"{protocol}: stopped {woke_at - stopped_at:.1f}s; commits after waking, before it was taken in again: "
        f"{[e['error'] for e in zombie_commits]}; events after waking: "
        f"{[(e['event'], e.get('error'), round(e['at'] - woke_at, 2)) for e in after_waking[:8]]}"
    )
    # Nothing it committed while out of the group was taken.
    assert all(e["error"] for e in zombie_commits), zombie_commits
    if not zombie_commits:
        # librdkafka can learn first that it is out of the group and serve the loss
        # before a commit goes out: classic counts the session itself, and under KIP-848
        # the heartbeat sent on waking can be answered (FENCED_MEMBER_EPOCH) before the
        # commit is sent. Then the loss is what it served first.
        woken = [e for e in after_waking if not (e["event"] == "commit" and e["sent"] < woke_at)]
        assert woken and woken[0]["event"] == "revoked", woken[:3]
        return
    assert zombie_commits, "the woken member committed nothing before the group took it in again"
    broker_refusals = {e["error"] for e in zombie_commits if not e["error"].startswith("_")}
    assert broker_refusals, f"only librdkafka's own refusals: {zombie_commits}"
    assert broker_refusals <= FENCED_COMMIT[protocol], broker_refusals


def partials_by_writer(bootstrap: str, topic: str) -> list[tuple[int, str, float, object]]:
    """Every record of the partials topic: (offset, its writer's `processor.name`, the
    broker's append time in epoch seconds, the decoded part piece or progress)."""
    records = []
    for message in read_topic(bootstrap, topic, timeout=30):
        headers = dict(message.headers() or [])
        writer = headers.get("processor.name", b"").decode()
        records.append((message.offset(), writer, message.timestamp()[1] / 1000, decode_partial(message.value())))
    return records


def winning_parts(records) -> dict[tuple[int, int], tuple[str, float, list[PartPiece]]]:
    """Per (window, input partition), the part the merge takes (the first to be complete
    in the topic's order, merging/merge.py): its writer, when it was complete, its pieces."""
    assembling: dict[str, list] = {}
    winners = {}
    for _, writer, at, record in records:
        if not isinstance(record, PartPiece):
            continue
        pieces = assembling.setdefault(record.part_id, [])
        if record.piece not in {p.piece for p in pieces}:
            pieces.append(record)
        key = (record.window_start, record.partition)
        if len(pieces) == record.pieces and key not in winners:
            winners[key] = (writer, at, sorted(pieces, key=lambda p: p.piece))
    return winners


def part_counts(pieces: list[PartPiece]) -> tuple:
    """What a part counts, whatever its pieces' split and part id."""
    return (
        sum(p.message_count for p in pieces),
        sum(p.invalid_message_count for p in pieces),
        sum(p.late_message_count for p in pieces),
        sorted(d for p in pieces for d in p.device_ids),
        sorted(tuple(profile) for p in pieces for profile in p.profiles),
    )


@long_variant
def test_a_processor_paused_past_its_session_publishes_nothing_that_wins_over_its_successors(
    kafka_cluster3: KafkaCluster, start_processor
):
    """One of three processors SIGSTOPped past its session (classic protocol, 6 s) while
    the others take its partitions over and publish their parts of its windows; then it
    wakes, believing for a moment that it still holds them. Read back from the partials
    topic (each record names its writer; the topic is stamped with the broker's time):
    whatever it wrote between waking and being taken in again wins nothing over its
    successors (a part of it that the merge takes counts exactly what a successor's
    part of the same window and partition counts), and every window equals the oracle's.

    What runs showed: it writes nothing in that second. Its first turn on waking serves
    the lost partitions (librdkafka counted the session out) before its timer closes
    anything, and the timer could close nothing past what it had read anyway; pieces
    cannot linger in its producer over the stop (each turn's checkpoint flushes it).
    Kafka refuses a zombie's commits as well (the bare-member test above); the
    processor's rules do not rely on that: on the embedded broker they stand alone."""
    cluster = kafka_cluster3
    pipeline = Pipeline(
        cluster,
        start_processor,
        seed=SEED + 30,
        KAFKA_GROUP_PROTOCOL="classic",
        KAFKA_SESSION_TIMEOUT_MS="6000",
        KAFKA_HEARTBEAT_INTERVAL_MS="1000",
    )
    zombie, successors = pipeline.processors[0], pipeline.processors[1:]

    def logged_since(processor, moment: float, start: str) -> float | None:
        """When `processor` first logged a line beginning with `start` after `moment`."""
        lines = pipeline.log_lines(processor)
        return next((e["at"] for e in lines if e["at"] > moment and e["message"].startswith(start)), None)

    time.sleep(2 * WINDOW + 2)
    trouble = pipeline.begin("SIGSTOP of processor-0 past its session", [])
    zombie.process.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_until(
            lambda: all(logged_since(p, stopped_at, "assigned") for p in successors),
            60,
            message="the others taking the stopped processor's partitions",
        )
        time.sleep(LATENESS + 2 * WINDOW)  # the successors publish their parts of its windows
    finally:
        woke_at = time.time()
        zombie.process.send_signal(signal.SIGCONT)
    trouble.ended = time.monotonic()
    wait_until(lambda: logged_since(zombie, woke_at, "assigned"), 60, message="the woken processor taken in again")
    time.sleep(2 * WINDOW)
    pipeline.finish()  # every window the oracle's

    rejoined = logged_since(zombie, woke_at, "assigned")
    lost = logged_since(zombie, woke_at - 1, "partitions lost")
    assert lost is not None and lost <= rejoined, "the woken processor never served the loss of its partitions"
    records = partials_by_writer(pipeline.topics.bootstrap, pipeline.topics.partials)
    zombie_name = next(writer for _, writer, _, _ in records if writer.startswith("processor-0["))
    zombie_writes = [r for r in records if r[1] == zombie_name and woke_at - 1 <= r[2] <= rejoined]
    winners = winning_parts(records)
    zombie_parts = {(r[3].window_start, r[3].partition) for r in zombie_writes if isinstance(r[3], PartPiece)}
    won = {key for key in zombie_parts if winners[key][0] == zombie_name}
    for key in sorted(won):
        mine = part_counts(winners[key][2])
        others = [
            part_counts(list(pieces.values()))
            for writer, pieces in _parts_of(records, key).values()
            if writer != zombie_name and len(pieces) == next(iter(pieces.values())).pieces
        ]
        assert all(other == mine for other in others), (key, mine, others)
    print(
        f"zombie processor: stopped {woke_at - stopped_at:.1f}s; served the loss {lost - woke_at:.2f}s after waking,"
        f" taken in again after {rejoined - woke_at:.2f}s; between the two it wrote {len(zombie_writes)} partials"
        f" record(s), parts of {len(zombie_parts)} (window, partition), {len(won)} taken by the merge"
    )


def _parts_of(records, key: tuple[int, int]) -> dict[str, tuple[str, dict[int, PartPiece]]]:
    """Every part of (window, partition) `key`, complete or not, by part id: its writer
    and its pieces by number."""
    parts: dict[str, tuple[str, dict[int, PartPiece]]] = {}
    for _, writer, _, record in records:
        if isinstance(record, PartPiece) and (record.window_start, record.partition) == key:
            parts.setdefault(record.part_id, (writer, {}))[1][record.piece] = record
    return parts
