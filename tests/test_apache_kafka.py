"""The Apache Kafka harness (broker/apache_kafka.py): real Kafka 4.x nodes, one or three.

Later tests stand on it (the guarantees on both brokers, broker failures, KIP-848,
ACLs), so each of its promises is checked here by what Kafka answers: a record
round-trips, groups join with short sessions under both protocols, the TLS, SCRAM and
authorizer options do what they say, a 3-node cluster survives the SIGKILL of a
partition leader with no acknowledged write lost, and stopping leaves no JVM behind.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from broker import apache_kafka
from broker.apache_kafka import PROBE_TOPIC, BrokerTls, KafkaCluster
from broker.embedded_broker import BrokerError, free_port
from testkit.processes import ROOT, read_topic, require_kafka, wait_until
from tests.tls_support import make_pki

pytestmark = [pytest.mark.broker, pytest.mark.kafka]

QUIET = {"log_level": 2}


def java_processes_under(directory) -> list[str]:
    """Command lines of running `java` processes started for `directory`'s nodes."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if args[0] == b"java" and any(str(directory).encode() in arg for arg in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def create_topic(cluster: KafkaCluster, name: str, partitions: int = 1, replication: int = -1, **config: str) -> None:
    cluster.admin().create_topics([NewTopic(name, partitions, replication, config=config)])[name].result(30)


def produce_one(client: dict, topic: str, value: bytes, timeout: float = 20.0) -> KafkaError | None:
    """Produce `value`; the delivery error (None: stored)."""
    outcome: list[KafkaError | None] = []
    producer = Producer({**QUIET, "message.timeout.ms": int(timeout * 1000), **client})
    producer.produce(topic, value, on_delivery=lambda error, _: outcome.append(error))
    producer.flush(timeout + 5)
    assert outcome, "no delivery report"
    return outcome[0]


def connection_refusal(client: dict, timeout: float = 15.0) -> KafkaError:
    """The first error a client reports while its connections are refused."""
    errors: list[KafkaError] = []
    producer = Producer({**QUIET, **client, "error_cb": errors.append})
    deadline = time.monotonic() + timeout
    while not errors and time.monotonic() < deadline:
        producer.poll(0.1)
    assert errors, "the connection was not refused"
    return errors[0]


def broker_config(cluster: KafkaCluster, name: str) -> str:
    resource = ConfigResource(ResourceType.BROKER, "1")
    configs = cluster.admin().describe_configs([resource])[resource].result(10)
    return configs[name].value


# ---- one node ------------------------------------------------------------------------------


def test_one_node_stores_a_record_and_gives_it_back(kafka_node: KafkaCluster) -> None:
    topic = f"round-trip-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_node, topic)
    assert produce_one({"bootstrap.servers": kafka_node.bootstrap_servers}, topic, b"hello") is None
    [record] = read_topic(kafka_node.bootstrap_servers, topic)
    assert record.value() == b"hello"
    # Ready meant a probe topic with a leader, and __consumer_offsets already made.
    names = kafka_node.admin().list_topics(timeout=10).topics
    assert PROBE_TOPIC in names and "__consumer_offsets" in names


def wait_for_assignment(consumer: Consumer, timeout: float = 30.0) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout
    while not consumer.assignment():
        consumer.poll(0.2)
        assert time.monotonic() < deadline, "no assignment"
    return consumer.assignment()


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_group_joins_with_a_short_session_on_either_protocol(kafka_node: KafkaCluster, protocol: str) -> None:
    """`short_group_sessions`: a classic member may ask for 3 s (Kafka's default floor is
    6 s: it would be refused), and a KIP-848 group's broker-set session is 6 s, not 45."""
    topic, group = f"join-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_node, topic, partitions=2)
    client = {"bootstrap.servers": kafka_node.bootstrap_servers, "group.id": group, **QUIET}
    if protocol == "classic":
        client |= {"session.timeout.ms": 3000, "heartbeat.interval.ms": 500}
    else:
        client |= {"group.protocol": "consumer"}  # session and heartbeat are the broker's
    consumer = Consumer(client)
    try:
        consumer.subscribe([topic])
        started = time.monotonic()
        assignment = wait_for_assignment(consumer)
        print(f"{protocol} member assigned {len(assignment)} partitions in {time.monotonic() - started:.1f}s")
        assert {tp.partition for tp in assignment} == {0, 1}
        description = kafka_node.admin().describe_consumer_groups([group])[group].result(10)
        assert description.type.name == protocol.upper()
        assert kafka_node.coordinator_of(group) is kafka_node.nodes[0]
    finally:
        consumer.close()
    if protocol == "consumer":
        assert broker_config(kafka_node, "group.consumer.session.timeout.ms") == "6000"
        assert broker_config(kafka_node, "group.consumer.heartbeat.interval.ms") == "1000"


