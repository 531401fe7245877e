"""Tail `device-login-aggregates` and show each window the way an operator reads it.

On a terminal: a live dashboard that redraws as windows arrive: the latest
window's headline figures with trend lines (sparklines) over the last windows,
its device split, top locales, top IPs and app versions as tables with bars, and
how long ago the last window came (so a stalled pipeline is obvious).
Not on a terminal (a pipe, a log file): one plain line per window. `--json`:
each window's value as one JSON object per line, for machines.

The monitor keeps the latest record per window key: a window republished after a
processor restart carries the same bytes and is not shown twice. It never joins a
consumer group's offsets (it commits nothing), so any number can watch.

A broker that is not there (yet) is waited for, like the processor does: one line
when it goes, one when it is back. A reader that goes away (`| head -3`) ends the
monitor at once (not at its next write, a window later), quietly, status 0.
Exit statuses: 0 stopped (Ctrl-C, SIGTERM, --exit-after, --idle-timeout, a closed
pipe); 1 a Kafka error it cannot retry (one plain sentence); 2 a bad setting or
refused credentials; 3 stopped before it ever reached the broker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition
from rich import box
from rich.bar import Bar
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker import authorization
from broker.authorization import (
    GROUP,
    MONITOR_GROUP_PREFIX,
    TOPIC,
    NotAuthorized,
    Permission,
    check_permissions,
    is_authorization_error,
)
from broker.kafka_io import (
    QUIET_CLIENT_LOGS,
    AuthenticationFailed,
    BrokerHealth,
    client_setting_error,
    newest_offsets,
    topic_partition_count,
)
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    exit_with_config_error,
    load_settings_or_exit,
)
from telemetry.log_setup import configure_logging

# The settings the monitor reads and lists in --help; any other keeps its default, so a
# shared `.env` with, say, METRICS_PORT cannot stop it.
MONITOR_SETTINGS = ("KAFKA_BOOTSTRAP_SERVERS", "OUTPUT_TOPIC", "LOG_LEVEL", "LOG_FORMAT")

log = logging.getLogger("monitor")

_BAR_WIDTH = 10
_ROWS = 5
# From this width the dashboard puts tables side by side.
_WIDE = 110
# How long start-up waits for one metadata answer before asking again: short, so that
# Ctrl-C is answered at once while the broker is away.
_METADATA_TIMEOUT_SECONDS = 2.0


def _share_table(title: str, name: str, counts: dict[str, int], total: int, rows: int = _ROWS) -> Table:
    """A name / count / share / bar table of the largest entries."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, expand=False)
    table.add_column(name, no_wrap=True, max_width=18)
    table.add_column("logins", justify="right")
    table.add_column("share", justify="right")
    table.add_column("", width=_BAR_WIDTH)
    items = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    for name, count in items[:rows]:
        share = count / total if total else 0.0
        table.add_row(name, f"{count:,}", f"{share:.0%}", Bar(1.0, 0, share, width=_BAR_WIDTH, color="cyan"))
    if len(items) > rows:
        rest = sum(count for _, count in items[rows:])
        table.add_row(f"({len(items) - rows} more)", f"{rest:,}", f"{rest / total:.0%}" if total else "", "")
    return table


