"""local_stack.py as a user runs it: its port setting, reusing a broker already
listening (and saying so), the commands it prints for the two-terminal flow, and
the first window of that flow within seconds. Real processes, real brokers, never 29092."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embedded_broker import free_port, port_is_open
from tests.conftest import ROOT, read_topic

pytestmark = pytest.mark.broker


class Stack:
    """`local_stack.py` in the background, its terminal output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "local_stack.py"), "--log-dir", str(cwd / "logs"), *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """The first line containing `text`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if text in line:
                    return line
            assert self.process.poll() is None or self._reader.is_alive(), f"stack exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} from the stack:\n{self.output()}"
            time.sleep(0.1)

    def interrupt(self, timeout: float = 40.0) -> int:
        """Ctrl-C, as in the terminal; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code


@pytest.fixture
def start_stack(tmp_path):
    started: list[Stack] = []

    def start(*args: str, env: dict[str, str]) -> Stack:
        stack = Stack(list(args), env, tmp_path)
        started.append(stack)
        return stack

    yield start
    for stack in started:  # SIGINT, never SIGKILL: the stack must stop the broker it started
        if stack.process.poll() is None:
            stack.interrupt()


def user_env(**settings: str) -> dict[str, str]:
    """A user's terminal: no KAFKA_SESSION_TIMEOUT_MS, nothing from make."""
    return {"PATH": "/usr/bin:/bin", **settings}


def test_starts_its_own_broker_on_the_port_it_is_given_and_the_printed_flow_works(start_stack, tmp_path):
    """Item 4 of issue 12: the two-terminal flow, as printed by `make broker`, shows its
    first window within seconds (the 45 s librdkafka session timeout made it 24 s)."""
    port = free_port()
    stack = start_stack("--broker-only", env=user_env(KAFKA_BOOTSTRAP_SERVERS=f"localhost:{port}"))
    assert f"broker: Tansu on localhost:{port}" in stack.wait_for("broker:")
    stack.wait_for("Ctrl-C stops the generator and the broker")
    assert port_is_open(port)
    commands = [line.strip() for line in stack.lines if "kafka_processor.py" in line or "monitor_aggr" in line]
    assert len(commands) == 2, stack.output()
    for command in commands:  # a Python that has the packages, and the port: they work as written
        assert command.startswith(shlex.quote(sys.executable)) or command.startswith(".")
        assert command.endswith(f"--bootstrap-servers localhost:{port}")

    processor_command, monitor_command = commands
    log_path = tmp_path / "terminal-2.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        processor = subprocess.Popen(
            shlex.split(processor_command), cwd=tmp_path, env=user_env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while "published window" not in log_path.read_text():
                assert processor.poll() is None, log_path.read_text()
                assert time.monotonic() - started < 20, f"no window within 20s:\n{log_path.read_text()}"
                time.sleep(0.1)
            print(f"first published window {time.monotonic() - started:.1f}s after starting the processor")
            shown = subprocess.run(
                [*shlex.split(monitor_command), "--from-beginning", "--exit-after", "1"],
                cwd=tmp_path,
                env=user_env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert shown.returncode == 0, shown.stderr
            assert " → " in shown.stdout and "logins" in shown.stdout
        finally:
            processor.send_signal(signal.SIGTERM)
            processor.wait(30)

    assert stack.interrupt() == 0, stack.output()
    assert "stopping the generator and the broker" in stack.output()
    assert "processor" not in stack.output().split("stopping")[-1]  # it never started one
    assert not port_is_open(port)


def test_reuses_a_broker_already_listening_and_names_it(broker, topics, start_stack):
    env = user_env(KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, INPUT_TOPIC=topics.input)
    stack = start_stack("--broker-only", env=env)
    reuse = stack.wait_for("broker:")
    assert f"reusing the broker already listening on {broker.bootstrap_servers}" in reuse
    assert f"writes into its topic {topics.input}" in reuse and "Ctrl-C leaves it running" in reuse
    choose = stack.wait_for("choose a free port")
    suggested = choose.rsplit("--bootstrap-servers ", 1)[1].split()[0]
    assert suggested.startswith("127.0.0.1:") and suggested != broker.bootstrap_servers
    stack.wait_for("Ctrl-C stops the generator (not the broker at")
    assert f"--bootstrap-servers {broker.bootstrap_servers}" in stack.output()
    assert stack.interrupt() == 0, stack.output()
    assert f"stopping the generator (not the broker at {broker.bootstrap_servers}" in stack.output()
    assert port_is_open(broker.port)  # not ours: still there
    assert len(read_topic(broker.bootstrap_servers, topics.input)) >= 2400  # the backlog went into it


def test_suggests_the_make_command_when_make_started_it(broker, topics, start_stack):
    env = user_env(KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, INPUT_TOPIC=topics.input, MAKELEVEL="1")
    stack = start_stack("--broker-only", env=env)
    choose = stack.wait_for("choose a free port")
    assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in choose and choose.endswith(" make broker")
    assert stack.interrupt() == 0


def test_refuses_a_port_where_something_else_listens(tmp_path):
    with socket.socket() as listener:  # accepts connections, never speaks Kafka
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"localhost:{listener.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, str(ROOT / "local_stack.py"), "--bootstrap-servers", address, "--log-dir", str(tmp_path)],
            env=user_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"something listens on {address} but does not answer as a Kafka broker" in result.stderr
    assert "choose a free port" in result.stderr
    assert "broker:" not in result.stdout and "generator:" not in result.stdout


@pytest.mark.parametrize(
    ("bootstrap", "problem"),
    [
        ("kafka.example.com:9092", "starts its broker on this machine"),
        ("localhost:29093,localhost:29094", "runs one broker"),
        ("localhost", "needs a port"),
    ],
)
def test_a_bootstrap_it_cannot_serve_exits_2_in_one_line(bootstrap, problem, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "local_stack.py"), "--log-dir", str(tmp_path)],
        env=user_env(KAFKA_BOOTSTRAP_SERVERS=bootstrap),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    assert problem in result.stderr and result.stdout == ""
