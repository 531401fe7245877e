"""ops/health.py: /healthz, /readyz and /metrics.

The probes' logic with a given clock (fast); the endpoint over HTTP; then against
the real broker: a running processor and one standing by are live and ready, a
stalled timer thread or poll loop turns /healthz red within seconds (the stall
injected in process: SIGSTOP would stop every thread), a lost broker turns
/readyz red. The Dockerfile's own HEALTHCHECK command is run against them.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from broker.embedded_broker import EmbeddedBroker, free_port, port_is_open
from ops.health import STALL_SECONDS, HealthEndpoint, Probes
from testkit.processes import ROOT, Topics, aligned_past, produce, run_script, wait_until
from testkit.workloads import login_workload

# ---- the probes' logic -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def probes(clock: Clock, down_since=None, stopping=False) -> Probes:
    state = {"down_since": down_since, "stopping": stopping}
    made = Probes("group-a", 0.5, 0.2, lambda: state["down_since"], lambda: state["stopping"], clock)
    made.state = state  # the test's handle on the flags
    return made


def test_live_while_starting_and_while_both_loops_turn():
    clock = Clock()
    p = probes(clock)
    assert p.liveness() == (True, "starting")  # start-up waits for the broker: not stuck
    p.poll_loop.beat()
    p.window_closer.beat()
    clock.now += STALL_SECONDS  # within each loop's period plus the stall allowance
    assert p.liveness() == (True, "ok")


@pytest.mark.parametrize("stuck", ["poll_loop", "window_closer"])
def test_a_loop_that_stops_turning_is_not_live(stuck):
    clock = Clock()
    p = probes(clock)
    p.poll_loop.beat()
    p.window_closer.beat()
    clock.now += STALL_SECONDS + 1
    getattr(p, "window_closer" if stuck == "poll_loop" else "poll_loop").beat()  # the other one turns
    alive, why = p.liveness()
    assert not alive and getattr(p, stuck).name in why and f"{STALL_SECONDS + 1:.0f}s" in why
    assert p.readiness() == (False, why)


def test_ready_once_a_member_with_the_broker_reachable():
    clock = Clock()
    p = probes(clock)
    p.poll_loop.beat()
    assert p.readiness() == (False, "not a member of consumer group group-a (yet)")
    p.group_joined()  # an empty assignment counts: a processor standing by is ready
    assert p.readiness()[0]
    p.state["down_since"] = clock.now - 7
    assert p.readiness() == (False, "broker unreachable for 7s")
    assert p.liveness()[0]  # the broker is never a reason to restart the processor
    p.state["down_since"] = None
    p.group_lost()
    assert not p.readiness()[0]
    p.group_joined()
    assert p.readiness()[0]


def test_stopping_is_not_ready_but_still_live():
    clock = Clock()
    p = probes(clock)
    p.poll_loop.beat()
    p.group_joined()
    p.state["stopping"] = True
    clock.now += 10 * STALL_SECONDS  # the loops have ended; the stop deadline bounds this
    assert p.liveness() == (True, "stopping")
    assert p.readiness() == (False, "stopping")


# ---- the endpoint over HTTP --------------------------------------------------------------


def get(port: int, path: str, headers: dict | None = None) -> tuple[int | None, str, dict]:
    """(status, body, headers); status None when nothing answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(errors="replace"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)
    except OSError as error:
        return None, str(error), {}


def test_endpoint_serves_metrics_health_and_readiness():
    registry = CollectorRegistry()
    Counter("probe_test_things", "things", registry=registry).inc(3)
    clock = Clock()
    p = probes(clock)
    endpoint = HealthEndpoint(0, registry, p, address="127.0.0.1").start()
    try:
        status, body, headers = get(endpoint.port, "/metrics")
        assert status == 200 and "probe_test_things_total 3.0" in body
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        status, body, headers = get(endpoint.port, "/metrics", {"Accept": "application/openmetrics-text"})
        assert status == 200 and body.endswith("# EOF\n") and "openmetrics" in headers["Content-Type"]
        assert get(endpoint.port, "/healthz")[:2] == (200, "starting\n")
        assert get(endpoint.port, "/readyz")[:2] == (503, "not a member of consumer group group-a (yet)\n")
        p.poll_loop.beat()
        p.group_joined()
        assert get(endpoint.port, "/readyz?verbose")[0] == 200
        clock.now += STALL_SECONDS + 5
        assert get(endpoint.port, "/healthz")[0] == 503
        assert get(endpoint.port, "/nothing-here")[0] == 404
    finally:
        endpoint.close()
    assert get(endpoint.port, "/healthz")[0] is None  # closed: nothing answers


