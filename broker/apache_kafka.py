"""Start and stop real Apache Kafka 4.x nodes: for the tests, and for anyone with Java.

The embedded broker (Tansu, `broker/embedded_broker.py`) needs nothing but Python;
the people who run this pipeline run Apache Kafka. `make kafka` assembles Kafka from
Maven Central (`kafka/pom.xml`) into `.kafka/libs`; this module runs those jars, each
node its own `java` process in KRaft combined mode (broker and controller in one
JVM), so a test can SIGKILL one node of a cluster and start it again. No Docker.

Two shapes: one node, and a 3-node cluster with a static quorum whose defaults are
a production cluster's (replication factor 3, `min.insync.replicas=2`, internal topics
at 3 / 2). Options, all keyword arguments of `KafkaCluster`:

- `server_properties`: more `server.properties` lines, applied last (they win);
- `tls`: SSL and SASL_SSL listeners beside PLAINTEXT, with PEM files
  (`tls_client_auth=True`: the SSL listener demands a client certificate);
- `scram_users`: SCRAM-SHA-256 and -512 credentials written at format time, for
  SASL_SSL logins;
- `authorizer=True`: Kafka's `StandardAuthorizer`, nothing allowed without an ACL;
  `super_users` are allowed everything. The PLAINTEXT listener (the nodes' own and the
  test's admin connection) is `User:ANONYMOUS`, a super user: clients whose rights are
  under test connect through SASL_SSL or SSL;
- `short_group_sessions` (on by default): session and heartbeat floors low enough
  for a 6 s group session (classic) and a 6 s KIP-848 session (the broker's default
  floor is 45 s), heartbeats every second;
- `fast_failover` (on by default): the controller fences a silent node after 3 s
  instead of 9, so writes to a killed leader's partitions stall for seconds.

Ready means: every node registered in the metadata, a probe topic created with a
leader for every partition, and the group coordinator answering (which creates
`__consumer_offsets`, so the first test does not pay for it). Stopping sends SIGTERM
to every node at once and SIGKILL to any still alive after a short grace: a node of a
cluster whose controllers are going away can wait for them for ever. An `atexit` guard
kills whatever a crashed run left (not a run that is itself SIGKILLed).

By hand: `python -m broker.apache_kafka --nodes 3 --port 39092` (see `--help`).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from broker.embedded_broker import BrokerError, free_port, port_is_open

ROOT = Path(__file__).resolve().parent.parent
# Where `make kafka` puts the jars (libs/) and its stamp; git-ignored.
DEFAULT_HOME = ROOT / ".kafka"
STAMP = ".assembled"
LOG_CONFIG = ROOT / "kafka" / "log4j2.properties"

# A node on a small shared machine (docs/design.md has the figures): the heap (-Xmx,
# `KafkaCluster(heap=...)`, 256 MiB by default) grows from 64 MiB as needed; the serial
# collector runs no GC threads of its own; C1 only (TieredStopAtLevel=1) compiles less.
JVM_OPTIONS = ("-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true")
# Formatting is one short JVM run per node.
FORMAT_JVM_OPTIONS = ("-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true")

PROBE_TOPIC = "harness-probe"
PROBE_GROUP = "harness-probe"
# What a SCRAM name or password may hold: StorageTool's `-S` parser splits on , ] and =.
_SCRAM_TEXT = re.compile(r"^[A-Za-z0-9_.-]+$")
_CLIENT = {"log_level": 2}  # librdkafka: no "connection refused" lines while nodes start


def missing_reason(home: Path = DEFAULT_HOME) -> str | None:
    """Why Apache Kafka cannot run here (one line, with the fix), or None when it can."""
    if shutil.which("java") is None:
        return "java is not on PATH (Apache Kafka 4.x needs Java 17 or newer)"
    if not (home / STAMP).exists() or not (home / "libs").is_dir():
        return f"Apache Kafka is not assembled in {home}: run `make kafka` (needs Maven and Java 17)"
    return None


def new_cluster_id() -> str:
    """A KRaft cluster id as `kafka-storage random-uuid` makes it (URL-safe base64 of 16
    random bytes, unpadded, never starting with '-'), without a JVM start."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class BrokerTls:
    """PEM files for the SSL and SASL_SSL listeners: the CA clients are checked against
    (for `tls_client_auth`), the server's certificate and its unencrypted PKCS#8 key."""

    ca: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class NodePorts:
    plaintext: int
    controller: int
    ssl: int | None = None
    sasl_ssl: int | None = None


