"""Tail `device-login-aggregates` and show each window the way an operator reads it.

Default: one compact panel per window (headline figures, then device split,
top locales, top IPs and app versions as small tables with bars). `--json`
prints each window's value as one JSON object per line, for machines.

The monitor keeps the latest record per window key: a window republished after a
processor restart carries the same bytes and is not shown twice. It never joins a
consumer group's offsets (it commits nothing), so any number can watch.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from rich import box
from rich.bar import Bar
from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from config import OneLineArgumentParser, Settings, add_settings_arguments, load_settings_or_exit
from kafka_io import QUIET_CLIENT_LOGS, BrokerHealth, topic_partition_count
from log_setup import configure_logging

_BAR_WIDTH = 16
_ROWS = 5


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


def _top_ips_table(top_ips: list[dict]) -> Table:
    table = Table(title="top IPs", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("ip", no_wrap=True)
    table.add_column("logins", justify="right")
    for entry in top_ips[:_ROWS]:
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
    return (
        f"{window['window_start']} → {window['window_end']}  "
        f"logins {window['message_count']:,}  unique devices {window['unique_device_count']:,}  "
        f"unique IPs {window['unique_ip_count']:,}  invalid {window['invalid_message_count']:,}  "
        f"late {window['late_message_count']:,}  missing fields: {missing_text}"
    )


def render_window(window: dict) -> Panel:
    """One window as a panel of small tables."""
    total = window["message_count"]
    tables = Columns(
        [
            _share_table("by device type", "device", window["device_counts"], total),
            _share_table("top locales", "locale", window["locale_counts"], total),
            _top_ips_table(window["top_ips"]),
            _versions_table(window["app_version_by_device"]),
        ],
        padding=(0, 3),
    )
    problems = (
        window["invalid_message_count"]
        + window["late_message_count"]
        + sum((window.get("missing_field_counts") or {}).values())
    )
    title = Text(f"window {window['window_start']} → {window['window_end']}", style="bold")
    return Panel(
        Group(Text(headline(window).split("  ", 1)[1], style="yellow" if problems else "green"), tables),
        title=title,
        title_align="left",
        box=box.ROUNDED,
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
                "group.id": f"monitor-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "error_cb": self.health.on_error,
            }
        )
        self.latest: dict[bytes, bytes] = {}

    def start(self, stop: threading.Event) -> bool:
        """Assign every partition of the output topic (waiting for it to exist)."""
        topic = self.settings.output_topic
        while not stop.is_set():
            count = topic_partition_count(self.consumer, topic)
            if count:
                break
            stop.wait(1.0)
        else:
            return False
        assignment = []
        for partition in range(count):
            tp = TopicPartition(topic, partition)
            if self.from_beginning:
                tp.offset = OFFSET_BEGINNING
            else:  # start at the newest window so there is something to show at once
                low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
                tp.offset = max(low, high - 1)
            assignment.append(tp)
        self.consumer.assign(assignment)
        return True

    def poll(self, timeout: float) -> list[dict]:
        """New or changed windows since the last call, as parsed values, in arrival order."""
        fresh = []
        for message in self.consumer.consume(100, timeout):
            error = message.error()
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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="monitor_aggregated_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per window per line (for machines)")
    parser.add_argument("--from-beginning", action="store_true", help="show every window on the topic, not just new")
    parser.add_argument("--exit-after", type=int, default=0, metavar="N", help="stop after showing N windows")
    parser.add_argument(
        "--idle-timeout", type=float, default=0, metavar="S", help="stop after S seconds without a window"
    )
    add_settings_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    settings, args, _ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    console = Console(highlight=False)
    if not console.is_terminal:  # a log file or pipe: wide enough for the tables side by side
        console = Console(highlight=False, width=140)
    tail = WindowTail(settings, args.from_beginning)
    shown = 0
    try:
        if not args.json:
            console.print(f"watching {settings.output_topic} on {settings.bootstrap_servers} (Ctrl-C to stop)")
        if not tail.start(stop):
            return 0
        last_window = time.monotonic()
        while not stop.is_set():
            for window in tail.poll(0.5):
                if args.json:
                    sys.stdout.write(json.dumps(window, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                else:
                    console.print(render_window(window))
                shown += 1
                last_window = time.monotonic()
                if args.exit_after and shown >= args.exit_after:
                    return 0
            if args.idle_timeout and time.monotonic() - last_window > args.idle_timeout:
                return 0
    except KafkaException as error:
        print(f"monitor_aggregated_data.py: {error}", file=sys.stderr)
        return 1
    finally:
        tail.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
