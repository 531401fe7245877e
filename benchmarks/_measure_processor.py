"""Child process of throughput.py: the real Processor, timed from its first record to
its last record aggregated, then until the last windows are published.

    _measure_processor.py RECORDS WINDOWS            # alone: stops once every window is out
    _measure_processor.py RECORDS WINDOWS member     # one member of a group: stops on SIGTERM

Settings come from the environment like any run; the only addition is a few
timestamps taken around the processor's own batch handling (wall clock for a
member, so that the parent can add up several processes).
"""

import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import build_settings  # noqa: E402
from kafka_processor import Processor  # noqa: E402
from telemetry.log_setup import configure_logging  # noqa: E402


class MeasuredProcessor(Processor):
    def __init__(self, settings, expected_records: int, expected_windows: int) -> None:
        super().__init__(settings)
        self.expected_records = expected_records
        self.expected_windows = expected_windows
        self.first_batch_at: float | None = None
        self.all_aggregated_at: float | None = None
        self.all_published_at: float | None = None
        self.all_published = threading.Event()
        self.first_batch_wall: float | None = None
        self.last_batch_wall: float | None = None
        self.partitions: set[int] = set()

    def _process(self, messages) -> None:
        if self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()
            self.first_batch_wall = time.time()
        super()._process(messages)
        self.last_batch_wall = time.time()
        if self.all_aggregated_at is None and self.stats.records >= self.expected_records:
            self.all_aggregated_at = time.perf_counter()

    def _window_published(self, window, acknowledged_at: float) -> None:
        super()._window_published(window, acknowledged_at)
        if self.all_published_at is None and self.stats.windows_published >= self.expected_windows:
            self.all_published_at = time.perf_counter()
            self.all_published.set()


def member(processor: MeasuredProcessor) -> None:
    """One of several processors in a group: runs until SIGTERM, reports its share."""
    signal.signal(signal.SIGTERM, lambda *_: processor.stop_requested.set())
    original = processor.assignment.on_assign

    def on_assign(consumer, partitions) -> None:
        processor.partitions.update(tp.partition for tp in partitions)
        original(consumer, partitions)

    processor.assignment.on_assign = on_assign
    processor.run()
    print(
        json.dumps(
            {
                "records": processor.stats.records,
                "first_batch_wall": processor.first_batch_wall,
                "last_batch_wall": processor.last_batch_wall,
                "partitions": sorted(processor.partitions),
                "windows": processor.stats.windows_published,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )
    # The figures are out: leave without waiting on client teardown (a consumer that
    # left its group during a rebalance can keep the interpreter's exit waiting).
    os._exit(0)


def main() -> None:
    expected_records, expected_windows = int(sys.argv[1]), int(sys.argv[2])
    configure_logging("WARNING")
    processor = MeasuredProcessor(build_settings(os.environ), expected_records, expected_windows)
    if sys.argv[3:] == ["member"]:
        member(processor)
        return

    def watch() -> None:
        # Waits on an event, not a polling loop: a thread waking every millisecond
        # takes the GIL from the processor a thousand times a second.
        if not processor.all_published.wait(600):  # never hang a benchmark run
            published = processor.stats.windows_published
            print(f"gave up: {published} of {expected_windows} windows", file=sys.stderr)
            os._exit(1)
        processor.stop_requested.set()

    threading.Thread(target=watch, daemon=True).start()
    processor.run()
    aggregate_seconds = processor.all_aggregated_at - processor.first_batch_at
    print(
        json.dumps(
            {
                "records": processor.stats.records,
                "seconds": aggregate_seconds,
                "close_tail_seconds": processor.all_published_at - processor.all_aggregated_at,
                "windows": processor.stats.windows_published,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "stages": asdict(processor.stats),
            }
        )
    )


if __name__ == "__main__":
    main()