def _top_ips_table(top_ips: list[dict], rows: int = _ROWS) -> Table:
    table = Table(title="top IPs", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("ip", no_wrap=True)
    table.add_column("logins", justify="right")
    for entry in top_ips[:rows]:
        table.add_row(entry["ip"], f"{entry['count']:,}")
    return table


def _versions_table(by_device: dict[str, dict[str, int]]) -> Table:
    table = Table(title="app versions", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("device", no_wrap=True)
    table.add_column("versions (logins)")
    for device, versions in by_device.items():
        shown = ", ".join(f"{version} ({count:,})" for version, count in list(versions.items())[:3])
        if len(versions) > 3:
            shown += f", +{len(versions) - 3}"
        table.add_row(device, shown)
    return table


def headline(window: dict) -> str:
    """The one-line summary of a window (also the plain, non-terminal output)."""
    missing = window.get("missing_field_counts") or {}
    missing_text = ", ".join(f"{name} {count}" for name, count in missing.items()) or "none"
    capped = window.get("capped_counts") or ()  # past MAX_DISTINCT_PER_WINDOW: lower bounds

    def at_least(name: str) -> str:
        return "≥" if name in capped else ""

    return (
        f"{window['window_start']} → {window['window_end']}  "
        f"logins {window['message_count']:,}  "
        f"unique devices {at_least('unique_device_count')}{window['unique_device_count']:,}  "
        f"unique IPs {at_least('unique_ip_count')}{window['unique_ip_count']:,}  "
        f"invalid {window['invalid_message_count']:,}  "
        f"late {window['late_message_count']:,}  missing fields: {missing_text}"
    )


class WindowTail:
    """Reads the output topic and yields each window value once (latest per key)."""

    def __init__(self, settings: Settings, from_beginning: bool) -> None:
        self.settings = settings
        self.from_beginning = from_beginning
        self.health = BrokerHealth(settings.bootstrap_servers)
        self.consumer = Consumer(
            {
                **QUIET_CLIENT_LOGS,
                **settings.consumer_config(),
                # A private group that never commits: watching must not disturb anything.
                "group.id": f"{MONITOR_GROUP_PREFIX}{uuid.uuid4()}",
                "enable.auto.commit": False,
                **self.health.callbacks(settings.consumer_config()),
            }
        )
        self.latest: dict[bytes, bytes] = {}

    def start(self, stop: threading.Event) -> bool:
        """Assign every partition of the output topic, waiting for the broker to answer
        and for the topic to exist. False if asked to stop first."""
        topic = self.settings.output_topic
        while not stop.is_set():
            try:
                count = topic_partition_count(self.consumer, topic, timeout=_METADATA_TIMEOUT_SECONDS)
                # First serve the errors librdkafka queued while the broker was away
                # (each failed connection attempt): left to the first consume, they said
                # "unreachable" again after "reachable again", and a second "reachable
                # again" followed with the first window.
                self.consumer.poll(0)
                if not self.health.reached:  # once: what it may read (a topic it may not see looks absent)
                    needs = authorization.monitor(self.settings, self.from_beginning)
                    check_permissions(self.settings, needs)
                self.health.mark_reachable()
                if count:
                    # Start at the newest window so there is something to show at once.
                    newest = {} if self.from_beginning else newest_offsets(self.settings, topic)
                    break
            except KafkaException as error:
                self.health.raise_if_refused(self.consumer)
                # Gone or not there yet: say so once (BrokerHealth), then ask again.
                self.health.on_error(KafkaError(KafkaError._TRANSPORT, _reason(error)))
            stop.wait(1.0)
        else:
            return False
        # An empty partition: from its end, that is from its first window.
        self.consumer.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING if self.from_beginning else newest.get(p, OFFSET_END))
                for p in range(count)
            ]
        )
        return True

    def poll(self, timeout: float) -> list[dict]:
        """New or changed windows since the last call, as parsed values, in arrival order."""
        # While the broker is said to be away, ask it now and then: the next window may
        # be a window's length away, and "reachable again" should come when it is back.
        self.health.recheck(self.consumer, self.settings.output_topic)
        fresh = []
        for message in self.consumer.consume(100, timeout):
            error = message.error()
            if is_authorization_error(error):  # an ACL taken away while it runs: not waited for
                group = Permission(GROUP, MONITOR_GROUP_PREFIX, "Describe", prefixed=True)
                read = Permission(TOPIC, self.settings.output_topic, "Read")
                missing = group if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED else read
                raise NotAuthorized([missing], self.settings)
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self.health.on_error(error)
                continue
            self.health.mark_reachable()
            key, value = message.key(), message.value()
            if value is None or self.latest.get(key) == value:
                continue
            try:
                window = json.loads(value)
            except ValueError:
                continue
            self.latest[key] = value
            fresh.append(window)
        return fresh

    def close(self) -> None:
        self.consumer.close()