def test_tls_scram_and_the_authorizer_and_a_restart_without_formatting(tmp_path) -> None:
    """One node with every option later tests need: SSL with client certificates,
    SASL_SSL with SCRAM users made at format time, the StandardAuthorizer with super
    users, extra server properties. Killed and restarted, it keeps its data and users."""
    require_kafka()
    pki = make_pki(tmp_path / "pki")
    cluster = KafkaCluster(
        tmp_path / "kafka",
        tls=BrokerTls(ca=pki.ca, certificate=pki.server_cert, key=pki.server_key),
        tls_client_auth=True,
        scram_users={"alice": "alice-secret"},
        authorizer=True,
        super_users=["CN=processor"],  # the client certificate's principal
        server_properties={"auto.create.topics.enable": "false"},
    )
    with cluster:
        print(f"secured node ready in {cluster.start_seconds:.1f}s")
        assert broker_config(cluster, "auto.create.topics.enable") == "false"
        create_topic(cluster, "secured")
        mutual_tls = {
            "bootstrap.servers": cluster.ssl_bootstrap_servers,
            "security.protocol": "SSL",
            "ssl.ca.location": str(pki.ca),
            "ssl.certificate.location": str(pki.client_cert),
            "ssl.key.location": str(pki.client_key),
        }
        assert produce_one(mutual_tls, "secured", b"over mTLS") is None
        assert [m.value() for m in read_topic(mutual_tls["bootstrap.servers"], "secured", client=mutual_tls)] == [
            b"over mTLS"
        ]

        # Without a client certificate the SSL listener refuses the handshake.
        no_certificate = {k: v for k, v in mutual_tls.items() if not k.startswith(("ssl.certificate", "ssl.key"))}
        refusal = connection_refusal(no_certificate)
        assert refusal.code() in (KafkaError._SSL, KafkaError._TRANSPORT), refusal
        assert "certificate" in refusal.str(), refusal

        sasl = {
            "bootstrap.servers": cluster.sasl_ssl_bootstrap_servers,
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": str(pki.ca),
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "alice",
            "sasl.password": "alice-secret",
        }
        # Logged in (a wrong password fails differently, below), but no ACL lets alice write.
        error = produce_one(sasl, "secured", b"denied")
        assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
        refusal = connection_refusal({**sasl, "sasl.password": "wrong"})
        assert refusal.code() == KafkaError._AUTHENTICATION and "invalid credentials" in refusal.str(), refusal
        write = AclBinding(
            ResourceType.TOPIC,
            "secured",
            ResourcePatternType.LITERAL,
            "User:alice",
            "*",
            AclOperation.WRITE,
            AclPermissionType.ALLOW,
        )
        for future in cluster.admin().create_acls([write]).values():
            future.result(10)
        assert produce_one(sasl, "secured", b"allowed") is None

        # SIGKILL and restart: the same command, no format. Data and SCRAM users stay.
        node = cluster.nodes[0]
        node.kill()
        node.restart()
        assert produce_one(sasl, "secured", b"after the restart") is None
        values = [m.value() for m in read_topic(mutual_tls["bootstrap.servers"], "secured", client=mutual_tls)]
        assert values == [b"over mTLS", b"allowed", b"after the restart"]
        assert java_processes_under(cluster.directory)
    assert not java_processes_under(cluster.directory)
    assert all(node.process.poll() is not None for node in cluster.nodes)


def test_the_command_line_runs_a_node_until_sigterm(tmp_path) -> None:
    """`python -m broker.apache_kafka`: what a user with Java runs to point the pipeline at."""
    require_kafka()
    port = free_port()
    output = tmp_path / "out.log"
    with open(output, "wb") as out:
        command = [sys.executable, "-m", "broker.apache_kafka", "--port", str(port), "--dir", str(tmp_path / "k")]
        cli = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ready" in output.read_text() or cli.poll() is not None, 90, message="the ready line")
        assert f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}" in output.read_text(), output.read_text()
        topic = f"cli-{uuid.uuid4().hex[:8]}"  # auto-created, as on a default broker
        assert produce_one({"bootstrap.servers": f"127.0.0.1:{port}"}, topic, b"by hand") is None
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    assert "Apache Kafka stopped" in output.read_text()
    assert not java_processes_under(tmp_path / "k")


