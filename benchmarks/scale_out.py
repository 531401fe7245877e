"""The scale-out promise at full size, against the embedded broker: several processors in
one consumer group give exactly one processor's windows, whoever dies.

    python benchmarks/scale_out.py                  # both checks, about 3 minutes
    python benchmarks/scale_out.py --records 20000 --kill-records 60000   # a quick look

(1) 1, 2 and 3 processors in turn over one backlog (10 minutes of event time in a
    6-partition topic): every run must equal the oracle (testkit/oracle.py), byte for
    byte the same across the runs, every invalid record in the dead-letter topic, and
    every processor must exit 0 on SIGTERM.
(2) 3 processors over a bigger backlog: SIGKILL the first one given partitions as soon
    as it has them (mid-read: a backlog is read in seconds and its windows come out
    in one burst at the end, so "as the first window appears" would be after the
    work), start a fresh one, then SIGKILL the merger once the fresh one has
    partitions (at most 8 s later); the output must still end with exactly the
    oracle's windows, and the survivors exit 0.

Prints one line per run, and exits 1 if anything differs. The test suite runs the
same scenarios smaller (tests/test_scale_out.py); this is the size the issue set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.embedded_broker import EmbeddedBroker  # noqa: E402
from testkit.oracle import expected_windows  # noqa: E402
from testkit.processes import (  # noqa: E402
    ProcessorProcess,
    Topics,
    aligned_past,
    latest_by_key,
    produce,
    read_topic,
    wait_until,
)
from testkit.workloads import invalid_record_positions, login_workload  # noqa: E402

PARTITIONS = 6


def make_topics(bootstrap: str, name: str) -> Topics:
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    return Topics(bootstrap, f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}")


def backlog(topics: Topics, records: int, seed: int) -> tuple[list, dict]:
    topics.create(input_partitions=PARTITIONS)
    workload = login_workload(aligned_past(15), seconds=600, count=records, partitions=PARTITIONS, seed=seed)
    produce(topics.bootstrap, topics.input, workload)
    return workload, expected_windows([(value, kafka_ms) for _, value, kafka_ms in workload])


def wait_for(condition, timeout: float, interval: float = 0.05):
    """`wait_until`, with None on a timeout: the script reports, it does not raise."""
    try:
        return wait_until(condition, timeout, interval)
    except AssertionError:
        return None


def windows_now(topics: Topics) -> dict[str, bytes]:
    return latest_by_key(topics.bootstrap, topics.output)


def same_windows(published: dict[str, bytes], expected: dict) -> bool:
    return {key: json.loads(value) for key, value in published.items()} == expected


def group_run(run: Topics, count: int, expected: dict, logs: Path) -> tuple[dict[str, bytes], float, list]:
    """`count` processors in a group until every window is out, then SIGTERM."""
    started = time.monotonic()
    processors = [ProcessorProcess(run.env(), logs / f"n{count}-{i}.log") for i in range(count)]
    published = wait_for(lambda: (got := windows_now(run)) and len(got) >= len(expected) and got, 180, 0.5) or {}
    seconds = time.monotonic() - started
    codes = [processor.terminate()[0] for processor in processors]
    return published, seconds, list(zip(codes, map(last_assignment, processors), strict=True))


def last_assignment(processor: ProcessorProcess) -> str:
    """The partitions the processor owned last, from its log ("assigned partitions 0,3 (...");
    a member stopped in the middle of a rebalance shows the assignment before it."""
    lines = [line for line in processor.log().splitlines() if "assigned " in line]
    if not lines:
        return "none"
    words = lines[-1].split("assigned ", 1)[1].split()
    return "all" if words[0] == "all" else words[1]


def check_group_sizes(bootstrap: str, records: int, logs: Path) -> bool:
    topics = make_topics(bootstrap, "sizes")
    workload, expected = backlog(topics, records, seed=11)
    print(f"(1) {records:,} records, {PARTITIONS} partitions, 10 min of event time: {len(expected)} windows expected")
    invalid = invalid_record_positions(workload)
    outputs, ok = {}, True
    for count in (1, 2, 3):
        # The same input; output, DLQ, partials topic and group of this run's own.
        run = Topics(
            topics.bootstrap, topics.input, *(f"{name}-n{count}" for name in (topics.output, topics.dlq, topics.group))
        )
        published, seconds, members = group_run(run, count, expected, logs)
        outputs[count] = published
        exact = same_windows(published, expected)
        exits = all(code == 0 for code, _ in members)
        copies = [dict(m.headers()) for m in read_topic(run.bootstrap, run.dlq)]
        in_dlq = invalid <= {(int(h["dlq.source.partition"]), int(h["dlq.source.offset"])) for h in copies}
        ok &= exact and exits and in_dlq
        owned = " | ".join(partitions for _, partitions in members)
        print(
            f"    N={count}: {len(published)} windows in {seconds:.1f}s | equal to the oracle: {exact}"
            f" | {len(invalid)} invalid records all in the DLQ: {in_dlq} ({len(copies)} copies)"
            f" | exit codes {[code for code, _ in members]} | partitions last owned: {owned}"
        )
    identical = outputs[1] == outputs[2] == outputs[3]
    print(f"    byte-identical across N: {identical}")
    return ok and identical


def check_kills(bootstrap: str, records: int, batch_size: int, logs: Path) -> bool:
    topics = make_topics(bootstrap, "kills")
    _, expected = backlog(topics, records, seed=12)
    print(f"(2) {records:,} records, 3 processors, batches of {batch_size}, {len(expected)} windows expected")
    env = topics.env(CONSUME_BATCH_SIZE=str(batch_size))
    started = time.monotonic()
    processors = [ProcessorProcess(env, logs / f"kill-{i}.log") for i in range(3)]
    first = wait_for(lambda: next((p for p in processors if "assigned" in p.log()), None), 60, 0.01)
    if first is None:
        print("    no processor was given partitions within 60 s")
        return False
    first.kill()
    at_first = (time.monotonic() - started, len(windows_now(topics)))
    fresh = ProcessorProcess(env, logs / "kill-fresh.log")
    alive = [p for p in processors if p is not first] + [fresh]
    # The second kill while the group recovers from the first: once the fresh member
    # has partitions, or 8 s after the first kill, whichever comes first (the whole
    # backlog is out in about 12 s, so "8 s later" alone would come after the work).
    wait_for(lambda: "assigned" in fresh.log(), 8, 0.01)
    second = next((p for p in alive if "this processor is now the merger" in p.log()), alive[0])
    second.kill()
    at_second = (time.monotonic() - started, len(windows_now(topics)))
    survivors = [p for p in alive if p is not second]
    published = wait_for(lambda: (got := windows_now(topics)) and len(got) >= len(expected) and got, 180, 0.5) or {}
    done = time.monotonic() - started
    exact = same_windows(published, expected)
    codes = [p.terminate()[0] for p in survivors]
    print(
        f"    kill 1 at {at_first[0]:.1f}s ({at_first[1]} windows out), a fresh one started;"
        f" kill 2 ({'the merger' if 'now the merger' in second.log() else 'not the merger'})"
        f" at {at_second[0]:.1f}s ({at_second[1]} out)"
    )
    print(
        f"    all {len(published)} windows out at {done:.1f}s | equal to the oracle: {exact}"
        f" | survivors' exit codes {codes}"
    )
    return exact and all(code == 0 for code in codes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="backlog of check (1); 0 skips it")
    parser.add_argument("--kill-records", type=int, default=600_000, help="backlog of check (2); 0 skips it")
    parser.add_argument(
        "--kill-batch-size",
        type=int,
        default=20,
        help="CONSUME_BATCH_SIZE in check (2): small batches stretch the read, so that the kills land mid-stream",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, EmbeddedBroker() as broker:
        logs = Path(directory)
        ok = True
        if args.records:
            ok &= check_group_sizes(broker.bootstrap_servers, args.records, logs)
        if args.kill_records:
            ok &= check_kills(broker.bootstrap_servers, args.kill_records, args.kill_batch_size, logs)
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