def _reason(error: KafkaException) -> str:
    """A client exception as the plain sentence librdkafka wrote, not `KafkaError{...}`."""
    first = error.args[0] if error.args else None
    return first.str() if isinstance(first, KafkaError) else str(first or error)


SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
TREND_WINDOWS = 20
HEADLINES = (
    ("logins", "message_count"),
    ("unique devices", "unique_device_count"),
    ("unique IPs", "unique_ip_count"),
    ("invalid", "invalid_message_count"),
    ("late", "late_message_count"),
)


def sparkline(values: list[int]) -> str:
    """A trend in one line of block characters, scaled between the smallest and largest value."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return SPARK_BLOCKS[0 if high == 0 else 3] * len(values)
    steps = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[round((v - low) * steps / (high - low))] for v in values)


def render_dashboard(
    windows: list[dict],
    seconds_since_last: float | None,
    source: str,
    window_seconds: int = 30,
    size: tuple[int, int] = (160, 50),
    notes: Sequence[Text] = (),
):
    """The whole screen for a terminal of `size` (columns, lines), most important first:
    status line, `notes` (what the local stack or the monitor itself has to say),
    headline figures with trends, then the latest window's tables (side by side when
    the terminal is wide, with fewer rows when it is short).

    `windows` are the windows seen, oldest first (latest per key).
    """
    width, height = size
    height -= len(notes)
    if seconds_since_last is None:
        status = Text(f"{source} | waiting for the first window…", style="yellow")
    else:
        # A window should arrive every window_seconds; well past that, say so loudly.
        stalled = seconds_since_last > 2 * window_seconds + 10
        status = Text(
            f"{source} | {len(windows)} windows | last one {seconds_since_last:.0f}s ago"
            + ("  ⚠ no new window: is the processor running?" if stalled else ""),
            style="bold red" if stalled else "green",
        )
    if not windows:
        return Group(status, *notes)
    latest = windows[-1]
    recent = windows[-TREND_WINDOWS:]
    trends = Table(
        box=box.SIMPLE_HEAD,
        title=f"latest window {latest['window_start']} ({window_seconds}s)",
        title_justify="left",
        pad_edge=False,
    )
    trends.add_column("measure", no_wrap=True)
    trends.add_column("latest", justify="right")
    trends.add_column(f"trend, last {len(recent)} windows", no_wrap=True)
    for label, key in HEADLINES:
        trends.add_row(label, f"{latest[key]:,}", sparkline([w[key] for w in recent]))
    missing = latest.get("missing_field_counts") or {}
    trends.add_row(
        "missing fields",
        f"{sum(missing.values()):,}",
        sparkline([sum(w["missing_field_counts"].values()) for w in recent]),
    )
    # Rows for the locale and IP tables: what the height leaves (at least 3).
    rows = max(3, min(8, (height - 24) // 2 if width >= _WIDE else (height - 40) // 3))
    total = latest["message_count"]
    devices = _share_table("by device type", "device", latest["device_counts"], total, rows=4)
    locales = _share_table("top locales", "locale", latest["locale_counts"], total, rows=rows)
    ips = _top_ips_table(latest["top_ips"], rows=rows)
    versions = _versions_table(latest["app_version_by_device"])
    missing_line = Text("missing fields: " + (", ".join(f"{k} {v:,}" for k, v in missing.items()) or "none"))
    if width < _WIDE:
        return Group(status, *notes, trends, missing_line, devices, locales, ips, versions)
    grid = Table.grid(padding=(0, 4))
    grid.add_row(trends, devices)
    grid.add_row(locales, ips)
    return Group(status, *notes, grid, missing_line, versions)


def window_length(window: dict) -> int | None:
    """A window's length in seconds, from its own start and end (None if unreadable).

    The monitor does not read WINDOW_SECONDS: the processor's setting is what counts."""
    try:
        start, end = (
            datetime.strptime(window[k], "%Y-%m-%dT%H:%M:%SZ").timestamp() for k in ("window_start", "window_end")
        )
    except (KeyError, TypeError, ValueError):
        return None
    return int(end - start) if end > start else None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="monitor_aggregated_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per window per line (for machines)")
    parser.add_argument(
        "--from-beginning", action="store_true", help="show every window on the topic (default: from the newest)"
    )
    parser.add_argument(
        "--exit-after", type=int, default=0, metavar="N", help="stop after showing N windows (default: 0 = never)"
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=0,
        metavar="S",
        help="stop after S seconds without a window (default: 0 = never)",
    )
    parser.add_argument(
        "--status-file",
        type=Path,
        metavar="FILE",
        help="dashboard only: show the lines of FILE under the header, read again at every redraw"
        " (local_stack.py writes its processors' state there; a line starting with '! ' is a warning)",
    )
    # Only what the monitor reads: the window length comes from the windows themselves.
    add_settings_arguments(parser, only=MONITOR_SETTINGS)
    return parser