def test_a_process_that_exits_without_stopping_its_nodes_leaves_none_running(tmp_path) -> None:
    """The atexit guard: a test run that crashes past its fixtures kills its JVMs."""
    require_kafka()
    script = (
        "import sys; from pathlib import Path; from broker.apache_kafka import KafkaCluster;"
        f"KafkaCluster(Path({str(tmp_path / 'k')!r})).start(); sys.exit('crashed with a node running')"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "crashed with a node running" in run.stderr, run.stderr
    assert (tmp_path / "k" / "node-1" / "node.log").exists()
    assert not java_processes_under(tmp_path / "k")


def test_the_command_line_refuses_a_taken_port_in_one_line(tmp_path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "broker.apache_kafka", "--port", str(port)]
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [f"error: --port: {port} is already in use"]


def test_the_command_line_without_java_says_so_in_one_line(tmp_path) -> None:
    command = [sys.executable, "-m", "broker.apache_kafka"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30, env={"PATH": str(tmp_path)})
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: java is not on PATH (Apache Kafka 4.x needs Java 17 or newer)"
    ], run.stderr


# ---- three nodes ----------------------------------------------------------------------------


def test_three_nodes_replicate_every_partition_three_times(kafka_cluster3: KafkaCluster) -> None:
    cluster = kafka_cluster3
    metadata = cluster.admin().list_topics(timeout=10)
    assert sorted(metadata.brokers) == [1, 2, 3]
    topic = f"rf3-{uuid.uuid4().hex[:8]}"
    create_topic(cluster, topic, partitions=3)  # the broker's defaults: RF 3, min ISR 2
    cluster.wait_for_full_isr([topic], timeout=30)
    partitions = cluster.admin().list_topics(topic, timeout=10).topics[topic].partitions
    assert all(sorted(p.replicas) == [1, 2, 3] and sorted(p.isrs) == [1, 2, 3] for p in partitions.values())
    resource = ConfigResource(ResourceType.TOPIC, topic)
    assert cluster.admin().describe_configs([resource])[resource].result(10)["min.insync.replicas"].value == "2"
    # Leaders are spread: each node leads one of the three partitions.
    assert {cluster.leader_of(topic, p).node_id for p in range(3)} == {1, 2, 3}


def offsets_partition_of(group: str, partitions: int) -> int:
    """The partition of __consumer_offsets that holds `group`, as Kafka picks it:
    Utils.abs(group.hashCode()) % partitions, with Java's String.hashCode."""
    value = 0
    for char in group:  # ASCII names: one UTF-16 unit per character
        value = (31 * value + ord(char)) & 0xFFFFFFFF
    signed = value - (1 << 32) if value >= 1 << 31 else value
    return (0 if signed == -(1 << 31) else abs(signed)) % partitions


def test_the_coordinator_of_a_group_leads_its_offsets_partition(kafka_cluster3: KafkaCluster) -> None:
    cluster = kafka_cluster3
    offsets = cluster.admin().list_topics("__consumer_offsets", timeout=10).topics["__consumer_offsets"]
    count = len(offsets.partitions)
    seen = set()
    for index in range(12):
        group = f"coordinated-{index}"
        partition = offsets_partition_of(group, count)
        coordinator = cluster.coordinator_of(group)
        assert coordinator is cluster.leader_of("__consumer_offsets", partition), group
        seen.add(coordinator.node_id)
    assert len(seen) > 1, "every group on one node: the check above would not tell nodes apart"


