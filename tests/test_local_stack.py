"""local_stack.py as a user runs it: its port setting, reusing a broker already
listening (and saying so), the commands it prints for the three-terminal flow, the
first window of that flow within seconds, and processors dying under it (the others
carry on, the stack says so, in plain lines and on the dashboard in a real terminal).
Real processes, real brokers, never 29092; the pure parts are tested on their own."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.embedded_broker import free_port, port_is_open
from local_stack import MergerWatch, describe_exit, new_run_folder
from testkit.processes import ROOT, read_topic, require_tool, wait_until

# The output topic the stack's processors write (its default).
OUTPUT = "device-login-aggregates"
TEXT = {"capture_output": True, "text": True, "check": True}


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


@pytest.mark.broker
def test_starts_its_own_broker_on_the_port_it_is_given_and_the_printed_flow_works(start_stack, tmp_path):
    """Item 4 of issue 12: the three-terminal flow, as printed by `make broker`, shows its
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


@pytest.mark.broker
def test_the_live_stream_carries_on_where_the_backlog_ends(start_stack):
    """The backlog and the live generator are two processes; the live one used to stamp
    its first event when it had started (1-3 s after the backlog's last), so the stream
    had a hole: a window with fewer logins, and with 2 s windows none at all (the
    failover test below once lost a window that way)."""
    port = free_port()
    stack = start_stack("--broker-only", env=user_env(KAFKA_BOOTSTRAP_SERVERS=f"localhost:{port}"))
    stack.wait_for("Ctrl-C stops the generator and the broker")
    time.sleep(4)  # a few seconds of live events after the backlog
    seconds = set()
    for message in read_topic(f"127.0.0.1:{port}", "user-login"):
        try:
            seconds.add(int(json.loads(message.value())["timestamp"]))
        except (ValueError, KeyError, TypeError):
            continue  # the generator's deliberately malformed records
    assert stack.interrupt() == 0, stack.output()
    assert max(seconds) - min(seconds) >= 122, "the backlog and some live seconds"
    holes = sorted(set(range(min(seconds), max(seconds) + 1)) - seconds)
    assert holes == [], f"seconds with no event: {holes}"


@pytest.mark.broker
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