def status_notes(path: Path | None, limit: int = 3) -> list[Text]:
    """The first lines of the status file (see --status-file), as dashboard notes."""
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    notes = []
    for line in lines[:limit]:
        warning = line.startswith("! ")
        notes.append(Text(line[2:] if warning else line, style="bold yellow" if warning else "cyan"))
    return notes


class RecentLogLines(logging.Handler):
    """The monitor's own last log lines, for the dashboard to show under its header:
    written to the terminal, they would land in the middle of the dashboard and tear it.

    The last two, with the time each was said: broker trouble is one line when it
    begins and one when it ends, and the dashboard shows both, for as long as the
    trouble lasts (`hold`) and a minute after. Collected from start-up on, so the
    lines said while the monitor waited for the broker, before the dashboard covered
    the terminal, are on the dashboard too."""

    SHOWN_SECONDS = 60.0
    KEPT = 2

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[tuple[float, int, str]] = deque(maxlen=self.KEPT)

    def emit(self, record: logging.LogRecord) -> None:
        said = time.strftime("%H:%M:%S", time.localtime(record.created))
        self.lines.append((time.monotonic(), record.levelno, f"{said} {record.name}: {record.getMessage()}"))

    def notes(self, hold: bool = False) -> list[Text]:
        lines = list(self.lines)
        if not lines or (not hold and time.monotonic() - lines[-1][0] > self.SHOWN_SECONDS):
            return []
        return [Text(text, style="bold yellow" if level >= logging.WARNING else "dim") for _, level, text in lines]


def _live_dashboard(
    console: Console,
    tail: WindowTail,
    stop: threading.Event,
    source: str,
    window_seconds: int,
    args,
    recent_log: RecentLogLines,
) -> int:
    """Redraw the dashboard as windows arrive, and every second for the "last one Ns ago".

    Full screen (the terminal's alternate screen, as `top` does): every redraw starts at
    the top-left corner, so nothing written to the terminal meanwhile (by the local
    stack, by a child of it) can leave a stale header above the live one. On exit the
    terminal shows again what was there before (the local stack's start-up lines)."""
    seen: dict[str, dict] = {}
    last_arrival: float | None = None
    started = time.monotonic()
    root = logging.getLogger()
    stderr_handlers = root.handlers[:]
    root.handlers[:] = [recent_log]

    def screen():
        since = None if last_arrival is None else time.monotonic() - last_arrival
        ordered = [seen[key] for key in sorted(seen)]
        length = window_length(ordered[-1]) if ordered else None
        notes = status_notes(args.status_file) + recent_log.notes(hold=tail.health.down_since is not None)
        return render_dashboard(ordered, since, source, length or window_seconds, tuple(console.size), notes)

    try:
        with Live(screen(), console=console, refresh_per_second=2, screen=True) as live:
            while not stop.is_set():
                fresh = tail.poll(1.0)
                for window in fresh:
                    seen[window["window_start"]] = window
                    last_arrival = time.monotonic()
                live.update(screen())
                if args.exit_after and len(seen) >= args.exit_after:
                    return 0
                idle_since = last_arrival or started
                if args.idle_timeout and time.monotonic() - idle_since > args.idle_timeout:
                    return 0
    finally:
        root.handlers[:] = stderr_handlers
    return 0


