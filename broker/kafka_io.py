"""Small Kafka chores shared by the processor, the generator and the monitor.

Kept apart from the poll loop so that each script reads as its own job.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from broker.authorization import (
    TAIL_READER_GROUP_PREFIX,
    TIME_SEARCH_GROUP_PREFIX,
    Permission,
    check_permissions,
    create_refused,
)
from config import ConfigError, Settings, env_name_of
from core.errors import PipelineError

log = logging.getLogger("kafka")

# librdkafka's error codes for "the broker refused who we are", as opposed to "the
# broker is not there": retrying cannot fix the first, so it is reported as a setting.
AUTHENTICATION_CODES = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})
# The settings a refused login is about, named the way the user writes them.
CREDENTIAL_SETTINGS = "KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD"
# The settings a failed TLS handshake is about: the CA that must vouch for the broker's
# certificate, and the client's own certificate for a broker that demands one.
CA_SETTING = "KAFKA_SSL_CA_LOCATION"
CLIENT_CERTIFICATE_SETTINGS = "KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION"
# How often a broker must close a fresh TLS connection before start-up calls it a
# refusal rather than a blip. librdkafka reconnects after 0.1 s, then doubles the wait,
# so three closes take the better part of a second. (No "over how long": the lines
# reach us when the client is polled, all at once.)
_TLS_CLOSES_TO_REFUSE = 3


class AuthenticationFailed(PipelineError):
    """The broker refused who the client is: its SASL credentials, or its side of the TLS
    handshake (it does not trust the broker's certificate, or the broker does not take
    the client's). Not retried: a wrong password or certificate stays wrong, and a
    processor that retries it forever looks merely "waiting"."""

    def __init__(self, bootstrap_servers: str, reason: str, setting: str = CREDENTIAL_SETTINGS) -> None:
        super().__init__(reason)
        self.bootstrap_servers = bootstrap_servers
        self.reason = reason
        self.setting = setting

    def as_config_error(self) -> ConfigError:
        if self.setting == CREDENTIAL_SETTINGS:
            return ConfigError(self.setting, f"the broker at {self.bootstrap_servers} refused them: {self.reason}")
        return ConfigError(self.setting, f"TLS with the broker at {self.bootstrap_servers} failed: {self.reason}")


def client_setting_error(error: KafkaException, environ: Mapping[str, str]) -> ConfigError | None:
    """librdkafka refusing to create a client because of a `KAFKA_*` value (a property
    it does not know, a TLS file it cannot read) as the setting it names; None for
    any other error."""
    kafka_error = error.args[0] if error.args else None
    if not isinstance(kafka_error, KafkaError) or kafka_error.code() != KafkaError._INVALID_ARG:
        return None
    text = kafka_error.str()
    for word in text.replace('"', " ").split():
        word = word.strip(":,")
        if "." in word and env_name_of(word, environ) != word:
            return ConfigError(env_name_of(word, environ), text)
    return ConfigError("KAFKA_* settings", text)


def _without_client_noise(text: str) -> str:
    """librdkafka's message without its connection prefix and timing suffix:
    "sasl_plaintext://h:p/bootstrap: SASL authentication error: X (after 24ms in state AUTH_REQ)" -> the middle."""
    text = re.sub(r"^\S+://\S+: ", "", text)
    return re.sub(r" \(after \d+ms in state \w+\)$", "", text)


class KafkaClients:
    """Makes the Kafka clients. Every client of the processor is made here, so that a
    test can hand in clients that fail on cue (tests/fake_kafka.py): a full queue at
    the third piece, a refused delivery, a failed read at a hand-over."""

    def consumer(self, config: dict) -> Consumer:
        return Consumer(config)

    def producer(self, config: dict) -> Producer:
        return Producer(config)

    def admin(self, config: dict) -> AdminClient:
        return AdminClient(config)


REAL_CLIENTS = KafkaClients()

# The exit status of a script stopped (Ctrl-C, SIGTERM) before it ever reached its
# broker: not 0, so that a supervisor or a script can tell "ran and stopped cleanly"
# from "never got anywhere" (a wrong address, a broker that never came up).
EXIT_NEVER_REACHED_BROKER = 3


def tls_refusal(error_text: str, client_certificate: bool = True) -> tuple[str, str]:
    """The setting a failed TLS handshake (librdkafka's `_SSL` error) is about, and why.

    "certificate verify failed" is this client not trusting the broker's certificate;
    anything else in a handshake (an alert from the broker: "handshake failure",
    "unknown ca", "certificate required", "bad certificate") is the broker not taking
    this client's certificate, or the lack of one (`client_certificate` False: none is
    set; Apache Kafka then answers "bad certificate")."""
    reason = _without_client_noise(error_text)
    if "certificate verify failed" in reason:
        return CA_SETTING, f"its certificate is not trusted ({reason})"
    if not client_certificate:
        return CLIENT_CERTIFICATE_SETTINGS, f"it requires a client certificate (mutual TLS) and none is set ({reason})"
    return CLIENT_CERTIFICATE_SETTINGS, f"it did not accept this client's certificate ({reason})"


# Where librdkafka takes a client certificate from.
_CLIENT_CERTIFICATE_PROPERTIES = ("ssl.certificate.location", "ssl.certificate.pem", "ssl.keystore.location")


def _has_client_certificate(config: dict[str, str]) -> bool:
    return any(config.get(name) for name in _CLIENT_CERTIFICATE_PROPERTIES)


def _uses_tls(config: dict[str, str]) -> bool:
    return str(config.get("security.protocol", "")).lower() in ("ssl", "sasl_ssl")


# librdkafka logs every failed reconnect (several a second while a broker is
# down). Errors reach us through `error_cb` instead, which `BrokerHealth` turns
# into one line per change of state; its own log keeps only critical lines.
QUIET_CLIENT_LOGS = {"log_level": 2}


# A broker's address at the start of librdkafka's error text ("127.0.0.1:9092/2: Connect
# to ... failed", "GroupCoordinator: 127.0.0.1:9092: ...", "sasl_ssl://b-1:9096/bootstrap: ...").
_BROKER_IN_ERROR = re.compile(r"^(?:GroupCoordinator: )?(?:[a-z_]+://)?([^\s/]+:\d+)(?:/\w+)?: ")
# How often the nodes said to be down are asked whether they accept connections again.
_NODE_CHECK_SECONDS = 1.0
# A failed reconnect reported this soon after its node was back was made before: stale.
_STALE_ERROR_SECONDS = 5.0


def accepts_connections(node: str, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to any of `node` ("host:port[,host:port]") is accepted."""
    for address in node.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


class BrokerHealth:
    """Turns librdkafka's error callbacks into one log line per change of state.

    librdkafka retries on its own; what an operator needs is "the broker is gone"
    once, and "it is back" once, not a line per retry. Per broker: one node of a
    cluster down is said once when its clients first fail to reach it, and once when
    it is back, however many clients keep failing to reconnect meanwhile and however
    often the other nodes answer. Back means: the cluster answered a request
    (`mark_reachable`) and the node accepts connections again. `down_since` (what
    /readyz reports) is set while any broker is down.
    """

    # Not _ALL_BROKERS_DOWN: it only sums up per-broker errors reported on their own,
    # and it also follows a refused login, where the broker is there and says no.
    _DOWN_CODES = {KafkaError._TRANSPORT, KafkaError._RESOLVE}

    def __init__(
        self,
        bootstrap_servers: str,
        logger: logging.Logger = log,
        accepts_connections: Callable[[str], bool] = accepts_connections,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.log = logger
        self._lock = threading.Lock()
        self.down_since: float | None = None
        # The brokers that failed (by address; errors naming none: the bootstrap servers),
        # each with when; and when each last came back.
        self._down: dict[str, float] = {}
        self._back_at: dict[str, float] = {}
        self._accepts_connections = accepts_connections
        self._next_node_check = 0.0
        # The broker's last refusal of who we are, if it refused: (setting, reason).
        self.refusal: tuple[str, str] | None = None
        self._tls_closes = 0  # fresh TLS connections the broker closed before answering
        self._client_certificate = True  # whether the clients present one (told by `callbacks`)
        self._reached = False  # a request has succeeded since start-up
        self._next_recheck = 0.0

    def callbacks(self, config: dict[str, str]) -> dict:
        """The callback settings of a client made with `config`: `error_cb`, and with TLS
        a log watcher. A broker that demands a client certificate accepts the TLS 1.3
        handshake and then closes the connection; librdkafka reports that only as a log
        line, never to `error_cb`, so start-up would take it for an outage."""
        settings: dict = {"error_cb": self.on_error}
        if _uses_tls(config):
            self._client_certificate = _has_client_certificate(config)
            settings.update({"log_level": 6, "logger": _TlsCloseWatcher(self, config)})
        return settings

    def on_error(self, error: KafkaError) -> None:
        """librdkafka `error_cb`."""
        if error.fatal():
            self.log.error("fatal client error: %s", error.str())
            return
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            return
        if error.code() == KafkaError._SSL or (
            error.code() == KafkaError._TRANSPORT and "SSL routines::" in error.str()
        ):
            # A failed handshake comes as _SSL, and again as a transport error carrying
            # OpenSSL's reason: the broker is there, and says no.
            self._refused(*tls_refusal(error.str(), self._client_certificate), "the TLS handshake")
            return
        if error.code() in self._DOWN_CODES:
            self._node_down(error.str())
            return
        if error.code() in AUTHENTICATION_CODES:
            self._refused(CREDENTIAL_SETTINGS, _without_client_noise(error.str()), "the credentials")
            return
        self.log.warning("kafka client: %s", error.str())

    def on_tls_closed(self, setting: str, reason: str) -> None:
        """The broker closed a fresh TLS connection before answering (`_TlsCloseWatcher`)."""
        with self._lock:
            self._tls_closes += 1
            closes = self._tls_closes
        if closes >= _TLS_CLOSES_TO_REFUSE:
            self._refused(setting, reason, "the client certificate")

    def _refused(self, setting: str, reason: str, what: str) -> None:
        # librdkafka retries a refusal several times a second: one line, once.
        # At start-up the caller turns it into the exit (see `raise_if_refused`).
        with self._lock:
            first = self.refusal is None
            self.refusal = (setting, reason)
        if first and self._reached:  # before that, start-up exits with one line instead
            self.log.error("broker %s refused %s: %s", self.bootstrap_servers, what, reason)

    def raise_if_refused(self, client: Consumer | Producer | AdminClient) -> None:
        """Serve `client`'s pending callbacks; raise AuthenticationFailed if the broker
        refused our credentials or TLS handshake before ever accepting us. Call after a
        request failed, before calling it "unreachable".

        Only at start-up: a refusal after the broker once accepted us (a password
        rotated under a running processor) is logged by `on_error` and retried like
        an outage, so the open windows are not thrown away."""
        client.poll(0)
        refusal = self.refusal
        if refusal is not None and not self._reached:
            setting, reason = refusal
            raise AuthenticationFailed(self.bootstrap_servers, reason, setting)

    @property
    def reached(self) -> bool:
        """Whether a broker request has succeeded since start-up."""
        return self._reached

    def exit_status_when_stopped(self) -> int:
        """The exit status of a script asked to stop during start-up: 0 if the broker
        was ever reached, else EXIT_NEVER_REACHED_BROKER, said once in the log."""
        if self._reached:
            return 0
        self.log.warning(
            "stopped; it never reached the broker at %s (exit status %d)",
            self.bootstrap_servers,
            EXIT_NEVER_REACHED_BROKER,
        )
        return EXIT_NEVER_REACHED_BROKER

    def _node_down(self, text: str) -> None:
        found = _BROKER_IN_ERROR.match(text)
        node = found.group(1) if found else self.bootstrap_servers
        now = time.monotonic()
        back_at = self._back_at.get(node)
        recently_back = node not in self._down and back_at is not None and now - back_at < _STALE_ERROR_SECONDS
        if recently_back and self._accepts_connections(node):
            return  # a failed reconnect from before it came back, served late
        with self._lock:
            if node in self._down:
                return
            self._down[node] = now
            if self.down_since is None:
                self.down_since = now
        self.log.warning("broker %s unreachable (%s); retrying until it is back", node, text)

    def mark_reachable(self) -> None:
        """Call when a broker request succeeded: the brokers said to be down that accept
        connections again are back (asked at most once a second)."""
        with self._lock:
            self.refusal = None
            self._tls_closes = 0
            self._reached = True
            down = dict(self._down)
        if not down:
            return
        now = time.monotonic()
        if now < self._next_node_check:
            return
        self._next_node_check = now + _NODE_CHECK_SECONDS
        back = [node for node in down if self._accepts_connections(node)]
        with self._lock:
            for node in back:
                self._down.pop(node, None)
                self._back_at[node] = now
            if not self._down:
                self.down_since = None
        for node in back:
            self.log.info("broker %s reachable again after %.0fs", node, now - down[node])

    def recheck(self, client: Consumer | Producer | AdminClient, topic: str, every: float = 2.0) -> None:
        """While the broker is said to be down, ask it for `topic`'s metadata at most every
        `every` seconds (a 1 s wait) and mark it reachable if it answers. Call once per loop
        turn (costs nothing while it is up). Acknowledgements usually say the broker is back;
        with nothing to send (no input) none comes, and the broker would stay "down" (and
        the processor not ready, ops/health.py) for good after a blip."""
        if self.down_since is None or time.monotonic() < self._next_recheck:
            return
        self._next_recheck = time.monotonic() + every
        try:
            client.list_topics(topic, timeout=1.0)
        except KafkaException:
            return
        self.mark_reachable()


class _TlsCloseWatcher:
    """librdkafka `logger` for TLS clients: notices a broker that closes every fresh TLS
    connection right after the handshake (what one requiring a client certificate does
    under TLS 1.3: "SSL connection closed by peer ... in state APIVERSION_QUERY") and
    tells `BrokerHealth`. Passes on critical lines only, as `QUIET_CLIENT_LOGS` would."""

    _CLOSED = re.compile(r"Disconnected: (SSL connection closed|connection reset) by peer .*in state APIVERSION_QUERY")

    def __init__(self, health: BrokerHealth, config: dict[str, str]) -> None:
        self._health = health
        # Under TLS 1.3 librdkafka sees no alert, only the close; a TLS proxy in front
        # of a broker that is down closes the same way, hence the second cause.
        if _has_client_certificate(config):
            self._reason = "it closes every connection right after the handshake: it does not accept this client's"
            self._reason += " certificate (or a TLS proxy in front of the broker cannot reach it)"
        else:
            self._reason = "it closes every connection right after the handshake: it requires a client certificate"
            self._reason += " (mutual TLS) and none is set (or a TLS proxy in front of the broker cannot reach it)"

    def log(self, level: int, fmt: str, *args: object) -> None:
        text = fmt % args if args else fmt
        if self._CLOSED.search(text):
            self._health.on_tls_closed(CLIENT_CERTIFICATE_SETTINGS, self._reason)
        elif level >= logging.CRITICAL:
            log.critical("%s", text)


def ensure_topics(
    settings: Settings,
    partitions: dict[str, int],
    should_stop: Callable[[], bool],
    health: BrokerHealth,
    retry_seconds: float = 2.0,
    configs: dict[str, dict[str, str]] | None = None,
    permissions: Sequence[Permission] = (),
) -> bool:
    """Create the topics that do not exist yet; wait (with one clear message) while the
    broker is unreachable. Returns False when asked to stop first; raises
    AuthenticationFailed when the broker refuses the credentials, ConfigError when the
    cluster refuses TOPIC_REPLICATION_FACTOR, and NotAuthorized when its ACLs lack one of
    `permissions` (checked once the broker answers, and again after creating topics) or
    Create on a missing topic."""
    config = settings.admin_config()
    admin = AdminClient({**QUIET_CLIENT_LOGS, **config, **health.callbacks(config)})
    while not should_stop():
        try:
            existing = admin.list_topics(timeout=5).topics
            health.mark_reachable()
            # Before creating: a topic this client may not Describe is absent from the
            # metadata, and would be "created" (refused) instead of named as not allowed.
            if permissions:
                check_permissions(settings, permissions, admin)
            missing = [
                NewTopic(name, count, settings.topic_replication_factor, config=topic_config(settings, configs, name))
                for name, count in partitions.items()
                if name not in existing
            ]
            refused = []
            for name, future in admin.create_topics(missing, operation_timeout=10).items() if missing else []:
                try:
                    future.result()
                    log.info("created topic %s", name)
                except KafkaException as error:
                    if error.args[0].code() == KafkaError.INVALID_REPLICATION_FACTOR:  # more than the brokers
                        factor = settings.topic_replication_factor
                        problem = f"the cluster refused {factor} for topic {name}: {error.args[0].str()}"
                        raise ConfigError("TOPIC_REPLICATION_FACTOR", problem) from None
                    if error.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                        refused.append(name)
                    elif error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
            if refused:
                raise create_refused(settings, refused)
            if missing and permissions:
                check_permissions(settings, permissions, admin)  # what it may do on the topics it made
            return True
        except KafkaException as error:
            kafka_error = error.args[0] if error.args else None
            if isinstance(kafka_error, KafkaError) and kafka_error.code() in (
                KafkaError.TOPIC_AUTHORIZATION_FAILED,
                KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                KafkaError.INVALID_PARTITIONS,
                KafkaError.INVALID_REPLICATION_FACTOR,
            ):
                raise
            health.raise_if_refused(admin)
            health.on_error(KafkaError(KafkaError._TRANSPORT, str(kafka_error or error)))
            sleep_unless_stopped(retry_seconds, should_stop)
    return False


def topic_config(settings: Settings, configs: dict[str, dict[str, str]] | None, name: str) -> dict[str, str]:
    """The configs a created topic gets: its own, plus `min.insync.replicas` when set
    (with acks=all, how many replicas must have a write before it is acknowledged)."""
    config = dict((configs or {}).get(name, {}))
    if settings.topic_min_insync_replicas:
        config["min.insync.replicas"] = str(settings.topic_min_insync_replicas)
    return config


def sleep_unless_stopped(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Wait `seconds` before retrying, but answer a stop request within 0.1 s."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not should_stop():
        time.sleep(0.1)


def partition_runs(messages: list[Message]) -> tuple[list[tuple[int, list[Message]]], list[KafkaError]]:
    """A consumed batch as runs of consecutive records of one partition, and the
    client errors among them (end of partition, unknown topic, ...)."""
    errors = list(map(Message.error, messages))
    partitions = list(map(Message.partition, messages))
    count = len(messages)
    # any() in C: None is false, a KafkaError true. (Not errors.count(None):
    # KafkaError.__eq__ fails on None.)
    if not any(errors):
        # Partition runs found in C (index/count per distinct partition, a handful),
        # not by a per-record loop: librdkafka hands each partition over in one piece.
        order = list(dict.fromkeys(partitions))
        starts = [partitions.index(partition) for partition in order]
        lengths = [partitions.count(partition) for partition in order]
        if all(starts[i] + lengths[i] == (starts[i + 1] if i + 1 < len(order) else count) for i in range(len(order))):
            return [(p, messages[s : s + n]) for p, s, n in zip(order, starts, lengths, strict=True)], []
    runs: list[tuple[int, list[Message]]] = []
    found: list[KafkaError] = []
    run: list[Message] = []
    for message, error, partition in zip(messages, errors, partitions, strict=True):
        if error is not None:
            found.append(error)
            if run:
                runs.append((run[-1].partition(), run))
                run = []
            continue
        if run and run[-1].partition() != partition:
            runs.append((run[-1].partition(), run))
            run = []
        run.append(message)
    if run:
        runs.append((run[-1].partition(), run))
    return runs, found


def close_within(consumer: Consumer, seconds: float) -> bool:
    """Close a group consumer, but wait at most `seconds`; False if it did not finish.

    librdkafka's close() leaves the group, and a member leaving while the group is
    rebalancing (another member left a moment ago) can wait on the coordinator for
    long (seen on the embedded broker; reported against librdkafka too). Callers
    commit what matters before closing, so giving up on the wait loses nothing.
    """
    done = threading.Event()

    def close() -> None:
        # Leave the assignment first, its revoke served by poll(), so that close()
        # has nothing left to revoke: a rebalance callback run from inside close()
        # while the group rebalances can block in librdkafka holding the GIL
        # (rd_kafka_rebalance_protocol; librdkafka issue #4041), and then nothing
        # in the process runs again.
        try:
            consumer.unsubscribe()
            deadline = time.monotonic() + min(seconds, 2.0)
            while consumer.assignment() and time.monotonic() < deadline:
                consumer.poll(0.1)
        except (KafkaException, RuntimeError):
            pass
        consumer.close()
        done.set()

    threading.Thread(target=close, name="consumer-close", daemon=True).start()
    return done.wait(seconds)


def topic_partition_count(consumer: Consumer, topic: str, timeout: float = 10.0) -> int:
    metadata = consumer.list_topics(topic, timeout=timeout)
    entry = metadata.topics.get(topic)
    return len(entry.partitions) if entry is not None and entry.error is None else 0


def read_topic_tail(
    settings: Settings,
    topic: str,
    records_per_partition: int | None,
    timeout: float = 10.0,
    clients: KafkaClients = REAL_CLIENTS,
) -> list:
    """The last few records of every partition of `topic` (unordered across partitions;
    `records_per_partition` None: all of them).

    Reads from `high - n` to the partition end reported by an EOF event, not to the
    listed high watermark: some brokers (Tansu) list the last batch's base offset as
    the high watermark, and the EOF is the only end marker every broker agrees on.
    """
    consumer = clients.consumer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.consumer_config(),
            # A throwaway group: this reader assigns partitions itself and never commits.
            "group.id": f"{TAIL_READER_GROUP_PREFIX}{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        count = topic_partition_count(consumer, topic)
        assignment = []
        for partition in range(count):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
            if high > low:
                first = low if records_per_partition is None else max(low, high - records_per_partition)
                assignment.append(TopicPartition(topic, partition, first))
        if not assignment:
            return []
        consumer.assign(assignment)
        waiting = {tp.partition for tp in assignment}
        records = []
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is None:
                    records.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    waiting.discard(message.partition())
                else:
                    raise KafkaException(error)
        if waiting:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"could not read the end of {topic}"))
        return records
    finally:
        consumer.close()


def newest_offsets(settings: Settings, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """The offset of the newest record of each non-empty partition of `topic`.

    Read, not listed: the embedded broker (Tansu) lists the last batch's base offset + 1
    as a partition's end, so "listed end - 1" is the first record of the last batch
    (a processor catching up publishes several windows in one batch). Reading the last
    few offsets to the partition's end finds the newest record on any broker; a few,
    not one, so that transaction markers at the end (Apache Kafka) do not hide it.
    """
    newest: dict[int, int] = {}
    for message in read_topic_tail(settings, topic, 10, timeout):
        partition = message.partition()
        newest[partition] = max(newest.get(partition, -1), message.offset())
    return newest


def _first_record_at(consumer: Consumer, topic: str, partition: int, offset: int, timeout: float) -> Message | None:
    """The first record of `partition` at or after `offset`, None at the partition's end.
    `consumer` has `enable.partition.eof` on and is used for nothing else."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in consumer.consume(1, 0.5):
            error = message.error()
            if message.partition() != partition:
                continue
            if error is None:
                if message.offset() >= offset:
                    return message
            elif error.code() == KafkaError._PARTITION_EOF:
                return None
            else:
                raise KafkaException(error)
    raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"could not read {topic} [{partition}] at {offset}"))


def offsets_at_time(
    settings: Settings, topic: str, partitions: list[int], timestamp_ms: int, timeout: float = 10.0
) -> dict[int, int]:
    """Per partition, the first offset whose record's Kafka timestamp is at or after
    `timestamp_ms` (the partition's end if none is).

    The broker is asked first (ListOffsets by timestamp) and its answer checked by
    reading the records on either side of it. The embedded broker (Tansu 0.6.0) answers
    0 for every time, so a wrong answer is replaced by a binary search over reads,
    which assumes timestamps that grow along the partition (callers subtract a margin
    for records that do not)."""
    consumer = Consumer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.consumer_config(),
            "group.id": f"{TIME_SEARCH_GROUP_PREFIX}{uuid.uuid4()}",  # assigns partitions itself, never commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # One record per read, a few dozen reads: answer at once, not after the
            # default 500 ms wait for more data, and fetch little.
            "fetch.wait.max.ms": 10,
            "fetch.queue.backoff.ms": 0,
            "queued.min.messages": 1,
        }
    )
    found: dict[int, int] = {}
    try:
        asked = consumer.offsets_for_times(
            [TopicPartition(topic, p, timestamp_ms) for p in partitions], timeout=timeout
        )
        for answer in asked:
            partition = answer.partition
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)

            def at_or_after(offset: int, p: int = partition) -> Message | None:
                return _first_record_at(consumer, topic, p, offset, timeout)

            offset = answer.offset
            if _is_first_at_time(at_or_after, low, offset, timestamp_ms):
                found[partition] = _end_if_none(at_or_after, offset)
                continue
            found[partition] = _search(at_or_after, low, high, timestamp_ms)
            log.warning(
                "%s [%d]: the broker placed time %d ms at offset %d, but the records there say %d; found by reading",
                topic,
                partition,
                timestamp_ms,
                offset,
                found[partition],
            )
        return found
    finally:
        consumer.close()


def _is_first_at_time(at_or_after, low: int, offset: int, timestamp_ms: int) -> bool:
    """Whether `offset` (a broker's answer, -1 for "after the end") is the first at or after the time."""
    if offset < 0:
        return False  # checked by the search instead (it also finds the real end)
    here = at_or_after(offset)
    if here is not None and here.timestamp()[1] < timestamp_ms:
        return False
    if offset <= low:
        return True
    before = at_or_after(offset - 1)
    return before is not None and before.offset() < offset and before.timestamp()[1] < timestamp_ms


def _end_if_none(at_or_after, offset: int) -> int:
    record = at_or_after(offset)
    return record.offset() if record is not None else offset


def _search(at_or_after, low: int, high: int, timestamp_ms: int) -> int:
    """Binary search over [low, high] by reading, then on past `high`: some brokers list
    the last batch's base offset as the end, so the last batch is read through."""
    lo, hi = low, max(low, high)
    while lo < hi:
        middle = (lo + hi) // 2
        record = at_or_after(middle)
        if record is None or record.timestamp()[1] >= timestamp_ms:
            hi = middle
        else:
            lo = record.offset() + 1
    while True:
        record = at_or_after(lo)
        if record is None:
            return lo
        if record.timestamp()[1] >= timestamp_ms:
            return record.offset()
        lo = record.offset() + 1