# Every node this process started and has not stopped: killed at exit, whatever happened.
_LIVE: set[KafkaNode] = set()


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_LIVE):
        node.kill()


class KafkaNode:
    """One `java` process: broker and controller of node `node_id`, data and log in `directory`."""

    def __init__(self, cluster: KafkaCluster, node_id: int, ports: NodePorts, directory: Path) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.ports = ports
        self.directory = directory
        self.properties_path = directory / "server.properties"
        self.log_path = directory / "node.log"
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"KafkaNode({self.node_id}, {self.bootstrap_servers}, pid={self.pid})"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.ports.plaintext}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            "java",
            *JVM_OPTIONS,
            f"-Xmx{self.cluster.heap}",
            f"-Dlog4j2.configurationFile={LOG_CONFIG}",
            "-cp",
            str(self.cluster.home / "libs" / "*"),
            "kafka.Kafka",
            str(self.properties_path),
        ]

    def launch(self) -> None:
        """Start the JVM and return at once (readiness is the cluster's to check)."""
        if self.is_running:
            raise BrokerError(f"node {self.node_id} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"=== harness: starting node {self.node_id} at {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own session: the pid is the JVM's, and Ctrl-C in a terminal reaches
                # whoever started it, who stops it in order.
                start_new_session=True,
            )
        _LIVE.add(self)

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug would: no controlled shutdown."""
        if self.is_running:
            self.process.kill()
            self.process.wait(10)
        _LIVE.discard(self)

    def terminate(self) -> None:
        """SIGTERM: a controlled shutdown begins; `wait_stopped` collects it."""
        if self.is_running:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        """Wait until `deadline` (time.monotonic()) for the JVM to exit, then SIGKILL it."""
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(max(0.0, deadline - time.monotonic()))
        self.kill()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds: the node leaves the cluster in
        order when the controllers let it, and never hangs the caller."""
        self.terminate()
        self.wait_stopped(time.monotonic() + grace)

    def restart(self, timeout: float = 60.0) -> KafkaNode:
        """Start this node again with the same command and its data (no re-format), after
        stopping it if it still runs; returns once it is back in the cluster's metadata.
        Its replicas then catch up: `KafkaCluster.wait_for_full_isr` waits for that."""
        self.stop()
        self.launch()
        self.cluster.wait_for_brokers(timeout, {self.node_id})
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])


