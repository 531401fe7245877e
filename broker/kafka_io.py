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
from collections import OrderedDict
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


def is_fatal(error: KafkaError) -> bool:
    """An error librdkafka calls fatal: the client can never produce again. confluent-kafka
    raises it from the producer's poll()/flush() (flagged `fatal()`), other bindings hand it
    to `error_cb`; every produce() after it fails with `_FATAL`."""
    return error.fatal() or error.code() == KafkaError._FATAL


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

    Also the one place that hears of a fatal client error (`on_fatal`): it is said in one
    line and the hooks given to `when_fatal` run (the processor stops without committing,
    exit 1, so that an orchestrator restarts it); and it knows the producers
    (`RenewableProducer`) whose acknowledgements are overdue (`producer_stall`).
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
        self.fatal: str | None = None  # the first fatal client error, as librdkafka said it
        self._fatal_hooks: list[Callable[[], None]] = []
        self._created_hooks: list[Callable[[list[str]], None]] = []
        self._producers: list[RenewableProducer] = []

    def when_fatal(self, *hooks: Callable[[], None]) -> None:
        """Run `hooks` (once) when a client reports a fatal error."""
        self._fatal_hooks.extend(hooks)

    def on_fatal(self, error: KafkaError) -> None:
        """A fatal client error (`is_fatal`): said once, in one line; then the hooks."""
        with self._lock:
            first = self.fatal is None
            if first:
                self.fatal = error.str()
        if not first:
            return
        self.log.critical(
            "fatal Kafka client error: %s; this client can never write again: stopping (exit status 1) so that"
            " it is restarted",
            error.str(),
        )
        for hook in self._fatal_hooks:
            hook()

    def when_topics_created(self, hook: Callable[[list[str]], None]) -> None:
        """Run `hook` with the names of the topics `ensure_topics` creates from now on."""
        self._created_hooks.append(hook)

    def topics_created(self, names: list[str]) -> None:
        if names:
            for hook in list(self._created_hooks):
                hook(names)

    def watch_producer(self, producer: RenewableProducer) -> None:
        self._producers.append(producer)

    @property
    def producers(self) -> list[RenewableProducer]:
        return list(self._producers)

    def producer_stall(self) -> str | None:
        """Why a producer is not getting its writes acknowledged (for /readyz), or None."""
        for producer in self._producers:
            stall = producer.stall()
            if stall is not None:
                return stall
        return None

    def outage(self) -> str | None:
        """ "the broker at X has been unreachable for 12s", or None while it is reachable."""
        down_since = self.down_since
        if down_since is None:
            return None
        return f"the broker at {self.bootstrap_servers} has been unreachable for {time.monotonic() - down_since:.0f}s"

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
        """librdkafka `error_cb` (and the errors a consumer hands back from consume())."""
        if is_fatal(error):
            self.on_fatal(error)
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
        if node in self._down:
            return
        back_at = self._back_at.get(node)
        recently_back = back_at is not None and now - back_at < _STALE_ERROR_SECONDS
        # A client polled seldom serves its errors late, even long after the node came
        # back (and for a node this processor never said was down): a refused connection
        # to a node that accepts connections now is from before.
        stale_if_up = recently_back or "Connection refused" in text
        if stale_if_up and self._accepts_connections(node):
            return  # a failed reconnect from before it came back, served late
        with self._lock:
            if node in self._down:
                return
            self._down[node] = now
            if self.down_since is None:
                self.down_since = now
        self.log.warning("broker %s unreachable (%s); retrying until it is back", node, text)

    def steady_for(self, seconds: float) -> bool:
        """No broker is down, and none came back within the last `seconds`."""
        with self._lock:
            if self._down:
                return False
            latest = max(self._back_at.values(), default=None)
        return latest is None or time.monotonic() - latest >= seconds

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
        the processor not ready, telemetry/health.py) for good after a blip."""
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


# librdkafka's error codes of a delivery purged by `Producer.purge()`.
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# After this many renewals in a row that brought no acknowledgement, the wait before the
# next one stops doubling: ACK_TIMEOUT_SECONDS x 2^3.
_RENEWAL_BACKOFF_STEPS = 3
# How long a retired producer may take to serve its purged deliveries before it is dropped.
_RETIRE_SECONDS = 5.0


class _Sent:
    """One produce() call whose delivery report the caller has not had yet: kept so that
    a new producer can send it again. Holds the caller's objects, copies nothing."""

    __slots__ = ("topic", "kwargs", "on_delivery", "produced_at", "producer")

    def __init__(self, topic: str, kwargs: dict, on_delivery: Callable | None, produced_at: float) -> None:
        self.topic = topic
        self.kwargs = kwargs
        self.on_delivery = on_delivery
        self.produced_at = produced_at  # when first handed to a producer (this one or one it replaced)
        self.producer: object = None  # the producer it is on now; reports from any other are ignored


