"""Throughput and memory of the processor against the raw consume rate, in one run.

    python benchmarks/throughput.py                 # 1,000,000 records, 3 runs
    python benchmarks/throughput.py --records 20000 --runs 1   # a quick look

Starts the embedded broker, preloads N `realistic` records spread over several
minutes of past event time across several partitions, then measures, each in
its own process and the same number of times:

  (a) raw:       a batch consume() loop that does nothing, first record to last;
  (b) processor: the real processor, first record to last record aggregated, with
                 the windows that the advancing event time closes published and
                 committed along the way; and separately the time the last windows
                 take to close once the input is quiet ("tail").

Prints records/s for each, the ratio b/a, the processor's peak RSS and where its
time went, per run and as medians. Then, in the same run:

  (c) group:     --group-size processors (default 2) in one consumer group over the
                 same records, their aggregate rate (all records over the span from
                 the first batch any of them took to the last), against (b);
  (d) parts:     the size and encode/decode/merge time of one partition's part of a
                 50,000-record window (benchmarks/part_size.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from confluent_kafka import (  # noqa: E402
    Consumer,
    KafkaError,
    Producer,  # noqa: E402
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from broker.embedded_broker import EmbeddedBroker  # noqa: E402
from data_generator import RealisticProfile  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import part_size  # noqa: E402

WINDOW = 30


def preload(bootstrap: str, topic: str, records: int, partitions: int, minutes: int) -> int:
    """Produce the workload; returns the number of windows it spans."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(10)
    rng = random.Random(1)
    profile = RealisticProfile(rng)
    end = int(time.time()) - 120
    start = end - minutes * 60
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000, "log_level": 2})
    started = time.perf_counter()
    windows: set[int] = set()
    for index in range(records):
        event_time = start + index * (end - start) // records
        windows.add(event_time - event_time % WINDOW)
        value = profile.event(rng, event_time)
        while True:
            try:
                producer.produce(topic, value=value, partition=index % partitions, timestamp=event_time * 1000)
                break
            except BufferError:
                producer.poll(0.05)
        if index % 100_000 == 0:
            producer.poll(0)
            print(f"\rpreloading: {index:,}/{records:,}", end="", flush=True)
    producer.flush(60)
    print(f"\rpreloaded {records:,} records in {time.perf_counter() - started:.0f}s ({minutes} min of event time)")
    return len(windows)  # from the event times produced, not the range: the last one may hold no record


def run_env(bootstrap: str, topic: str, name: str, batch_size: int) -> dict[str, str]:
    """One run's settings: the shared input, topics and group of its own."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "INPUT_TOPIC": topic,
        "OUTPUT_TOPIC": f"{topic}-out-{name}",
        "DLQ_TOPIC": f"{topic}-dlq-{name}",
        "PARTIALS_TOPIC": f"{topic}-partials-{name}",
        "CONSUMER_GROUP_ID": f"{topic}-group-{name}",
        "CONSUME_BATCH_SIZE": str(batch_size),
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "CLOSE_INTERVAL_SECONDS": "0.1",
    }


def run_child(script: str, args: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def windows_on(bootstrap: str, topic: str) -> int:
    """Distinct keys on the output topic now."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"count-{uuid.uuid4()}", "enable.partition.eof": True}
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        keys, deadline = set(), time.monotonic() + 10
        while time.monotonic() < deadline:
            messages = consumer.consume(1000, 0.5)
            for message in messages:
                if message.error() is None:
                    keys.add(message.key())
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    return len(keys)
            if not messages:
                return len(keys)
        return len(keys)
    finally:
        consumer.close()