class ReaderWatch:
    """Notices at once that the reader of our stdout went away (`| head -3` has its
    lines), not at the next write: that comes with the next window, up to a window's
    length later, and the shell gives the prompt back only when both have ended.

    A pipe whose reading end is closed reports POLLERR to the writer (POLLHUP: a
    socket or terminal hung up); a thread waits for that and sets `stop`. A file or
    /dev/null never reports either, so the thread just waits for `stop`."""

    _GONE = select.POLLERR | select.POLLHUP
    _CHECK_STOP_MS = 500  # how soon the thread notices that the monitor stops on its own

    def __init__(self, stop: threading.Event, fd: int) -> None:
        self.stop = stop
        self.gone = threading.Event()
        self._poller = select.poll()
        self._poller.register(fd, 0)  # no event asked for: errors and hang-ups come anyway
        threading.Thread(target=self._watch, name="stdout-reader-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            events = sum(flags for _, flags in self._poller.poll(self._CHECK_STOP_MS))
            if events & select.POLLNVAL:  # stdout is not open: nothing to watch
                return
            if events & self._GONE:
                self.gone.set()
                self.stop.set()
                return


def _quiet_stdout() -> None:
    """The reader of our stdout went away (`| head`): point stdout at /dev/null, so that
    the interpreter's last flush at exit does not complain about the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    settings, args, environ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    console = Console(highlight=False)
    source = f"{settings.output_topic} on {settings.bootstrap_servers}"
    try:
        tail = WindowTail(settings, args.from_beginning)
    except KafkaException as error:  # librdkafka refused a KAFKA_* value (a TLS file it cannot read, ...)
        exit_with_config_error(
            "monitor_aggregated_data.py",
            client_setting_error(error, environ) or ConfigError("KAFKA_* settings", str(error)),
        )
    shown = 0
    reader = ReaderWatch(stop, sys.stdout.fileno())
    dashboard = not args.json and console.is_terminal
    recent_log = RecentLogLines()
    if dashboard:  # what start-up says is on the terminal now, and on the dashboard later
        logging.getLogger().addHandler(recent_log)
    try:
        if not tail.start(stop):
            return 0 if reader.gone.is_set() else tail.health.exit_status_when_stopped()
        if dashboard:
            return _live_dashboard(console, tail, stop, source, settings.window_seconds, args, recent_log)
        last_window = time.monotonic()
        while not stop.is_set():
            for window in tail.poll(0.5):
                line = json.dumps(window, ensure_ascii=False) if args.json else headline(window)
                try:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                except BrokenPipeError:  # a normal end, as for `cat`
                    _quiet_stdout()
                    return 0
                shown += 1
                last_window = time.monotonic()
                if args.exit_after and shown >= args.exit_after:
                    return 0
            if args.idle_timeout and time.monotonic() - last_window > args.idle_timeout:
                return 0
        if reader.gone.is_set():  # a normal end, as for `cat`
            _quiet_stdout()
    except AuthenticationFailed as refused:
        exit_with_config_error("monitor_aggregated_data.py", refused.as_config_error())
    except NotAuthorized as refused:  # the cluster's ACLs (broker/authorization.py)
        print(f"monitor_aggregated_data.py: {refused.line()}", file=sys.stderr)
        return 2
    except KafkaException as error:
        print(
            f"monitor_aggregated_data.py: stopped: could not read {settings.output_topic} from"
            f" {settings.bootstrap_servers}: {_reason(error)}",
            file=sys.stderr,
        )
        return 1
    finally:
        stop.set()  # ends the reader watch
        tail.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