class KafkaCluster:
    """`nodes` Apache Kafka nodes (1 or 3) on free loopback ports, data under `directory`.

    `start()` formats every node (in parallel) and starts them; `stop()` stops them all.
    The cluster is also a context manager. See the module docstring for the options.
    """

    def __init__(
        self,
        directory: Path,
        nodes: int = 1,
        *,
        port: int | None = None,
        server_properties: Mapping[str, str] | None = None,
        tls: BrokerTls | None = None,
        tls_client_auth: bool = False,
        scram_users: Mapping[str, str] | None = None,
        authorizer: bool = False,
        super_users: Sequence[str] = (),
        short_group_sessions: bool = True,
        fast_failover: bool = True,
        heap: str = "256m",
        home: Path = DEFAULT_HOME,
    ) -> None:
        if nodes not in (1, 3):
            raise ValueError("nodes: 1 or 3 (a KRaft quorum of 2 survives no failure)")
        if (tls_client_auth or scram_users) and tls is None:
            raise ValueError("tls_client_auth and scram_users need tls (the SSL and SASL_SSL listeners)")
        for name, password in (scram_users or {}).items():
            if not (_SCRAM_TEXT.match(name) and _SCRAM_TEXT.match(password)):
                raise ValueError(f"scram_users: {name!r}: names and passwords of letters, digits, '.', '_', '-'")
        self.directory = Path(directory)
        self.node_count = nodes
        self.first_port = port
        self.server_properties = dict(server_properties or {})
        self.tls = tls
        self.tls_client_auth = tls_client_auth
        self.scram_users = dict(scram_users or {})
        self.authorizer = authorizer
        self.super_users = tuple(super_users)
        self.short_group_sessions = short_group_sessions
        self.fast_failover = fast_failover
        self.heap = heap
        self.home = Path(home)
        self.cluster_id = new_cluster_id()
        self.nodes: list[KafkaNode] = []
        self._admin: AdminClient | None = None
        # How long start() took, and its formatting part, for the record.
        self.start_seconds: float | None = None
        self.format_seconds: float | None = None

    # -- addresses ------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """Every node's PLAINTEXT listener, comma-separated."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    @property
    def port(self) -> int:
        """The first node's PLAINTEXT port (what `EmbeddedBroker.port` is)."""
        return self.nodes[0].ports.plaintext

    @property
    def ssl_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{node.ports.ssl}" for node in self.nodes)

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{node.ports.sasl_ssl}" for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def admin(self) -> AdminClient:
        """The cluster's admin client, on the PLAINTEXT listeners (a super user under the
        authorizer). One for the cluster's life: a client dropped while its futures are
        pending fails them ("Handle is terminating")."""
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, **_CLIENT})
        return self._admin

    # -- configuration -----------------------------------------------------------------

    def _assign_ports(self) -> None:
        def pick(offset: int) -> int:
            return self.first_port + offset if self.first_port else free_port()

        self.nodes = []
        for index in range(self.node_count):
            ports = NodePorts(
                plaintext=pick(index),
                controller=free_port(),
                ssl=free_port() if self.tls else None,
                sasl_ssl=free_port() if self.tls else None,
            )
            directory = self.directory / f"node-{index + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            self.nodes.append(KafkaNode(self, index + 1, ports, directory))

    def properties(self, node: KafkaNode) -> dict[str, str]:
        """`server.properties` of `node`, as written to its directory."""
        count = self.node_count
        replicas = min(3, count)
        min_isr = 2 if count >= 3 else 1
        listeners = {"PLAINTEXT": node.ports.plaintext, "CONTROLLER": node.ports.controller}
        if self.tls:
            listeners |= {"SSL": node.ports.ssl, "SASL_SSL": node.ports.sasl_ssl}
        advertised = {name: port for name, port in listeners.items() if name != "CONTROLLER"}
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            # A static quorum: the same voters on every node, so formatting needs no
            # --standalone or --initial-controllers, and a restarted node rejoins as it was.
            "controller.quorum.voters": ",".join(f"{n.node_id}@127.0.0.1:{n.ports.controller}" for n in self.nodes),
            "listeners": ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items()),
            "advertised.listeners": ",".join(f"{name}://127.0.0.1:{port}" for name, port in advertised.items()),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL",
            "log.dirs": str(node.directory / "data"),
            # A production cluster's durability on 3 nodes; what one node allows on one.
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min_isr),
            "offsets.topic.replication.factor": str(replicas),
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_isr),
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            # 50 partitions each by default: creating them is most of a first group join
            # or transaction. A few still spread coordinators over the three nodes.
            "offsets.topic.num.partitions": str(count * 2 if count > 1 else 1),
            "transaction.state.log.num.partitions": str(count * 2 if count > 1 else 1),
            "group.initial.rebalance.delay.ms": "0",  # default 3 s before a new group's first assignment
            # Test traffic needs few threads (defaults 3 network, 8 I/O, 1 replica fetcher per node).
            "num.network.threads": "2",
            "num.io.threads": "2",
            # The log cleaner allocates its dedupe buffer up front (128 MiB by default,
            # half this heap); 16 MiB is room for millions of keys.
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.cleaner.backoff.ms": "1000",
        }
        if self.short_group_sessions:
            props |= {
                # Classic groups: sessions down to 1 s may be asked for (default floor 6 s).
                "group.min.session.timeout.ms": "1000",
                # KIP-848 groups: the broker sets the session (default 45 s, floor 45 s)
                # and the heartbeat (5 s, floor 5 s); 6 s and 1 s suit a test.
                "group.consumer.min.session.timeout.ms": "1000",
                "group.consumer.session.timeout.ms": "6000",
                "group.consumer.min.heartbeat.interval.ms": "500",
                "group.consumer.heartbeat.interval.ms": "1000",
            }
        if self.fast_failover:
            props |= {
                # The controller fences a node that misses heartbeats for this long, and
                # only then moves leadership and shrinks ISRs (defaults 9 s and 2 s).
                "broker.session.timeout.ms": "3000",
                "broker.heartbeat.interval.ms": "500",
                # A follower out of the ISR after 5 s without catching up (default 30 s).
                "replica.lag.time.max.ms": "5000",
            }
        if self.tls:
            keystore = node.directory / "keystore.pem"
            keystore.write_text(self.tls.key.read_text() + self.tls.certificate.read_text())
            props |= {
                # PEM stores: the key and certificate chain in one file, the key not
                # encrypted, so no ssl.key.password (Kafka refuses one for such a key).
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(keystore),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(self.tls.ca),
                "sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": _SCRAM_LOGIN,
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _SCRAM_LOGIN,
            }
            if self.tls_client_auth:
                props["listener.name.ssl.ssl.client.auth"] = "required"
        if self.authorizer:
            principals = ["User:ANONYMOUS", *(f"User:{name}" for name in self.super_users)]
            props |= {
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users": ";".join(principals),
                "allow.everyone.if.no.acl.found": "false",
            }
        return props | self.server_properties

    def _write_properties(self) -> None:
        for node in self.nodes:
            lines = [f"{key}={value}" for key, value in self.properties(node).items()]
            node.properties_path.write_text("\n".join(lines) + "\n")

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> KafkaCluster:
        """Format and start every node; return once the cluster serves (see the module
        docstring), or raise BrokerError with each node's log tail and leave nothing running.

        Free ports are picked, then released for the JVM to bind: another process may
        take one in between. A start that fails on a port taken so is tried once more,
        with new ports and fresh storage."""
        reason = missing_reason(self.home)
        if reason:
            raise BrokerError(reason)
        started = time.monotonic()
        for attempt in (1, 2):
            self._admin = None
            self._assign_ports()
            for node in self.nodes:
                if port_is_open(node.ports.plaintext):
                    raise BrokerError(f"port {node.ports.plaintext} is already in use: is another broker running?")
            self._write_properties()
            self._format()
            self.format_seconds = time.monotonic() - started
            try:
                for node in self.nodes:
                    node.launch()
                self.wait_for_brokers(timeout)
                self._wait_for_probe(started + timeout)
                break
            except BaseException as error:
                self.kill()
                lost_a_port = any("Address already in use" in node.log_tail() for node in self.nodes)
                if attempt == 2 or self.first_port or not lost_a_port or not isinstance(error, BrokerError):
                    raise
                for node in self.nodes:
                    shutil.rmtree(node.directory / "data", ignore_errors=True)
                self.cluster_id = new_cluster_id()
        self.start_seconds = time.monotonic() - started
        return self

    def _format(self) -> None:
        """`StorageTool format` for every node at once (a JVM start each)."""
        scram: list[str] = []
        for name, password in self.scram_users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                scram += ["-S", f"{mechanism}=[name={name},password={password}]"]
        runs = []
        for node in self.nodes:
            command = [
                "java",
                *FORMAT_JVM_OPTIONS,
                f"-Dlog4j2.configurationFile={LOG_CONFIG}",
                "-cp",
                str(self.home / "libs" / "*"),
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                self.cluster_id,
                "--config",
                str(node.properties_path),
                *scram,
            ]
            runs.append((node, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        failures = []
        for node, run in runs:
            output, _ = run.communicate(timeout=120)
            if run.returncode != 0:
                failures.append(f"node {node.node_id}: {output.decode(errors='replace').strip()[-2000:]}")
        if failures:
            raise BrokerError("formatting Kafka storage failed:\n" + "\n".join(failures))

    def wait_for_brokers(self, timeout: float, node_ids: set[int] | None = None) -> None:
        """Until every node of `node_ids` (default: all) is a registered broker in the metadata."""
        wanted = node_ids or {node.node_id for node in self.nodes}
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(wanted)
            try:
                brokers = set(self.admin().list_topics(timeout=2).brokers)
            except KafkaException:
                brokers = set()
            if wanted <= brokers:
                return
            if time.monotonic() > deadline:
                self._fail(f"nodes {sorted(wanted - brokers)} not in the metadata after {timeout:.0f}s")
            time.sleep(0.2)

    def _wait_for_probe(self, deadline: float) -> None:
        """A topic with a leader for every partition, and the group coordinator answering."""
        admin = self.admin()
        count = self.node_count
        futures = admin.create_topics([NewTopic(PROBE_TOPIC, count, count)], operation_timeout=30)
        try:
            futures[PROBE_TOPIC].result(max(1.0, deadline - time.monotonic()))
        except KafkaException as error:
            if "TOPIC_ALREADY_EXISTS" not in str(error):
                self._fail(f"the probe topic could not be created: {error}")
        while True:
            self._check_alive()
            try:
                partitions = admin.list_topics(PROBE_TOPIC, timeout=2).topics[PROBE_TOPIC].partitions
            except KafkaException:
                partitions = {}
            if len(partitions) == count and all(p.leader >= 0 for p in partitions.values()):
                break
            if time.monotonic() > deadline:
                self._fail("the probe topic has no leader for every partition")
            time.sleep(0.2)
        # A committed offset: the group coordinator answers, and __consumer_offsets
        # exists before the first test's group needs it.
        while True:
            self._check_alive()
            consumer = Consumer({"bootstrap.servers": self.bootstrap_servers, "group.id": PROBE_GROUP, **_CLIENT})
            try:
                consumer.commit(offsets=[TopicPartition(PROBE_TOPIC, 0, 0)], asynchronous=False)
                return
            except KafkaException as error:
                if time.monotonic() > deadline:
                    self._fail(f"the group coordinator did not take a commit: {error}")
                time.sleep(0.2)
            finally:
                consumer.close()

    def _check_alive(self, node_ids: set[int] | None = None) -> None:
        for node in self.nodes:
            if (node_ids is None or node.node_id in node_ids) and not node.is_running:
                self._fail(f"node {node.node_id} exited (status {node.process.returncode if node.process else None})")

    def _fail(self, what: str) -> None:
        tails = "\n".join(f"--- node {n.node_id} ({n.log_path}):\n{n.log_tail()}" for n in self.nodes)
        raise BrokerError(f"Apache Kafka is not ready: {what}\n{tails}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every node at once; SIGKILL to any still alive after `grace` s, or
        1 s after a majority of the controllers has gone: a node left without a quorum
        waits for one for ever in its controlled shutdown."""
        for node in self.nodes:
            node.terminate()
        deadline = time.monotonic() + grace
        majority = len(self.nodes) // 2 + 1
        while time.monotonic() < deadline:
            alive = [node for node in self.nodes if node.is_running]
            if not alive:
                break
            if len(self.nodes) - len(alive) >= majority:
                deadline = min(deadline, time.monotonic() + 1.0)
            time.sleep(0.05)
        for node in self.nodes:
            node.wait_stopped(deadline)

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- questions tests ask ---------------------------------------------------------------

    def leader_of(self, topic: str, partition: int = 0, timeout: float = 10.0) -> KafkaNode:
        """The node leading `topic`'s `partition`, as the metadata says now (a node just
        killed stays the leader until the controller fences it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                partitions = self.admin().list_topics(topic, timeout=5).topics[topic].partitions
                leader = partitions[partition].leader if partition in partitions else -1
            except KafkaException:
                leader = -1
            if leader >= 0:
                return self.node(leader)
            if time.monotonic() > deadline:
                raise BrokerError(f"{topic}[{partition}] has no leader after {timeout:.0f}s")
            time.sleep(0.2)

    def coordinator_of(self, group: str, timeout: float = 10.0) -> KafkaNode:
        """The node coordinating consumer group `group` (the leader of its partition of
        `__consumer_offsets`); a group need not exist yet to have one."""
        future = self.admin().describe_consumer_groups([group], request_timeout=timeout)[group]
        coordinator = future.result(timeout + 1).coordinator
        if coordinator is None or coordinator.id < 0:
            raise BrokerError(f"group {group} has no coordinator")
        return self.node(coordinator.id)

    def wait_for_full_isr(self, topics: Sequence[str] | None = None, timeout: float = 60.0) -> None:
        """Until every partition of `topics` (default: every topic, internal ones too) has
        a leader and all its replicas in sync: after a node came back, say."""
        deadline = time.monotonic() + timeout
        lagging: list[str] = ["(no metadata)"]
        while True:
            try:
                metadata = self.admin().list_topics(timeout=5).topics
                lagging = [
                    f"{name}[{p.id}] isr {sorted(p.isrs)} of {sorted(p.replicas)}"
                    for name, topic in metadata.items()
                    if topics is None or name in topics
                    for p in topic.partitions.values()
                    if p.leader < 0 or set(p.isrs) != set(p.replicas)
                ]
                missing = [name for name in topics or () if name not in metadata]
                if not lagging and not missing:
                    return
                lagging += [f"{name} (no such topic)" for name in missing]
            except KafkaException as error:
                lagging = [str(error)]
            if time.monotonic() > deadline:
                raise BrokerError(f"ISR not full after {timeout:.0f}s: {', '.join(lagging[:10])}")
            time.sleep(0.2)


_SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def main(argv: Sequence[str] | None = None) -> int:
    """Run Apache Kafka in the foreground until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python -m broker.apache_kafka",
        description="Apache Kafka nodes on 127.0.0.1 for this pipeline (assemble them first: make kafka).",
    )
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=1, help="1 node, or a 3-node cluster (RF 3)")
    parser.add_argument("--port", type=int, default=None, help="PLAINTEXT port of node 1 (nodes 2, 3: +1, +2)")
    parser.add_argument("--dir", type=Path, default=None, help="data and logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    ports = [args.port + i for i in range(args.nodes)] if args.port else []
    busy = [port for port in ports if port_is_open(port)]
    if busy:
        print(f"error: --port: {busy[0]} is already in use", file=sys.stderr)
        return 2
    reason = missing_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    directory = args.dir or Path(tempfile.mkdtemp(prefix="apache-kafka-"))
    cluster = KafkaCluster(directory, args.nodes, port=args.port)
    # SIGTERM stops the nodes the way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        cluster.start()
        print(
            f"Apache Kafka ({args.nodes} node{'s' if args.nodes > 1 else ''}) ready in {cluster.start_seconds:.1f}s:"
            f" KAFKA_BOOTSTRAP_SERVERS={cluster.bootstrap_servers} (logs: {directory}); Ctrl-C stops it",
            flush=True,
        )
        while all(node.is_running for node in cluster.nodes):
            time.sleep(0.5)
        print("error: a node exited; see its node.log", file=sys.stderr)
        return 1
    except BrokerError as error:
        print(f"error: {str(error).splitlines()[0]} (logs: {directory})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
        print("Apache Kafka stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