def test_killing_a_partition_leader_loses_no_acknowledged_write(kafka_cluster3: KafkaCluster) -> None:
    """An idempotent acks=all stream to a partition at RF 3, min ISR 2: its leader is
    SIGKILLed; writes stall until the controller fences it, then go on to a new leader
    with ISR 2, none failed, none twice. The node restarted: ISR 3 again."""
    cluster = kafka_cluster3
    topic = f"failover-{uuid.uuid4().hex[:8]}"
    create_topic(cluster, topic)
    cluster.wait_for_full_isr([topic], timeout=30)
    victim = cluster.leader_of(topic, 0)
    controller = cluster.admin().describe_cluster().result(10).controller.id
    producer = Producer(
        {
            **QUIET,
            "bootstrap.servers": cluster.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 60000,  # far above the stall: a failed message is a lost one
        }
    )
    acknowledged: list[float] = []
    failed: list[KafkaError] = []

    def report(error, _message) -> None:
        (failed.append(error) if error else acknowledged.append(time.monotonic()))

    sent = 0
    killed_at = None
    started = time.monotonic()
    while True:
        now = time.monotonic()
        if killed_at is None and now - started > 2:
            victim.kill()
            killed_at = time.monotonic()
        if killed_at is not None and acknowledged and acknowledged[-1] - killed_at > 3:
            break
        assert now - started < 60, f"writes did not resume within {now - killed_at:.0f}s of the kill"
        producer.produce(topic, str(sent).encode(), partition=0, on_delivery=report)
        sent += 1
        producer.poll(0.005)
    assert producer.flush(60) == 0
    assert not failed, failed[:5]
    assert len(acknowledged) == sent
    gaps = [b - a for a, b in zip(acknowledged, acknowledged[1:], strict=False)]
    stall = max(gaps)
    first_after = min(t for t in acknowledged if t > killed_at) - killed_at
    role = "the active controller" if victim.node_id == controller else "a follower controller"
    print(f"node {victim.node_id} ({role}) killed: writes stalled {stall:.2f}s (first ack {first_after:.2f}s after)")
    assert stall < 15, "fast_failover: the controller fences a silent node after 3 s"

    new_leader = cluster.leader_of(topic, 0)
    assert new_leader is not victim
    partition = cluster.admin().list_topics(topic, timeout=10).topics[topic].partitions[0]
    assert victim.node_id not in partition.isrs and len(partition.isrs) == 2, partition

    restarted = time.monotonic()
    victim.restart()
    cluster.wait_for_full_isr(timeout=60)
    print(f"node {victim.node_id} back with every ISR full {time.monotonic() - restarted:.1f}s after the restart")
    partition = cluster.admin().list_topics(topic, timeout=10).topics[topic].partitions[0]
    assert sorted(partition.isrs) == [1, 2, 3]

    # Idempotence held through the retries: every number once, in order.
    values = [int(m.value()) for m in read_topic(cluster.bootstrap_servers, topic, timeout=30)]
    assert values == list(range(sent))


def test_a_port_taken_between_picking_and_binding_costs_one_more_try(tmp_path, monkeypatch) -> None:
    """Ports are picked free, then bound by the JVM: a port taken in between (another
    xdist worker, say) fails the first try; the second, on new ports, serves."""
    require_kafka()
    picks = iter(range(10**6))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        taken_port = taken.getsockname()[1]
        # The second port picked is node 1's controller port.
        monkeypatch.setattr(apache_kafka, "free_port", lambda: taken_port if next(picks) == 1 else free_port())
        cluster = KafkaCluster(tmp_path / "kafka").start(timeout=60)
    try:
        log = cluster.nodes[0].log_path.read_text()
        assert "Address already in use" in log and log.count("=== harness: starting node 1") == 2
        assert cluster.nodes[0].ports.controller != taken_port
        create_topic(cluster, "after-a-retry")
        assert produce_one({"bootstrap.servers": cluster.bootstrap_servers}, "after-a-retry", b"x") is None
    finally:
        cluster.stop()


def test_a_node_that_dies_at_start_fails_readiness_with_its_log(tmp_path) -> None:
    """The error says which node and shows the end of its log; nothing is left running."""
    require_kafka()
    cluster = KafkaCluster(tmp_path / "kafka", heap="4m")  # too small for the JVM to start
    with pytest.raises(BrokerError) as raised:
        cluster.start(timeout=30)
    message = str(raised.value)
    assert "node 1 exited" in message and "heap" in message, message
    assert not java_processes_under(cluster.directory)


# Keep this test last in the module: it stops the module's cluster.
def test_stopping_the_cluster_leaves_no_java_process(kafka_cluster3: KafkaCluster) -> None:
    """All three nodes stopped together: none left waiting for a quorum that is gone."""
    cluster = kafka_cluster3
    assert len(java_processes_under(cluster.directory)) == 3
    stopping = time.monotonic()
    cluster.stop()
    print(f"3 nodes stopped in {time.monotonic() - stopping:.1f}s")
    assert not java_processes_under(cluster.directory)
