"""monitor_aggregated_data: rendering (pure), plain lines off a terminal, and the live
dashboard driven in a real terminal (tmux) against a real broker."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console

from monitor_aggregated_data import RecentLogLines, headline, render_dashboard, sparkline, window_length
from testkit.processes import ROOT, published_backlog, require_tool, run_script, wait_until

WINDOW = {
    "schema_version": 1,
    "window_start": "2026-11-25T19:00:00Z",
    "window_end": "2026-11-25T19:00:30Z",
    "message_count": 1234,
    "device_counts": {"android": 700, "iOS": 500, "unknown": 34},
    "locale_counts": {"TX": 100, "RU": 90, "unknown": 2},
    "unique_device_count": 1190,
    "app_version_by_device": {"android": {"2.3.0": 650}, "iOS": {"2.3.0": 500}, "unknown": {"2.3.0": 34}},
    "unique_ip_count": 1100,
    "top_ips": [{"ip": "199.172.111.135", "count": 12}],
    "missing_field_counts": {"device_type": 34, "locale": 2},
    "invalid_message_count": 1,
    "late_message_count": 0,
}


def rendered(renderable) -> str:
    with open(os.devnull, "w") as sink:
        console = Console(width=140, record=True, color_system=None, file=sink)
        console.print(renderable)
        return console.export_text()


def test_sparkline_scales_between_smallest_and_largest():
    assert sparkline([1, 8]) == "▁█"
    assert sparkline([0, 0, 0]) == "▁▁▁"
    assert len(sparkline(list(range(20)))) == 20
    assert sparkline([]) == ""


def test_headline_is_one_plain_line():
    line = headline(WINDOW)
    assert "\n" not in line
    assert line.startswith("2026-11-25T19:00:00Z → 2026-11-25T19:00:30Z")
    assert "logins 1,234" in line and "missing fields: device_type 34, locale 2" in line
    assert "≥" not in line


def test_headline_marks_capped_unique_counts_as_lower_bounds():
    line = headline(dict(WINDOW, capped_counts=["top_ips", "unique_ip_count"]))
    assert f"unique IPs ≥{WINDOW['unique_ip_count']:,}" in line
    assert f"unique devices {WINDOW['unique_device_count']:,}" in line


def test_dashboard_shows_latest_window_trends_and_age():
    history = [dict(WINDOW, message_count=n, window_start=f"2026-11-25T19:0{i}:00Z") for i, n in enumerate([5, 9, 7])]
    text = rendered(render_dashboard(history, 4.0, "out on broker:1"))
    assert "3 windows | last one 4s ago" in text
    assert "latest window 2026-11-25T19:02:00Z" in text
    assert "▁█▅" in text  # logins 5, 9, 7
    assert "android" in text and "199.172.111.135" in text and "TX" in text


def test_dashboard_fits_a_standard_terminal_most_important_first():
    history = [dict(WINDOW, window_start=f"2026-11-25T19:{i:02d}:00Z") for i in range(30)]
    text = rendered(render_dashboard(history, 4.0, "out on broker:1", size=(80, 24)))
    lines = text.splitlines()
    assert "last one 4s ago" in lines[0]
    assert any("trend, last 20 windows" in line for line in lines[:4])
    assert max(len(line) for line in lines) <= 80


def test_dashboard_says_so_when_windows_stop_coming():
    text = rendered(render_dashboard([WINDOW], 300.0, "out on broker:1", window_seconds=30))
    assert "no new window" in text
    assert "waiting for the first window" in rendered(render_dashboard([], None, "out on broker:1"))


def test_the_dashboard_keeps_the_lines_of_the_trouble_while_it_lasts():
    recent = RecentLogLines()
    log = logging.getLogger("kafka")
    for level, text in [(logging.INFO, "noise"), (logging.WARNING, "gone"), (logging.INFO, "back")]:
        recent.handle(log.makeRecord("kafka", level, __file__, 1, text, (), None))
    shown = [note.plain for note in recent.notes()]
    assert [line.split(" ", 1)[1] for line in shown] == ["kafka: gone", "kafka: back"]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in shown)  # when each was said
    recent.SHOWN_SECONDS = 0.0  # a minute later
    assert recent.notes() == []
    assert [note.plain for note in recent.notes(hold=True)] == shown  # the broker is still away


def test_help_lists_only_what_the_monitor_reads(tmp_path):
    result = run_script("monitor_aggregated_data.py", "--help", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for flag in ("--json", "--from-beginning", "--exit-after", "--idle-timeout", "--bootstrap-servers"):
        assert flag in text
    for flag in ("--output-topic", "--log-level", "--log-format", "--env-file"):
        assert flag in text
    for processor_only in ("--window-seconds", "--metrics-port", "--input-topic", "--consumer-group-id", "--top-ips"):
        assert processor_only not in text
    assert "(default: localhost:29092; env KAFKA_BOOTSTRAP_SERVERS)" in text
    assert "KAFKA_SECURITY_PROTOCOL=SASL_SSL -> security.protocol" in text


def test_window_length_comes_from_the_window_not_a_setting():
    assert window_length(WINDOW) == 30
    assert window_length(dict(WINDOW, window_end="2026-11-25T19:05:00Z")) == 300
    assert window_length({"window_start": "soon"}) is None


@pytest.mark.broker
def test_plain_lines_when_not_on_a_terminal(topics, start_processor, tmp_path):
    topics.create()
    _, expected, _ = published_backlog(topics, start_processor, 90, 600, seed=4)
    result = run_script(
        "monitor_aggregated_data.py",
        "--from-beginning",
        "--exit-after",
        str(len(expected)),
        env=topics.env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(" → ")[0] for line in lines] == sorted(expected)
    assert all("logins" in line for line in lines)
    assert not any("\x1b[" in line for line in lines)  # no terminal escapes in a pipe


@pytest.mark.broker
def test_live_dashboard_in_a_real_terminal(topics, start_processor, tmp_path):
    require_tool("tmux", "tmux")
    topics.create()
    _, expected, _ = published_backlog(topics, start_processor, 120, 1200, seed=6)

    session = f"monitor-{uuid.uuid4().hex[:8]}"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in topics.env().items())
    script = ROOT / "monitor_aggregated_data.py"
    # -u: the tmux server inherits COLUMNS/LINES from whoever started it; the pane's size must win.
    run = f"env -u COLUMNS -u LINES {env} {sys.executable} {script} --from-beginning"
    command = f"cd {shlex.quote(str(tmp_path))} && {run}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "70", command], check=True)
    try:
        newest = max(expected)

        def screen() -> str:
            capture = ["tmux", "capture-pane", "-p", "-t", session]
            return subprocess.run(capture, capture_output=True, text=True, check=True).stdout

        shown = wait_until(
            lambda: (text := screen()) and f"latest window {newest}" in text and text, 30, message="the dashboard"
        )
        print(shown)
        assert f"{len(expected)} windows | last one" in shown
        assert f"trend, last {len(expected)} windows" in shown
        assert "by device type" in shown and "top locales" in shown and "top IPs" in shown
        assert any(block in shown for block in "▁▂▃▄▅▆▇█")
        assert f"{expected[newest]['message_count']:,}" in shown
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_until(
            lambda: subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0,
            15,
            message="the monitor to exit on Ctrl-C",
        )
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def _window_at(minute: int) -> dict:
    start = f"2026-11-25T19:{minute:02d}:00Z"
    return dict(WINDOW, window_start=start, window_end=f"2026-11-25T19:{minute:02d}:30Z", message_count=100 + minute)


def _publish_windows(bootstrap: str, topic: str, minutes: list[int]) -> None:
    """Windows as the processor publishes them: key the window start, value its JSON;
    all of them in one produce batch (one flush, linger long enough to gather them)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 200, "log_level": 2})
    for minute in minutes:
        window = _window_at(minute)
        producer.produce(topic, key=window["window_start"].encode(), value=json.dumps(window).encode())
    assert producer.flush(30) == 0