class RenewableProducer:
    """The producer the processor's writers hold (parts, dead-letter copies, windows), in
    place of librdkafka's own, for two failures it cannot get out of alone.

    * **No acknowledgement for longer than `ack_timeout`** (ACK_TIMEOUT_SECONDS) while the
      broker is reachable: `stall()` says so (/readyz turns red with it), and the producer
      is replaced by a new one (`renew`), which sends again, in their order, everything
      the old one had not had acknowledged; the callers get one delivery report per
      message as before (from the new producer), so nothing changes for them. Why: a
      broker that lost its state (the embedded one, restarted) forgets the producer ids of
      idempotent producers, which then wait for their acknowledgements forever (idempotence
      stays on: a new producer gets a new id). Renewals that bring no acknowledgement (a
      cluster with too few brokers to write) are spaced out: the wait doubles, to 8 times
      the bound. A message the old producer had in flight may be written twice: parts and
      windows are written again by design (same key and bytes), a DLQ copy is one record
      more, which the replay tool counts once per source.
    * **A fatal error** (`is_fatal`): raised from produce(), or from poll()/flush() as
      confluent-kafka does, it goes to `BrokerHealth.on_fatal` (one line, the processor
      stops without committing, exit 1). poll()/flush() then answer as if nothing were
      delivered; produce() keeps raising, as librdkafka does.

    Thread-safe: the poll loop, the timer thread and the merger call it at once.
    """

    def __init__(
        self,
        name: str,
        config: dict,
        health: BrokerHealth,
        ack_timeout: float,
        clients: KafkaClients | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name  # what it writes, for log lines and /readyz: "parts and dead-letter copies"
        self._health = health
        self._ack_timeout = ack_timeout
        self._clients = clients or REAL_CLIENTS
        self._clock = clock
        self._config = {
            **config,
            # Never let a write create a topic with the broker's defaults (a restarted broker
            # that lost its topics made the output 4 partitions where windows need 1, so a
            # reader saw them out of order): the processor creates its topics with their own
            # settings (broker/pipeline_topics.py), again if a broker lost them.
            "allow.auto.create.topics": False,
        }
        self._lock = threading.Lock()
        self._sent: OrderedDict[_Sent, None] = OrderedDict()  # not yet reported, oldest first
        self._waiting_since = clock()  # the start of the current wait for an acknowledgement
        self._renewed_at: float | None = None
        self._renewals_without_ack = 0
        self.renewals = 0  # for metrics
        self._producer = self._make()
        health.watch_producer(self)

    def _make(self):
        generation = self.renewals
        forward = self._config.get("error_cb", self._health.on_error)

        def on_error(error: KafkaError) -> None:
            # A retired producer's complaints (its purged writes) are no longer anyone's business.
            if generation == self.renewals:
                forward(error)

        return self._clients.producer({**self._config, "error_cb": on_error})

    # ---- what librdkafka's Producer offers (the part the processor uses) ---------------

    def produce(self, topic: str, value=None, key=None, on_delivery: Callable | None = None, **kwargs) -> None:
        sent = _Sent(topic, {"value": value, "key": key, **kwargs}, on_delivery, self._clock())
        try:
            with self._lock:
                self._send(sent)
        except KafkaException as error:
            self._note_if_fatal(error)
            raise

    def poll(self, timeout: float = 0) -> int:
        producer = self._producer
        try:
            return producer.poll(timeout)
        except (KafkaException, SystemError) as error:
            self._fatal_or_raise(error)
            return 0

    def flush(self, timeout: float = -1) -> int:
        """librdkafka's flush(); then, if acknowledgements are overdue, a new producer."""
        producer = self._producer
        try:
            remaining = producer.flush(timeout)
        except (KafkaException, SystemError) as error:
            self._fatal_or_raise(error)
            remaining = len(producer)
        self.renew_if_stalled()
        return remaining

    def __len__(self) -> int:
        return len(self._producer)

    def list_topics(self, topic: str | None = None, timeout: float = -1):
        return self._producer.list_topics(topic, timeout=timeout)

    # ---- acknowledgements ----------------------------------------------------------------

    def _send(self, sent: _Sent) -> None:
        """Hand `sent` to the current producer (under the lock: a renewal never misses it)."""
        producer = self._producer
        producer.produce(sent.topic, on_delivery=self._report_for(sent, producer), **sent.kwargs)
        if not self._sent:
            self._waiting_since = self._clock()  # nothing was waiting: the wait starts now
        sent.producer = producer
        self._sent[sent] = None

    def _report_for(self, sent: _Sent, producer: object) -> Callable:
        def report(error: KafkaError | None, message: Message) -> None:
            with self._lock:
                if sent.producer is not producer or sent not in self._sent:
                    return  # sent again by a newer producer: its report comes from there
                del self._sent[sent]
                if error is None:
                    self._waiting_since = self._clock()
                    self._renewals_without_ack = 0
            if error is not None and error.code() in _PURGED and self._health.fatal is not None:
                return  # purged by the fatal error: the processor stops, nothing is produced again
            if sent.on_delivery is not None:
                sent.on_delivery(error, message)

        return report

    def _fatal_or_raise(self, error: Exception) -> None:
        if not self._note_if_fatal(error):
            raise error

    def _note_if_fatal(self, error: Exception) -> bool:
        """Tell BrokerHealth of a fatal error; False if `error` is not one. produce() only
        says `_FATAL` ("Local: Fatal error"): the error itself comes from the next poll(),
        asked for here so that the one line says what it was."""
        kafka_error = _fatal_in(error)
        if kafka_error is None:
            return False
        if kafka_error.code() == KafkaError._FATAL:
            try:
                self._producer.poll(0)
            except (KafkaException, SystemError) as raised:
                kafka_error = _fatal_in(raised) or kafka_error
        self._health.on_fatal(kafka_error)
        return True

    def unacknowledged_for(self) -> float:
        """How long the wait for an acknowledgement has lasted while the broker was
        reachable (0: nothing waits). The clock stands still while the broker is said to
        be down: that is /readyz's other reason, and a renewal would not help."""
        with self._lock:
            now = self._clock()
            if not self._sent or self._health.down_since is not None:
                self._waiting_since = now
                return 0.0
            return max(0.0, now - self._waiting_since)

    def stall(self) -> str | None:
        """Why this producer is not ready (for /readyz), or None."""
        waited = self.unacknowledged_for()
        if waited <= self._ack_timeout:
            return None
        renewed = f"; recreated {self.renewals} time(s)" if self.renewals else ""
        return (
            f"no acknowledgement from the broker for {waited:.0f}s (the producer of {self.name},"
            f" ACK_TIMEOUT_SECONDS={self._ack_timeout:g}{renewed})"
        )

    def oldest_unacknowledged(self, topic: str) -> float:
        """Seconds since the oldest message to `topic` still waiting for its acknowledgement
        was first handed to a producer (0: none waits)."""
        with self._lock:
            oldest = next((sent.produced_at for sent in self._sent if sent.topic == topic), None)
            return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def renew_if_stalled(self) -> bool:
        """`renew` if nothing was acknowledged for longer than the bound (and, after renewals
        that did not help, for twice as long as the last wait, up to 8 times the bound)."""
        waited = self.unacknowledged_for()
        if waited <= self._ack_timeout:
            return False
        with self._lock:
            backoff = self._ack_timeout * 2 ** min(self._renewals_without_ack, _RENEWAL_BACKOFF_STEPS)
            if self._renewed_at is not None and self._clock() - self._renewed_at < backoff:
                return False
        self.renew(f"no acknowledgement for {waited:.0f}s")
        # The others too, idle or not: a broker that forgot this producer's id forgot theirs,
        # and hands the old ids out again, so an old producer writing under one that a new
        # producer now holds is refused as a fatal sequence error (seen on the embedded
        # broker: the merger's idle producer, after the parts' producer was replaced).
        for other in self._health.producers:
            if other is not self:
                other.renew(f"replaced with the producer of {self.name}", alongside=True)
        return True

    def renew(self, why: str, alongside: bool = False) -> None:
        """A new producer in place of the current one, which is purged and dropped; what it
        had not had acknowledged is sent again by the new one, oldest first. A message the
        new one will not take (a full queue, a topic it does not know) is reported to its
        caller as not delivered, which produces it again (each writer's retry path)."""
        with self._lock:
            old = self._producer
            self.renewals += 1
            if not alongside:  # its own wait: the next renewal of its own waits longer
                self._renewals_without_ack += 1
                self._renewed_at = self._clock()
            self._producer = self._make()
            waiting, self._sent = list(self._sent), OrderedDict()
            waiting_since = self._waiting_since  # still waiting: /readyz stays red until an acknowledgement
            refused = []
            for sent in waiting:
                try:
                    self._send(sent)
                except (BufferError, KafkaException) as error:
                    refused.append((sent, error))
            self._waiting_since = waiting_since
        log.warning(
            "the producer of %s: %s%s; recreated it (%d message(s) sent again)",
            self.name,
            why,
            "" if alongside else f" from the broker at {self._health.bootstrap_servers}",
            len(waiting) - len(refused),
        )
        threading.Thread(target=_retire, args=(old,), name="producer-retire", daemon=True).start()
        for sent, error in refused:
            if isinstance(error, KafkaException):
                self._note_if_fatal(error)
            if sent.on_delivery is not None:
                sent.on_delivery(KafkaError(KafkaError._PURGE_QUEUE, f"not sent again: {error}"), None)


def _fatal_in(error: BaseException | None) -> KafkaError | None:
    """The fatal KafkaError `error` carries, if any. confluent-kafka raises a fatal error
    from poll()/flush() as a KafkaException, or, when a delivery report ran while it was
    pending (seen: a restarted broker refusing an old producer id), as a SystemError
    caused by it."""
    for candidate in (error, getattr(error, "__cause__", None), getattr(error, "__context__", None)):
        if isinstance(candidate, KafkaException) and candidate.args:
            kafka_error = candidate.args[0]
            if isinstance(kafka_error, KafkaError) and is_fatal(kafka_error):
                return kafka_error
    return None


def _retire(producer) -> None:
    """Purge a replaced producer and serve its reports (ignored: their messages were sent
    again); off the caller's thread, as destroying a client may wait for its threads."""
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(_RETIRE_SECONDS)
    except (KafkaException, RuntimeError) as error:
        log.debug("retired producer: %s", error)


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
            created = []
            refused = []
            for name, future in admin.create_topics(missing, operation_timeout=10).items() if missing else []:
                try:
                    future.result()
                    log.info("created topic %s", name)
                    created.append(name)
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
            health.topics_created(created)
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
    """Per partition, an offset before which no record has a Kafka timestamp at or
    after `timestamp_ms` (the partition's end if none has): reading from it misses none
    of them. Callers skip the earlier records it may also give (a recomputation counts
    windows before its start as published).

    The broker is asked (ListOffsets by timestamp). Apache Kafka answers from its time
    index: the first offset stamped at or after the time, or -1 when none is (the end).
    That offset may be a transaction marker's, stamped when its transaction ended, with
    earlier records after it (input written late in transactions); its answer is taken
    as it is: reading to improve on it would assume timestamps that grow along the
    partition. The embedded
    broker (Tansu 0.6.0) answers 0 for every time: an answer at the partition's start is
    checked by reading the record there, and when that record is before the time, the
    offset is found instead by a binary search over reads, which assumes timestamps that
    grow along the partition (callers subtract a margin for records that do not), and
    said in the log."""
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
            partition, offset = answer.partition, answer.offset
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)

            def at_or_after(offset: int, p: int = partition) -> Message | None:
                return _first_record_at(consumer, topic, p, offset, timeout)

            if offset < 0:
                found[partition] = high  # none that late: Kafka's -1 (Tansu never answers it)
                continue
            if offset > low:
                found[partition] = offset
                continue
            first = at_or_after(offset)
            if first is None or first.timestamp()[1] >= timestamp_ms:
                found[partition] = offset  # the start is right: its first record is late enough
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
