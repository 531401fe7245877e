"""telemetry/health.py: /healthz, /readyz and /metrics.

The probes' logic with a given clock (fast); the endpoint over HTTP; then against
the real broker: a running processor and one standing by are live and ready, a
stalled timer thread or poll loop turns /healthz red within seconds (the stall
injected in process: SIGSTOP would stop every thread), a lost broker turns
/readyz red. The Dockerfile's own HEALTHCHECK command is run against them.
"""

from __future__ import annotations

import contextlib
import json
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
from telemetry.health import STALL_SECONDS, HealthEndpoint, Probes
from testkit.processes import ROOT, Topics, aligned_past, latest_by_key, produce, run_script, wait_until
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


def test_while_the_broker_is_down_readyz_names_it_even_once_the_group_dropped_the_member():
    """The group drops a member that cannot reach the broker after its session timeout;
    /readyz must keep naming the cause, not switch to "not a member" (it did after 8 s)."""
    clock = Clock()
    p = probes(clock)
    p.poll_loop.beat()
    p.group_joined()
    p.state["down_since"] = clock.now
    clock.now += 8
    p.group_lost()  # the session timed out meanwhile
    assert p.readiness() == (False, "broker unreachable for 8s")


def test_a_producer_whose_writes_go_unacknowledged_is_not_ready_and_says_which():
    clock = Clock()
    stall = {"why": None}
    p = Probes("group-a", 0.5, 0.2, lambda: None, lambda: False, clock, producer_stall=lambda: stall["why"])
    p.poll_loop.beat()
    p.group_joined()
    assert p.readiness()[0]
    stall["why"] = "no acknowledgement from the broker for 61s (the producer of windows, ACK_TIMEOUT_SECONDS=60)"
    assert p.readiness() == (False, stall["why"])
    p.group_lost()  # the stall is the cause to name, not the membership
    assert p.readiness() == (False, stall["why"])


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


class ReadyzRecorder:
    """Asks /readyz every 0.2 s on a thread of its own: (seconds since start, status, why)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.started = time.monotonic()
        self.answers: list[tuple[float, int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            status, body, _ = get(self.port, "/readyz")
            self.answers.append((time.monotonic() - self.started, status, body.strip()))

    def now(self) -> float:
        return time.monotonic() - self.started

    def between(self, start: float, end: float) -> list[tuple[float, int | None, str]]:
        return [answer for answer in self.answers if start <= answer[0] <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def topic_layout(bootstrap: str, names: list[str]) -> dict[str, tuple[int, str]]:
    """{topic: (partitions, cleanup.policy)} of those that exist (the embedded broker lists
    only the configs a topic was created with: None for none)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
    existing = admin.list_topics(timeout=10).topics
    layout = {}
    for name in names:
        if name not in existing:
            continue
        [future] = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, name)]).values()
        entry = future.result(10).get("cleanup.policy")
        policy = None if entry is None else entry.value
        layout[name] = (len(existing[name].partitions), policy)
    return layout