def _start_monitor(*args: str, env: dict[str, str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "monitor_aggregated_data.py"), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.broker
def test_starts_at_the_newest_window_after_several_were_published_in_one_batch(topics, tmp_path):
    """Issue 18, item 4: the processor publishes catch-up windows in one batch, and the
    embedded broker lists that batch's base offset + 1 as the partition's end: a monitor
    that started at "listed end - 1" showed the batch's first window, not the newest."""
    topics.create()
    _publish_windows(topics.bootstrap, topics.output, [0, 1])
    _publish_windows(topics.bootstrap, topics.output, [2, 3, 4, 5])
    result = run_script(
        "monitor_aggregated_data.py", "--json", "--exit-after", "1", env=topics.env(), cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert json.loads(line)["window_start"] == _window_at(5)["window_start"]


@pytest.mark.broker
def test_a_closed_pipe_ends_the_monitor_quietly(topics, tmp_path):
    """Issue 18, item 3: `monitor_aggregated_data.py --json | head -3` ended in a
    BrokenPipeError traceback. A reader that goes away is a normal end, as for `cat`."""
    topics.create()
    _publish_windows(topics.bootstrap, topics.output, [0, 1, 2])
    monitor = _start_monitor("--json", "--from-beginning", env=topics.env(), cwd=tmp_path)
    try:
        for _ in range(3):  # what `head -3` reads before it exits
            assert json.loads(monitor.stdout.readline())["window_start"]
        monitor.stdout.close()
        _publish_windows(topics.bootstrap, topics.output, [3])  # the next window meets the closed pipe
        code = monitor.wait(30)
        errors = monitor.stderr.read()
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
    assert code == 0 and errors == "", errors


def _pipe_into_head(*args: str, env: dict[str, str], cwd) -> subprocess.Popen:
    """`monitor_aggregated_data.py ARGS | head -3` as a shell runs it: the shell returns
    when both have ended, with the monitor's status (pipefail)."""
    monitor = shlex.join([sys.executable, str(ROOT / "monitor_aggregated_data.py"), *args])
    return subprocess.Popen(
        ["bash", "-o", "pipefail", "-c", f"{monitor} | head -3"],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a failed test ends the monitor too
    )


@pytest.mark.broker
@pytest.mark.parametrize("from_beginning", [True, False], ids=["from-beginning", "live"])
def test_head_returns_the_prompt_as_soon_as_it_has_its_lines(topics, tmp_path, from_beginning):
    """Issue 27: `--json | head -3` returned the prompt only when the next window came,
    about 30 s after the third line (`--from-beginning | head -3`: 26 s), because the
    monitor noticed the closed pipe only at its next write. It now watches its reader
    and ends as soon as `head` exits, with no window coming after."""
    topics.create()
    # Exactly what head reads: no later write can meet the closed pipe (the issue saw the
    # same with more windows on the topic, all written before head had exited).
    _publish_windows(topics.bootstrap, topics.output, [0, 1, 2] if from_beginning else [0])
    args = ("--json", "--from-beginning") if from_beginning else ("--json",)
    pipeline = _pipe_into_head(*args, env=topics.env(), cwd=tmp_path)
    try:
        if not from_beginning:  # the newest window at once, then two more as they come
            time.sleep(3)
            _publish_windows(topics.bootstrap, topics.output, [1])
            _publish_windows(topics.bootstrap, topics.output, [2])
        lines = [pipeline.stdout.readline() for _ in range(3)]
        head_done = time.monotonic()  # head has printed its three lines and exits
        code = pipeline.wait(20)
        took = time.monotonic() - head_done
        errors = pipeline.stderr.read()
    finally:
        if pipeline.poll() is None:
            os.killpg(pipeline.pid, signal.SIGKILL)
            pipeline.wait()
    print(f"prompt back {took:.1f}s after the third line")
    assert [json.loads(line)["window_start"] for line in lines] == [_window_at(m)["window_start"] for m in (0, 1, 2)]
    assert code == 0 and errors == "", errors
    assert took < 3, f"the prompt came back {took:.1f}s after head's last line"


@pytest.mark.broker
def test_keeps_retrying_an_unreachable_broker_and_never_prints_a_raw_error(tmp_path):
    """Issue 18, item 2: the monitor said "retrying until it is back", then gave up after
    10 s with a raw `KafkaError{...}` and status 1. Now it waits for the broker like the
    processor does: a name that does not resolve until Ctrl-C (status 3: it never reached
    a broker), a port with no broker yet until one starts there (then it shows windows)."""
    from broker.embedded_broker import EmbeddedBroker, free_port

    port = free_port()
    later = dict(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", OUTPUT_TOPIC="out-later", PATH="/usr/bin:/bin")
    waiting = _start_monitor("--json", "--exit-after", "1", env=later, cwd=tmp_path)
    nowhere = _start_monitor("--bootstrap-servers", "nohost:9092", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    try:
        time.sleep(12)  # past the 10 s metadata timeout that used to end it
        assert waiting.poll() is None and nowhere.poll() is None, "the monitor must keep retrying"
        nowhere.send_signal(signal.SIGINT)
        assert nowhere.wait(15) == 3
        nowhere_errors = nowhere.stderr.read()
        assert "nohost:9092 unreachable" in nowhere_errors and "retrying until it is back" in nowhere_errors
        assert "never reached the broker" in nowhere_errors
        assert "KafkaError{" not in nowhere_errors and "Traceback" not in nowhere_errors, nowhere_errors

        with EmbeddedBroker(port=port, log_path=tmp_path / "late-broker.log") as late:
            admin = AdminClient({"bootstrap.servers": late.bootstrap_servers})
            admin.create_topics([NewTopic("out-later", 1, 1)])["out-later"].result(10)
            _publish_windows(late.bootstrap_servers, "out-later", [7])
            assert waiting.wait(30) == 0
            output, errors = waiting.stdout.read(), waiting.stderr.read()
        assert json.loads(output)["window_start"] == _window_at(7)["window_start"]
        assert errors.count("reachable again") == 1 and "KafkaError{" not in errors, errors
        assert errors.count("unreachable") == 1, errors  # nothing stale from the wait afterwards
    finally:
        for monitor in (waiting, nowhere):
            if monitor.poll() is None:
                monitor.kill()
                monitor.wait()


@pytest.mark.broker
def test_the_dashboard_shows_when_broker_trouble_began_and_when_it_ended(tmp_path):
    """Issue 27: a monitor started before the broker said "unreachable" and "reachable
    again" on the terminal before the dashboard covered them, then, from errors
    librdkafka had queued during the wait, "unreachable" and "reachable again" once
    more; the dashboard showed only the last line. It now shows the one line said when
    the trouble began and the one said when it ended, and nothing stale after them."""
    from broker.embedded_broker import EmbeddedBroker, free_port

    require_tool("tmux", "tmux")
    port = free_port()
    session = f"monitor-{uuid.uuid4().hex[:8]}"
    settings = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "OUTPUT_TOPIC": "out-later", "PATH": "/usr/bin:/bin"}
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    script = ROOT / "monitor_aggregated_data.py"
    run = f"env -u COLUMNS -u LINES {env} {sys.executable} {script} --from-beginning"
    command = f"cd {shlex.quote(str(tmp_path))} && {run}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", command], check=True)

    def screen() -> str:
        capture = ["tmux", "capture-pane", "-p", "-J", "-t", session]
        return subprocess.run(capture, capture_output=True, text=True, check=True).stdout

    try:
        wait_until(lambda: "unreachable" in screen(), 20, message="the monitor to say the broker is not there")
        with EmbeddedBroker(port=port, log_path=tmp_path / "late-broker.log") as late:
            time.sleep(3)  # the broker up, the topic not yet: the monitor waits for it
            admin = AdminClient({"bootstrap.servers": late.bootstrap_servers, "log_level": 2})
            admin.create_topics([NewTopic("out-later", 1, 1)])["out-later"].result(10)
            time.sleep(3)
            _publish_windows(late.bootstrap_servers, "out-later", [7])
            shown = wait_until(
                lambda: (text := screen()) and "latest window" in text and text, 30, message="the dashboard"
            )
            time.sleep(2)  # a few redraws: anything stale would be said by now
            shown = screen()
            print(shown)
        lines = shown.splitlines()
        gone = [n for n, line in enumerate(lines) if f"127.0.0.1:{port} unreachable" in line]
        back = [n for n, line in enumerate(lines) if f"127.0.0.1:{port} reachable again after" in line]
        assert len(gone) == 1 and len(back) == 1, shown
        assert gone[0] < back[0] < next(n for n, line in enumerate(lines) if "latest window" in line), shown
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.broker
def test_says_the_broker_is_back_when_it_is_not_at_the_next_window(tmp_path):
    """The broker gone while the monitor runs, and back: "reachable again" came only
    with the next window, up to a window's length later (so a dashboard holding the
    "unreachable" line while the trouble lasts would have held it that long)."""
    from broker.embedded_broker import EmbeddedBroker, free_port

    port = free_port()
    env = dict(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", OUTPUT_TOPIC="out-blip", PATH="/usr/bin:/bin")
    errors_path = tmp_path / "monitor.err"

    def serve() -> EmbeddedBroker:  # the embedded broker keeps nothing: the topic again
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log").start()
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers, "log_level": 2})
        admin.create_topics([NewTopic("out-blip", 1, 1)])["out-blip"].result(10)
        return broker

    broker = serve()
    with open(errors_path, "w") as errors:
        monitor = subprocess.Popen(
            [sys.executable, str(ROOT / "monitor_aggregated_data.py"), "--json", "--from-beginning"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    try:
        _publish_windows(broker.bootstrap_servers, "out-blip", [1])
        assert json.loads(monitor.stdout.readline())["window_start"] == _window_at(1)["window_start"]
        broker.stop()
        wait_until(lambda: "unreachable" in errors_path.read_text(), 20, message="the monitor to say it is gone")
        broker = serve()
        back = time.monotonic()
        wait_until(lambda: "reachable again" in errors_path.read_text(), 10, message="'reachable again', no window")
        print(f"'reachable again' {time.monotonic() - back:.1f}s after the broker was back")
        said = errors_path.read_text()
        assert said.count("unreachable") == 1 and said.count("reachable again") == 1, said
    finally:
        broker.stop()
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