def run_group(env: dict[str, str], size: int, records: int, windows: int) -> dict:
    """`size` processors in one group until every window is out; their aggregate rate."""
    members = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "_measure_processor.py"), str(records), str(windows), "member"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(size)
    ]
    deadline = time.monotonic() + 600
    while windows_on(env["KAFKA_BOOTSTRAP_SERVERS"], env["OUTPUT_TOPIC"]) < windows:
        if time.monotonic() > deadline or any(m.poll() is not None for m in members):
            for m in members:
                m.kill()
            raise SystemExit("group run failed:\n" + "\n".join(m.stderr.read()[-2000:] for m in members))
        time.sleep(1)
    reports = []
    for m in members:
        m.send_signal(15)
        out, err = m.communicate(timeout=60)
        if m.returncode != 0:
            raise SystemExit(f"group member failed:\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    started = min(r["first_batch_wall"] for r in reports if r["first_batch_wall"])
    ended = max(r["last_batch_wall"] for r in reports if r["last_batch_wall"])
    return {
        "rate": records / (ended - started),
        "records_handled": [r["records"] for r in reports],
        "partitions": [r["partitions"] for r in reports],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--minutes", type=int, default=10, help="minutes of event time the records span")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=5000, help="records per consume() call, both loops")
    parser.add_argument("--group-size", type=int, default=2, help="processors in the group run (0: none)")
    args = parser.parse_args()

    with EmbeddedBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:6]}"
        windows = preload(broker.bootstrap_servers, topic, args.records, args.partitions, args.minutes)
        rows = []
        for run in range(1, args.runs + 1):
            raw = run_child(
                "_raw_consume.py",
                [broker.bootstrap_servers, topic, str(args.records), str(args.batch_size)],
                dict(os.environ),
            )
            env = run_env(broker.bootstrap_servers, topic, str(run), args.batch_size)
            measured = run_child("_measure_processor.py", [str(args.records), str(windows)], env)
            row = {
                "run": run,
                "raw_rate": raw["records"] / raw["seconds"],
                "processor_rate": measured["records"] / measured["seconds"],
                "tail_seconds": measured["close_tail_seconds"],
                "peak_rss_mb": measured["peak_rss_mb"],
                "windows": measured["windows"],
                "stages": measured["stages"],
            }
            row["ratio"] = row["processor_rate"] / row["raw_rate"]
            rows.append(row)
            print(
                f"run {run}: raw {row['raw_rate']:>10,.0f} rec/s | processor {row['processor_rate']:>10,.0f} rec/s"
                f" | ratio {row['ratio']:.2f} | tail {row['tail_seconds']:.1f}s | peak RSS {row['peak_rss_mb']:.0f} MB"
                f" | windows {row['windows']}"
            )

        group = None
        if args.group_size > 1:
            env = run_env(broker.bootstrap_servers, topic, "group", args.batch_size)
            group = run_group(env, args.group_size, args.records, windows)

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print()
    print(
        f"records {args.records:,} | partitions {args.partitions} | {args.minutes} min of event time | "
        f"{windows} windows | batch {args.batch_size} | runs {len(rows)} | CPUs {os.cpu_count()}"
    )
    print(f"median raw consume rate  {median('raw_rate'):>12,.0f} records/s")
    print(f"median processor rate    {median('processor_rate'):>12,.0f} records/s")
    print(f"median ratio (b/a)       {median('ratio'):>12.2f}")
    print(f"median tail (last windows close after input goes quiet) {median('tail_seconds'):.1f}s")
    print(f"median peak RSS          {median('peak_rss_mb'):>12.0f} MB")
    stage_names = ("consume", "parse", "dead_letter", "aggregate", "publish")
    middle = sorted(rows, key=lambda row: row["ratio"])[len(rows) // 2]
    total = sum(middle["stages"][f"{name}_seconds"] for name in stage_names)
    print("where the processor's time went (median run; publish runs on the timer thread):")
    for name in stage_names:
        seconds = middle["stages"][f"{name}_seconds"]
        print(f"  {name:<12} {seconds:7.2f}s  {seconds / total:6.1%}")
    if group is not None:
        print(
            f"{args.group_size} processors in one group: {group['rate']:>10,.0f} records/s in all"
            f" = {group['rate'] / median('processor_rate'):.2f} x one processor's median"
            f" (records handled {', '.join(f'{n:,}' for n in group['records_handled'])};"
            f" partitions {' | '.join(','.join(map(str, p)) for p in group['partitions'])};"
            f" peak RSS {group['peak_rss_mb']:.0f} MB per process at most; CPUs {os.cpu_count()})"
        )
    print("one partition's part of a 50,000-record window (benchmarks/part_size.py):")
    print(part_size.table(part_rows()))
    return 0


def part_rows() -> list[dict]:
    from ingest.parsing import NATIVE_PARSER_AVAILABLE
    from testkit.workloads import login_workload

    realistic = login_workload(part_size.START, part_size.WINDOW, 50_000, 1)
    return [
        part_size.measure("realistic", realistic, NATIVE_PARSER_AVAILABLE, 900_000, 3),
        part_size.measure("all distinct", part_size.distinct_workload(50_000), NATIVE_PARSER_AVAILABLE, 900_000, 3),
    ]


if __name__ == "__main__":
    sys.exit(main())
