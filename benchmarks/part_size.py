"""How big a part of one window is on the partials topic, and what it costs to make and merge.

    python benchmarks/part_size.py                  # 50,000 records in one window, one partition
    python benchmarks/part_size.py --records 200000 --max-bytes 1000000

A processor owning a partition publishes, for every window it closes there, the
partition's part of it (merging/parts.py); the merger decodes the pieces and sums them
(merging/merge.py). With one partition the part holds the whole window: the largest a
part of a window of that many records gets. No broker: the records are parsed
and counted the way the processor counts them, then:

  encode:  encode_part (the publisher's cost per part, on the timer thread);
  decode:  decode_partial of every piece (the merger's);
  merge:   MergeState.add of every piece, then due_windows (sum and render).

Rows: the tests' `login_workload` (realistic: 10,000 devices, a few thousand IPs)
counted on the native and on the pure path, and a worst case where every record
brings a new device id and a new IP. Times are the best of --runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.window_value import DEFAULT_MAX_DISTINCT, render_window_value, tallies_for  # noqa: E402
from ingest.parsing import NATIVE_PARSER_AVAILABLE, parse_values  # noqa: E402
from merging.merge import MergeState  # noqa: E402
from merging.parts import decode_partial, encode_part, encode_progress  # noqa: E402
from testkit.workloads import login_workload  # noqa: E402

WINDOW = 30
TOP_IPS = 10
START = 1_800_000_000 - 1_800_000_000 % WINDOW
DEFAULT_MAX_BYTES = 900_000  # window_closer.PART_MAX_BYTES: under the broker's default 1 MB message


def distinct_workload(count: int) -> list[tuple[int, bytes | None, int]]:
    """Every record a new device id and a new IP: the most a part of `count` records holds."""
    records = []
    for index in range(count):
        event_time = START + index * WINDOW // count
        value = (
            f'{{"user_id":"user-{index}","app_version":"2.3.0","device_type":"android",'
            f'"ip":"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}","locale":"RU",'
            f'"device_id":"device-{index:08d}-{"x" * 24}","timestamp":{event_time}}}'
        ).encode()
        records.append((0, value, event_time * 1000))
    return records


def best(runs: int, work: Callable[[], object]) -> tuple[float, object]:
    """The fastest of `runs` calls, in seconds, and the last result."""
    fastest, result = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        result = work()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest, result


def measure(name: str, records, native: bool, max_bytes: int, runs: int) -> dict:
    values = [value for _, value, _ in records]
    kafka_s = [ms // 1000 for _, _, ms in records]
    batch, invalid = parse_values(values, START + 10_000, 300, lambda position: kafka_s[position], native=native)
    tallies = tallies_for(batch, DEFAULT_MAX_DISTINCT)
    tallies.add(batch, START, START + WINDOW)
    invalid_here = sum(1 for item in invalid if kafka_s[item.position] // WINDOW * WINDOW == START)

    encode_s, pieces = best(runs, lambda: encode_part(START, 0, 1, tallies, invalid_here, 0, max_bytes))
    decode_s, decoded = best(runs, lambda: [decode_partial(data) for data in pieces])
    progress = decode_partial(encode_progress(0, 1, START + WINDOW))

    def merge():
        state = MergeState(WINDOW, TOP_IPS, DEFAULT_MAX_DISTINCT)
        for offset, piece in enumerate(decoded):
            state.add(piece, offset)
        state.add(progress, len(decoded))
        return state.due_windows()

    merge_s, due = best(runs, merge)
    single = render_window_value(START, tallies, invalid_here, 0, WINDOW, TOP_IPS)
    assert [window.value for window in due] == [single], "the merge must give one processor's bytes"
    return {
        "workload": name,
        "path": "native" if native else "pure",
        "records": tallies.message_count,
        "devices": tallies.unique_device_count(),
        "ips": tallies.unique_ip_count(),
        "pieces": len(pieces),
        "part KiB": sum(map(len, pieces)) / 1024,
        "largest KiB": max(map(len, pieces)) / 1024,
        "value KiB": len(single) / 1024,
        "encode ms": encode_s * 1000,
        "decode ms": decode_s * 1000,
        "merge ms": merge_s * 1000,
    }


def table(rows: list[dict]) -> str:
    def cell(value: object) -> str:
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

    header = list(rows[0])
    cells = [[cell(row[column]) for column in header] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(header)]
    lines = [" | ".join(column.rjust(width) for column, width in zip(header, widths, strict=True))]
    lines.append("-|-".join("-" * width for width in widths))
    lines += [" | ".join(c.rjust(width) for c, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="records in the window (default 50,000)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest piece (default 900,000)")
    parser.add_argument("--runs", type=int, default=5, help="times each step is run; the best is shown (default 5)")
    args = parser.parse_args()

    realistic = login_workload(START, WINDOW, args.records, 1)
    rows = []
    for native in [True, False] if NATIVE_PARSER_AVAILABLE else [False]:
        rows.append(measure("realistic", realistic, native, args.max_bytes, args.runs))
    rows.append(measure("all distinct", distinct_workload(args.records), NATIVE_PARSER_AVAILABLE, args.max_bytes, 3))
    print(f"one {WINDOW}-second window, one partition, pieces of at most {args.max_bytes:,} bytes; best of {args.runs}")
    print(table(rows))


if __name__ == "__main__":
    main()