def test_a_taken_metrics_port_is_a_bad_setting(tmp_path):
    """One line naming METRICS_PORT, exit 2; before any broker is needed."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "PATH": "/usr/bin:/bin",
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "METRICS_PORT": str(port),
        }
        result = run_script("kafka_processor.py", env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"kafka_processor.py: bad setting METRICS_PORT: cannot listen on port {port}: Address already in use"
    ]


# ---- the Dockerfile's HEALTHCHECK --------------------------------------------------------


def dockerfile_healthcheck() -> list[str]:
    """The image's HEALTHCHECK command, with this interpreter for `python`."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    [command] = re.findall(r"^HEALTHCHECK .*? CMD (.+)$", text, flags=re.MULTILINE)
    words = shlex.split(command)
    assert words[0] == "python", words
    return [sys.executable, *words[1:]]


def run_healthcheck(port: int) -> int:
    result = subprocess.run(
        dockerfile_healthcheck(), env={"METRICS_PORT": str(port)}, capture_output=True, text=True, timeout=10
    )
    return result.returncode


# ---- against the real broker -----------------------------------------------------------------


def wait_for_status(port: int, path: str, status: int, timeout: float) -> float:
    """Seconds it took until `path` answered `status`."""
    started = time.monotonic()
    wait_until(lambda: get(port, path)[0] == status, timeout, 0.1, f"{path} -> {status}")
    return time.monotonic() - started


@pytest.mark.broker
@pytest.mark.slow
def test_a_running_processor_and_one_standing_by_are_live_and_ready(topics, start_processor):
    """One input partition, two processors: one works, the other stands by; both are ready.
    The image's HEALTHCHECK command passes against them."""
    topics.create(input_partitions=1)
    produce(topics.bootstrap, topics.input, login_workload(aligned_past(10), 60, 200, 1, seed=5))
    ports = [free_port(), free_port()]
    processors = [start_processor(topics.env(METRICS_PORT=str(port))) for port in ports]
    for port in ports:
        wait_for_status(port, "/readyz", 200, 40)
        assert get(port, "/healthz")[:2] == (200, "ok\n")
        assert get(port, "/metrics")[0] == 200
        assert run_healthcheck(port) == 0
    wait_until(lambda: any("assigned partitions none" in p.log() for p in processors), 20, message="a standby")
    assert all(get(port, "/readyz")[0] == 200 for port in ports)  # the standby is ready too
    for processor in processors:
        assert processor.terminate()[0] == 0


@pytest.mark.broker
@pytest.mark.slow
def test_a_stalled_timer_thread_or_poll_loop_turns_healthz_red(topics):
    """In process: the timer thread blocked on the window closer's lock, then the poll loop
    blocked in its commit step. /healthz answers 503 naming the stuck loop within seconds
    (the allowance shortened to 2 s for the test), and 200 again once it turns."""
    from config import build_settings
    from kafka_processor import Processor

    topics.create(input_partitions=2)
    produce(topics.bootstrap, topics.input, login_workload(aligned_past(10), 60, 200, 2, seed=6))
    port = free_port()
    processor = Processor(build_settings(topics.env(METRICS_PORT=str(port))))
    processor.probes.stall_seconds = 2.0
    poll_loop_blocked = threading.Event()
    release_poll_loop = threading.Event()
    commit = processor.commits.commit_if_requested

    def commit_unless_blocked() -> None:
        if poll_loop_blocked.is_set():
            release_poll_loop.wait(30)
        commit()

    processor.commits.commit_if_requested = commit_unless_blocked
    runner = threading.Thread(target=processor.run)
    runner.start()
    try:
        wait_for_status(port, "/readyz", 200, 40)
        with processor.closer.lock:  # the timer thread's next turn blocks here
            took = wait_for_status(port, "/healthz", 503, 15)
            status, body, _ = get(port, "/healthz")
            assert "window closer" in body, body
            assert get(port, "/readyz")[0] == 503
            assert run_healthcheck(port) != 0
        print(f"stalled timer thread: /healthz 503 after {took:.1f}s: {body.strip()}")
        wait_for_status(port, "/healthz", 200, 5)

        poll_loop_blocked.set()
        took = wait_for_status(port, "/healthz", 503, 15)
        body = get(port, "/healthz")[1]
        assert "poll loop" in body, body
        print(f"stalled poll loop: /healthz 503 after {took:.1f}s: {body.strip()}")
        release_poll_loop.set()
        poll_loop_blocked.clear()
        wait_for_status(port, "/healthz", 200, 5)
        assert get(port, "/readyz")[0] == 200
    finally:
        release_poll_loop.set()
        processor.stop_requested.set()
        runner.join(30)
    assert not runner.is_alive()
    assert get(port, "/healthz")[0] is None  # the endpoint closes with the processor