@pytest.mark.broker
@pytest.mark.slow
def test_beside_a_running_broker_and_its_generator_it_starts_no_second_generator(start_stack):
    """Issue 27: `make run` beside a running `make broker` reused the broker and said so,
    but started a second generator (and a second backlog): the windows held twice the
    logins (1,197 instead of about 599). It now reads the stream that is already there,
    and says so: each login counted once."""
    port = free_port()
    env = user_env(
        KAFKA_BOOTSTRAP_SERVERS=f"localhost:{port}",
        KAFKA_SESSION_TIMEOUT_MS="6000",
        WINDOW_SECONDS="2",
        ALLOWED_LATENESS_SECONDS="1",
    )
    broker = start_stack("--broker-only", env=env)  # make broker, in one terminal
    broker.wait_for("Ctrl-C stops the generator and the broker")
    run = start_stack("--plain", env=env)  # make run, in another
    assert "reusing the broker already listening" in run.wait_for("broker:")
    said = run.wait_for("generator:")
    assert f"none started: records already stream into user-login on localhost:{port}" in said, said
    stops = run.wait_for("Ctrl-C stops")
    assert "generator" not in stops and "processor" in stops, stops
    assert not any("data_generator.py" in _cmdline(pid) for pid in _children(run.process.pid))

    # 20 events a second (--rate) is 40 per 2 s window, a few of them invalid: never 80.
    def windows() -> list[int]:
        return [int(line.split("logins ")[1].split()[0].replace(",", "")) for line in run.lines if " → " in line]

    logins = wait_until(lambda: len(shown := windows()) >= 20 and shown, 90, message="20 windows from the monitor")
    print(f"logins per window: {logins}")
    assert max(logins) <= 40 and sorted(logins)[len(logins) // 2] >= 30, logins
    assert run.interrupt() == 0, run.output()
    assert broker.interrupt() == 0, broker.output()


@pytest.mark.broker
def test_suggests_the_make_command_when_make_started_it(broker, topics, start_stack):
    env = user_env(KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, INPUT_TOPIC=topics.input, MAKELEVEL="1")
    stack = start_stack("--broker-only", env=env)
    choose = stack.wait_for("choose a free port")
    assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in choose and choose.endswith(" make broker")
    assert stack.interrupt() == 0


@pytest.mark.broker
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


@pytest.mark.broker
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


# ---- the pure parts ---------------------------------------------------------------------


def test_an_ending_is_said_the_way_people_say_it():
    assert describe_exit(-signal.SIGKILL) == "SIGKILL"
    assert describe_exit(3) == "exit status 3: it never reached the broker"
    assert describe_exit(1).startswith("exit status 1: a crash")
    assert describe_exit(7) == "exit status 7"


def test_the_merger_is_followed_in_each_processors_own_log(tmp_path):
    logs = {name: tmp_path / f"{name}.log" for name in ("processor-1", "processor-2")}
    for path in logs.values():
        path.write_bytes(b"")
    watch = MergerWatch(logs)
    assert watch.changes() == []
    with open(logs["processor-2"], "ab") as log:
        log.write(b"... INFO    processor-2[11] merger: this processor is now the merger (windows up to")
        assert watch.changes() == []  # half a line: not yet
        log.write(b" none already published)\n")
    assert watch.changes() == [("processor-2", True)]
    with open(logs["processor-2"], "ab") as log:
        log.write(b"... INFO    processor-2[11] merger: no longer the merger (session lost)\n")
    with open(logs["processor-1"], "ab") as log:
        log.write(b"... INFO    processor-1[10] merger: this processor is now the merger (windows up to none)\n")
    assert sorted(watch.changes()) == [("processor-1", True), ("processor-2", False)]
    assert watch.changes() == []  # each line once


def test_each_run_logs_into_a_fresh_folder_and_old_runs_go(tmp_path):
    """Issue 18, item 5: `.local-stack/` kept earlier runs' logs in the same files, so
    `grep 'now the merger'` found a stale line. Each run now has a folder of its own."""
    (tmp_path / "processor-3.log").write_text("this processor is now the merger\n")  # as older stacks left it
    (tmp_path / "notes.txt").write_text("mine\n")
    for n in range(12):
        (tmp_path / f"2026-01-01T00-00-{n:02d}").mkdir()
    run = new_run_folder(tmp_path)
    assert run.parent == tmp_path and list(run.iterdir()) == []
    assert (tmp_path / "latest").resolve() == run.resolve()
    assert not (tmp_path / "processor-3.log").exists() and (tmp_path / "notes.txt").exists()
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert len(runs) == 10 and runs[-1] == run.name and "2026-01-01T00-00-00" not in runs
    again = new_run_folder(tmp_path)
    assert again != run and (tmp_path / "latest").resolve() == again.resolve()


# ---- processors dying under a running stack -----------------------------------------------


def _line_after(stack: Stack, start: int, text: str, timeout: float) -> tuple[int, str]:
    """The first line from index `start` on that contains `text`, and its index."""
    deadline = time.monotonic() + timeout
    while True:
        for index in range(start, len(stack.lines)):
            if text in stack.lines[index]:
                return index, stack.lines[index]
        assert stack.process.poll() is None, f"stack exited:\n{stack.output()}"
        assert time.monotonic() < deadline, f"no {text!r} from the stack:\n{stack.output()}"
        time.sleep(0.1)


def _window_starts(bootstrap: str) -> list[int]:
    return sorted(int(iso_seconds(json.loads(m.value())["window_start"])) for m in read_topic(bootstrap, OUTPUT))


def iso_seconds(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@pytest.mark.broker
@pytest.mark.slow
def test_three_processors_a_processor_and_then_the_merger_killed_the_windows_keep_coming(start_stack, tmp_path):
    """Issue 18, item 1: with `--processors 3`, `kill -9` of one processor stopped the whole
    stack within seconds. Now the others carry on and the stack says who died and who
    merges; the windows keep coming, none missing, after the merger itself is killed."""
    port = free_port()
    env = user_env(
        KAFKA_BOOTSTRAP_SERVERS=f"localhost:{port}",
        KAFKA_SESSION_TIMEOUT_MS="6000",
        WINDOW_SECONDS="2",
        ALLOWED_LATENESS_SECONDS="1",
    )
    stack = start_stack("--processors", "3", env=env)
    pids = {}
    for n in (1, 2, 3):
        line = stack.wait_for(f"processor-{n}: pid ")
        pids[f"processor-{n}"] = int(line.split("pid ")[1].split()[0])
    index, line = _line_after(stack, 0, " is now the merger", 60)
    merger = line.split(" is now the merger")[0]
    bystander = next(name for name in pids if name != merger)
    run_logs = tmp_path / "logs" / "latest"
    assert "this processor is now the merger" in (run_logs / f"{merger}.log").read_text()

    os.kill(pids[bystander], signal.SIGKILL)
    index, line = _line_after(stack, index, f"{bystander} died", 10)
    assert line == f"{bystander} died (SIGKILL); 2 of 3 running; {merger} merges"
    os.kill(pids[merger], signal.SIGKILL)
    merger_killed = time.time()
    index, line = _line_after(stack, index, f"{merger} died", 10)
    assert line == f"{merger} died (SIGKILL); 1 of 3 running; no processor merges yet"
    index, line = _line_after(stack, index, " is now the merger", 40)
    survivor = next(name for name in pids if name not in (merger, bystander))
    assert line == f"{survivor} is now the merger; 1 of 3 running"
    print(f"new merger {time.time() - merger_killed:.1f}s after the merger was killed")

    def newest_window() -> int:
        starts = _window_starts(stack_bootstrap)
        return starts[-1] if starts else 0

    stack_bootstrap = f"127.0.0.1:{port}"
    wait_until(lambda: newest_window() > merger_killed + 2, 30, message="windows after the merger was killed")
    starts = [start for start in _window_starts(stack_bootstrap) if start >= merger_killed - 10]
    assert starts == list(range(starts[0], starts[-1] + 2, 2)), "a window is missing"
    assert stack.process.poll() is None, "the stack must carry on"

    assert stack.interrupt() == 0, stack.output()
    assert f"stopping {survivor}, the generator, the monitor and the broker" in stack.output()
    assert "stopped; this run's logs are in" in stack.output()
    assert not port_is_open(port)


@pytest.mark.broker
def test_a_dead_part_is_started_again_after_the_pause_given(start_stack):
    """--restart-after: what pressing r does in a terminal, without one (here the
    generator of `--broker-only`, the cheapest part to kill and watch come back)."""
    port = free_port()
    stack = start_stack(
        "--broker-only", "--restart-after", "1", env=user_env(KAFKA_BOOTSTRAP_SERVERS=f"localhost:{port}")
    )
    stack.wait_for("Ctrl-C stops the generator and the broker")
    [generator] = [p for p in _children(stack.process.pid) if "data_generator.py" in _cmdline(p)]
    os.kill(generator, signal.SIGKILL)
    assert stack.wait_for("generator died") == "the generator died (SIGKILL)"
    assert "starts again 1s after it ended" in stack.wait_for("its log:")
    restarted = stack.wait_for("the generator started again", timeout=10)
    new_pid = int(restarted.split("pid ")[1].rstrip(")"))
    assert new_pid != generator and "data_generator.py" in _cmdline(new_pid)
    assert stack.interrupt() == 0, stack.output()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """Every process under `pid` (Linux /proc), children first."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop(0)
        kids = [child for child, of in parents.items() if of == parent]
        found += kids
        frontier += kids
    return found


def _merger_in_logs(log_dir: Path) -> str | None:
    """The processor whose log says it became the merger (its log file's name)."""
    for path in log_dir.rglob("processor-*.log"):
        if "this processor is now the merger" in path.read_text(errors="replace"):
            return path.stem
    return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


@pytest.mark.broker
@pytest.mark.slow
def test_the_dashboard_shows_its_keys_says_who_died_without_tearing_and_r_starts_them_again(tmp_path):
    """Issue 18, items 1, 5, 6 and 9 in a real terminal: 3 processors in a 50-row pane with
    more text above than fits, as `PROCESSORS=3 make run` left it. Two processors killed,
    the dashboard shows it under its one header (the stack used to print over the
    dashboard: a stale header stayed above the live one), r starts them again, and after
    Ctrl-C the terminal shows what happened and what was stopped.
    Issue 27: the keys (r, Ctrl-C) showed only once something had died, and the event
    line after r named one of the two processors it had started again."""
    require_tool("tmux", "tmux")
    port = free_port()
    settings = {"KAFKA_BOOTSTRAP_SERVERS": f"localhost:{port}", "KAFKA_SESSION_TIMEOUT_MS": "6000"}
    session = f"stack-{uuid.uuid4().hex[:8]}"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    run = f"env -u COLUMNS -u LINES {env} {sys.executable} {ROOT / 'local_stack.py'} --processors 3"
    command = f"cd {shlex.quote(str(tmp_path))} && seq 1 12 && {run} --log-dir logs; echo exit status $?"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50"], check=True)

    def screen(history: bool = False) -> str:
        capture = ["tmux", "capture-pane", "-p", "-t", session, *(["-S", "-"] if history else [])]
        return subprocess.run(capture, capture_output=True, text=True, check=True).stdout

    try:
        subprocess.run(["tmux", "set-option", "-t", session, "remain-on-exit", "on"], check=True)
        subprocess.run(["tmux", "respawn-pane", "-k", "-t", session, command], check=True)
        pane = int(subprocess.run(["tmux", "display", "-p", "-t", session, "#{pane_pid}"], **TEXT).stdout)
        wait_until(lambda: "windows | last one" in screen(), 60, message="the dashboard")
        processors = {}
        for pid in _children(pane):
            if "kafka_processor.py" in _cmdline(pid):
                processors[_environ(pid).get("PROCESSOR_NAME", str(pid))] = pid
        assert len(processors) == 3
        merges = wait_until(lambda: _merger_in_logs(tmp_path / "logs"), 30, message="the merger's log line")
        first, second = (name for name in sorted(processors) if name != merges)
        keys = "press r to start a part that died again; Ctrl-C stops everything"
        assert screen().splitlines()[2] == keys  # before anything died: how to use r when it does

        os.kill(processors[first], signal.SIGKILL)
        os.kill(processors[second], signal.SIGKILL)
        time.sleep(2)  # the stack sees it within a second; then a few redraws
        everything = screen(history=True)
        print(everything)
        assert everything.count("windows | last one") == 1, "a stale header above the live one"
        shown = wait_until(lambda: (text := screen()) and f"{second} died" in text and text, 10, message="the deaths")
        lines = shown.splitlines()
        assert "windows | last one" in lines[0]
        died = (
            rf"{first} died \(SIGKILL\) \d+s ago, {second} died \(SIGKILL\) \d+s ago; 1 of 3 running; {merges} merges"
        )
        assert re.match(died, lines[1]), lines[1]
        assert lines[2] == f"press r to start {first} and {second} again; Ctrl-C stops everything"

        subprocess.run(["tmux", "send-keys", "-t", session, "r"], check=True)
        again = wait_until(lambda: re.search(r"3 of 3 processors running \((.*?)\)", screen()), 10, message="r")
        pids = [re.search(rf"{name} pid (\d+)", again.group(1)) for name in (first, second)]
        assert all(pids), again.group(1)
        assert all(int(pid.group(1)) != processors[name] for pid, name in zip(pids, (first, second), strict=True))
        new_pids = ", ".join(pid.group(1) for pid in pids)
        event = f"{first} and {second} started again (pids {new_pids}); 3 of 3 running"
        shown = screen().splitlines()
        assert shown[2] == keys and event in shown[3], "\n".join(shown[:4])  # both named in the one event

        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_until(lambda: "exit status" in screen(), 40, message="the stack to stop")
        after = screen(history=True)
        print(after)
        assert "exit status 0" in after
        assert re.search(rf"\d\d:\d\d:\d\d {first} died \(SIGKILL\); 2 of 3 running", after)
        assert re.search(rf"\d\d:\d\d:\d\d {second} died \(SIGKILL\); 1 of 3 running", after)
        assert event in after
        stopping = "stopping processor-1, processor-2, processor-3, the generator, the monitor and the broker"
        assert stopping in after and "stopped; this run's logs are in logs/" in after
        assert not port_is_open(port)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
