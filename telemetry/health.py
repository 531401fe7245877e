"""The processor's HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz`
for whoever runs it (Kubernetes probes, Docker's HEALTHCHECK, a load balancer).

* `/healthz`, liveness: the poll loop and the timer thread (ingest/window_closer.py) are
  turning. Each loop beats a `Heartbeat` once per turn (one clock read, never per
  record); a loop that has not beaten for `STALL_SECONDS` beyond its own period is
  stuck, and the answer is 503 naming it. Only a restart helps then: a stuck poll
  loop keeps its partitions (librdkafka heartbeats the group from a thread of its
  own, for `max.poll.interval.ms`, five minutes by default), a stuck timer thread
  publishes nothing. Liveness never depends on the broker: an orchestrator that
  restarts every processor while Kafka is away helps nobody.
* `/readyz`, readiness: the broker is reachable (`BrokerHealth.down_since`), every
  producer has its writes acknowledged within ACK_TIMEOUT_SECONDS
  (`BrokerHealth.producer_stall`), and this processor is a member of its consumer
  group (an assignment has been received, possibly empty: a processor beyond the
  partition count stands by, ready to take over). The first that fails is the answer,
  in that order: the broker first, since a broker that is away also gets the member
  dropped from its group, and "not a member" would hide why. Rolling updates and
  disruption budgets count on it.

prometheus_client's own server serves metrics only, hence a small stdlib server
for all three. Every answer is computed when asked; nothing here runs per record.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger("health")

# How long beyond its own period a loop may go without turning before /healthz says
# it is stuck. The longest turns that are not stuck: the timer's publish attempt
# waits up to 5 s for the broker, and may first wait for a rebalance that holds its
# lock for as long again; an assignment callback in the poll loop makes two broker
# requests of up to 10 s each. 30 s stays clear of those, with an orchestrator's
# failure threshold on top.
STALL_SECONDS = 30.0


class Heartbeat:
    """When a loop last turned. `beat()` once per turn: one clock read and one store."""

    __slots__ = ("name", "period", "last", "_clock")

    def __init__(self, name: str, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.period = period  # how long a healthy loop may sleep between turns
        self.last: float | None = None  # never: the loop has not started
        self._clock = clock

    def beat(self) -> None:
        self.last = self._clock()


class Probes:
    """The answers of /healthz and /readyz, from heartbeats and a few flags."""

    def __init__(
        self,
        consumer_group: str,
        poll_period: float,
        timer_period: float,
        broker_down_since: Callable[[], float | None],
        stopping: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        producer_stall: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.consumer_group = consumer_group
        self._producer_stall = producer_stall
        self.stall_seconds = STALL_SECONDS
        self.poll_loop = Heartbeat("poll loop", poll_period, clock)
        self.window_closer = Heartbeat("window closer (timer thread)", timer_period, clock)
        self._broker_down_since = broker_down_since
        self._stopping = stopping
        self._clock = clock
        self._member = threading.Event()
        self._refusal: str | None = None

    def refuse(self, why: str) -> None:
        """The processor will not act (settings the group does not share): not ready, for good."""
        self._refusal = why

    def group_joined(self) -> None:
        """The input consumer received an assignment (possibly empty)."""
        self._member.set()

    def group_lost(self) -> None:
        """The group dropped this member (session timed out): not ready until it rejoins."""
        self._member.clear()

    def is_member(self) -> bool:
        """An assignment was received since the group last dropped this member."""
        return self._member.is_set()

    def liveness(self) -> tuple[bool, str]:
        """(alive, why). Before the loops start (start-up waits for the broker: topics,
        the output's tail) and while stopping (bounded by the stop deadline), alive."""
        if self._stopping():
            return True, "stopping"
        now = self._clock()
        for heartbeat in (self.poll_loop, self.window_closer):
            if heartbeat.last is None:
                continue
            idle = now - heartbeat.last
            if idle > heartbeat.period + self.stall_seconds:
                return False, f"stuck: the {heartbeat.name} has not turned for {idle:.0f}s"
        if self.poll_loop.last is None:
            return True, "starting"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): a live member of the group, acting on the group's settings, the
        broker reachable, writes acknowledged.

        The broker comes before the group: while it is down the member is dropped from
        the group after its session timeout, and "not a member" would hide the cause."""
        if self._stopping():
            return False, "stopping"
        alive, why = self.liveness()
        if not alive:
            return False, why
        if self._refusal is not None:  # settings the group does not share: until restarted
            return False, self._refusal
        down_since = self._broker_down_since()
        if down_since is not None:
            return False, f"broker unreachable for {self._clock() - down_since:.0f}s"
        stall = self._producer_stall()
        if stall is not None:
            return False, stall
        if not self._member.is_set():
            return False, f"not a member of consumer group {self.consumer_group} (yet)"
        return True, f"ready: member of consumer group {self.consumer_group}, broker reachable"


class HealthEndpoint:
    """One threaded HTTP server on `port`: /metrics, /healthz, /readyz."""

    def __init__(self, port: int, registry: CollectorRegistry, probes: Probes, address: str = "0.0.0.0") -> None:
        handler = _handler_for(registry, probes)
        self._server = ThreadingHTTPServer((address, port), handler)  # OSError if the port is taken
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-endpoint", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HealthEndpoint:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _handler_for(registry: CollectorRegistry, probes: Probes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._metrics()
            elif path in ("/healthz", "/readyz"):
                ok, why = probes.liveness() if path == "/healthz" else probes.readiness()
                self._send(200 if ok else 503, "text/plain; charset=utf-8", f"{why}\n".encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")

        def _metrics(self) -> None:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(registry)
            except Exception:
                log.exception("the metrics could not be rendered")
                self._send(500, "text/plain; charset=utf-8", b"metrics failed; see the processor's log\n")
                return
            encoding = None
            if gzip_accepted(self.headers.get("Accept-Encoding", "")):
                body, encoding = gzip.compress(body), "gzip"
            self._send(200, content_type, body, encoding)

        def _send(self, status: int, content_type: str, body: bytes, encoding: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            pass  # no line per request: probes and scrapes come every few seconds

    return Handler