@pytest.mark.broker
@pytest.mark.slow
def test_a_broker_restarted_empty_under_a_running_processor_is_named_and_everything_comes_back(
    tmp_path, start_processor
):
    """The embedded broker killed under a running processor, kept away past the session
    timeout, and started again empty (it keeps everything in memory), with the default
    settings (idempotent producers; ACK_TIMEOUT_SECONDS shortened from 60 to 15 so that the
    test does not wait a minute per producer). /readyz names the broker while it is away
    (never "not a member of consumer group"), then, once the broker is back, the producers
    it forgot (no acknowledgement, ever), each within the bound; the processor creates the
    topics again with the project's settings (the output: 1 partition, compacted; never the
    broker's own 4-partition default), recreates its producers, and publishes exactly the
    oracle's windows for the input written after the restart. Before: ready and publishing
    nothing for good, the output auto-created with 4 partitions."""
    from testkit.oracle import expected_windows

    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()
    recorder = None
    try:
        topics = Topics(
            broker.bootstrap_servers,
            "in-restarted",
            "out-restarted",
            "dlq-restarted",
            "group-restarted",
            {"WINDOW_SECONDS": "5", "ALLOWED_LATENESS_SECONDS": "2", "ACK_TIMEOUT_SECONDS": "15"},
        )
        topics.create()
        metrics_port = free_port()
        processor = start_processor(topics.env(METRICS_PORT=str(metrics_port)))
        wait_for_status(metrics_port, "/readyz", 200, 60)
        produce(topics.bootstrap, topics.input, login_workload(aligned_past(2, 5), 30, 300, 4, seed=1))
        wait_until(lambda: latest_by_key(topics.bootstrap, topics.output), 30, message="a first window")
        recorder = ReadyzRecorder(metrics_port)

        broker.kill()
        killed_at = recorder.now()
        processor.wait_for_log("unreachable", timeout=30)
        time.sleep(12)  # past the session timeout (6 s here): the group drops the member meanwhile
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker-again.log").start()
        back_at = recorder.now()
        names = [topics.input, topics.output, topics.partials, topics.dlq]
        layout = wait_until(
            lambda: len(found := topic_layout(topics.bootstrap, names)) == 4 and found, 60, message="the topics again"
        )
        assert layout[topics.output] == (1, "compact"), layout  # the project's settings, not the broker's
        assert layout[topics.partials][0] == layout[topics.dlq][0] == 1 and layout[topics.input][0] == 4, layout

        now = int(time.time())
        after = [(p, v, int(time.time() * 1000)) for p, v, _ in login_workload(now, 1, 200, 4, seed=2)]
        produce(topics.bootstrap, topics.input, after)
        expected = expected_windows([(value, ms) for _, value, ms in after], window=5)
        published = wait_until(
            lambda: all(k in (got := latest_by_key(topics.bootstrap, topics.output)) for k in expected) and got,
            120,
            message="the windows of the input written after the restart",
        )
        assert {k: json.loads(published[k]) for k in expected} == expected
        wait_for_status(metrics_port, "/readyz", 200, 30)
        recorder.stop()

        away = recorder.between(killed_at + 1, back_at)
        print(f"while away: {sorted({why.split(' for ')[0] for _, _, why in away})}")
        assert away and all(status == 503 and why.startswith("broker unreachable for") for _, status, why in away)
        stalls = [(at, why) for at, _, why in recorder.between(back_at, recorder.now()) if "acknowledgement" in why]
        print(f"after the restart at {back_at:.1f}s: {stalls[:1]} ... {len(stalls)} answer(s) naming a producer")
        assert stalls, "no /readyz answer named the producers the broker forgot"
        assert stalls[0][0] - back_at <= 15 + 30, stalls[0]  # the bound, plus the topics and the group again
        assert re.search(r"no acknowledgement from the broker for \d+s \(the producer of", stalls[0][1])
        log = processor.log()
        assert "recreated it" in log and "(a rebalance in progress?)" not in log
        assert processor.terminate()[0] == 0
    finally:
        if recorder is not None:
            recorder.stop()
        broker.stop()


def test_a_stop_that_waits_on_a_broker_that_is_down_says_so_instead_of_guessing_a_rebalance(monkeypatch, caplog):
    """Both lines a stop may end with when the broker does not answer (the consumer did not
    leave its group in time; the stop deadline passed) guessed "(a rebalance in progress?)"
    even when the broker was simply down. With the broker known to be down they name it.
    In process, over the in-memory Kafka: when librdkafka's close returns is not on cue."""
    import logging

    import kafka_processor
    from broker.pipeline_topics import Published
    from tests.fake_kafka import Faults
    from tests.test_kafka_io import DOWN, fake_pipeline

    processor, _cluster, _commits = fake_pipeline(Faults(enabled=False))
    processor.resume_from(Published())
    processor.start_consuming()
    processor.merger.start()
    processor.health.on_error(DOWN)  # the broker went away
    monkeypatch.setattr(kafka_processor, "close_within", lambda consumer, seconds: False)  # it never answers
    monkeypatch.setattr(kafka_processor.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(kafka_processor.os, "_exit", lambda code: None)
    named = r"\(the broker at fake:9 has been unreachable for \d+s\)"
    with caplog.at_level(logging.WARNING):
        assert processor._shutdown() == 0
        [line] = [r.getMessage() for r in caplog.records if "exiting" in r.getMessage()]
        print(line)
        assert "rebalance" not in line and re.search(named, line)
        caplog.clear()
        kafka_processor._exit_if_stuck(processor.health)  # the stop deadline's line
        [line] = [r.getMessage() for r in caplog.records if "exiting" in r.getMessage()]
        print(line)
        assert "rebalance" not in line and re.search(named, line)