@pytest.mark.broker
@pytest.mark.slow
def test_a_lost_broker_turns_readyz_red_and_healthz_stays_green(tmp_path, start_processor):
    """A broker of the test's own, stopped under a running processor: /readyz 503 within
    seconds, /healthz still 200 (restarting the processor would not bring the broker
    back); the broker started again: ready again."""
    broker = EmbeddedBroker(log_path=tmp_path / "own-broker.log").start()
    try:
        topics = Topics(broker.bootstrap_servers, "in-lost", "out-lost", "dlq-lost", "group-lost")
        topics.create(input_partitions=2)
        port = free_port()
        processor = start_processor(topics.env(METRICS_PORT=str(port)))
        wait_for_status(port, "/readyz", 200, 40)
        broker.stop()
        took = wait_for_status(port, "/readyz", 503, 10)
        print(f"broker stopped: /readyz 503 after {took:.1f}s: {get(port, '/readyz')[1].strip()}")
        for _ in range(10):  # longer than a publish attempt waits for the broker
            assert get(port, "/healthz")[0] == 200
            time.sleep(0.5)
        assert run_healthcheck(port) == 0
        broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "own-broker-again.log").start()
        took = wait_for_status(port, "/readyz", 200, 40)
        print(f"broker back: /readyz 200 after {took:.1f}s")
        assert processor.terminate()[0] == 0
    finally:
        broker.stop()


def test_the_healthcheck_command_is_what_the_dockerfile_says():
    command = dockerfile_healthcheck()
    assert command[1] == "-c" and "urllib" in command[2] and "/healthz" in command[2]
    assert "METRICS_PORT" in command[2]
    assert Path(command[0]).name.startswith("python")


class CuttableProxy:
    """A TCP proxy in front of a broker that advertises the proxy's address: `cut()` drops
    every connection and refuses new ones (a network blip), `start()` lets them in again."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> CuttableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(50)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._sockets = []


@pytest.mark.broker
@pytest.mark.slow
def test_ready_again_after_a_network_blip_with_no_input(tmp_path):
    """A 3 s network blip while nothing comes in: no acknowledgement follows to say the
    broker is back, yet /readyz must turn green again. It stayed red for good before
    (90 s and counting), reporting the broker unreachable although it was there."""
    from config import build_settings
    from kafka_processor import Processor

    broker_port, proxy_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{proxy_port}"
    log = open(tmp_path / "broker.log", "wb")  # noqa: SIM115 - closed below
    broker = subprocess.Popen(
        [EmbeddedBroker.binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}"]
        + ["--advertised-listener-url", address],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proxy = CuttableProxy(proxy_port, broker_port)
    runner = None
    try:
        wait_until(lambda: port_is_open(broker_port), 15, 0.05, "the broker")
        proxy.start()
        topics = Topics(f"127.0.0.1:{proxy_port}", "in-blip", "out-blip", "dlq-blip", "group-blip")
        topics.create(input_partitions=1)
        produce(topics.bootstrap, topics.input, login_workload(aligned_past(5), 30, 20, 1, seed=7))
        port = free_port()
        processor = Processor(build_settings(topics.env(METRICS_PORT=str(port))))
        runner = threading.Thread(target=processor.run)
        runner.start()
        wait_for_status(port, "/readyz", 200, 40)
        wait_until(lambda: processor.stats.records == 20 and processor.stats.windows_published >= 1, 30, message="idle")
        proxy.cut()
        wait_for_status(port, "/readyz", 503, 10)
        time.sleep(3)
        assert get(port, "/readyz")[0] == 503  # the re-check does not take cached metadata for an answer
        proxy.start()
        took = wait_for_status(port, "/readyz", 200, 20)
        print(f"network back: /readyz 200 after {took:.1f}s")
        processor.stop_requested.set()
    finally:
        proxy.cut()
        if runner is not None:
            runner.join(30)
        broker.kill()
        broker.wait(10)
        log.close()
