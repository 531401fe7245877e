"""Recovery against a real broker: recomputing the windows of a time range, replaying the DLQ.

The procedure and its commands are in docs/operations.md ("Recovery").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from confluent_kafka import Producer

from aggregator import iso_utc
from tests.conftest import ROOT, aligned_past, latest_by_key, produce, read_topic, wait_until
from tests.oracle import expected_windows
from tests.workloads import invalid_record_positions, login_workload

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def values(bootstrap: str, topic: str) -> dict[str, dict]:
    return {key: json.loads(value) for key, value in latest_by_key(bootstrap, topic).items()}


def run_module(module: str, *args: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_recomputation_republishes_exactly_the_windows_of_its_range(topics, start_processor, tmp_path):
    topics.create(input_partitions=4)
    start = aligned_past(20)
    records = login_workload(start, seconds=360, count=6000, partitions=4, seed=5)
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows([(value, ms) for _, value, ms in records])
    assert len(expected) == 12

    # The first run has "the bug": 3 top IPs where the contract says 10.
    buggy = start_processor(topics.env(TOP_IPS="3"))
    wait_until(lambda: len(latest_by_key(topics.bootstrap, topics.output)) >= 12, 60, message="the first run")
    assert buggy.terminate()[0] == 0
    before = values(topics.bootstrap, topics.output)
    assert sorted(before) == sorted(expected) and before != expected

    # Recompute from the 7th window, under a new group, into a staging topic. The margin
    # (60 s) makes each partition start at its first record of the 5th window.
    recompute_from = start + 180
    margin = 60
    staging = f"{topics.output}-recompute"
    env = topics.env(
        CONSUMER_GROUP_ID=f"{topics.group}-recompute",
        OUTPUT_TOPIC=staging,
        PARTIALS_TOPIC=f"{staging}-partials",
        DLQ_TOPIC=f"{topics.dlq}-recompute",
        RECOMPUTE_FROM=iso_utc(recompute_from),
        RECOMPUTE_MARGIN_SECONDS=str(margin),
    )
    recompute = start_processor(env)
    in_range = {key: value for key, value in expected.items() if key >= iso_utc(recompute_from)}
    assert len(in_range) == 6
    wait_until(lambda: len(latest_by_key(topics.bootstrap, staging)) >= 6, 60, message="the recomputed windows")
    assert recompute.terminate()[0] == 0
    assert values(topics.bootstrap, staging) == in_range  # nothing before the range, exact within it
    # Each partition started at its first record at or after the start less the margin
    # (found by reading: the embedded broker's own answer to that question is 0).
    first = {}
    for partition in range(4):
        times = [ms for p, _, ms in records if p == partition]
        first[partition] = next(i for i, ms in enumerate(times) if ms >= (recompute_from - margin) * 1000)
    assert min(first.values()) > 0
    starts = ",".join(str(first[p]) for p in range(4))
    assert f"partition(s) 0,1,2,3 start at offset(s) {starts}," in recompute.log(), recompute.log()
    # ...and read from there: it copied to its DLQ exactly the invalid records from there on.
    copied = {
        (int(h["dlq.source.partition"]), int(h["dlq.source.offset"]))
        for h in (
            {k: v.decode() for k, v in m.headers()} for m in read_topic(topics.bootstrap, f"{topics.dlq}-recompute")
        )
    }
    invalid = invalid_record_positions(records)
    assert copied == {(p, offset) for p, offset in invalid if offset >= first[p]}
    assert len(copied) < len(invalid)

    # Copy onto the output: a dry run first (changes nothing), then windows 7 to 11.
    until = recompute_from + 150
    args = ("--source", staging, "--from", iso_utc(recompute_from), "--until", iso_utc(until))
    dry = run_module("ops.recompute", *args, "--dry-run", env=topics.env(), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would copy window") == 5 and "would copy 5 window(s)" in dry.stdout
    assert values(topics.bootstrap, topics.output) == before
    done = run_module("ops.recompute", *args, env=topics.env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    after = values(topics.bootstrap, topics.output)
    for key in expected:
        wanted = expected[key] if iso_utc(recompute_from) <= key < iso_utc(until) else before[key]
        assert after[key] == wanted, key
    # The newest window is last on the output again, so a live processor restarting now
    # still learns that every window is published.
    last = read_topic(topics.bootstrap, topics.output)[-1]
    assert last.key().decode() == max(expected) and json.loads(last.value()) == before[max(expected)]


def login(index: int, event_time: int) -> bytes:
    return json.dumps(
        {
            "user_id": f"user-{index}",
            "app_version": "2.3.0",
            "device_type": "android",
            "ip": f"10.0.0.{index % 250}",
            "locale": "DE",
            "device_id": f"device-{index}",
            "timestamp": event_time,
        }
    ).encode()


def totals(bootstrap: str, topic: str) -> dict[str, int]:
    windows = values(bootstrap, topic).values()
    fields = ("message_count", "invalid_message_count", "late_message_count")
    return {name: sum(window[name] for window in windows) for name in fields}


def test_a_dlq_replay_sends_each_fixed_record_once_and_it_is_counted_once(topics, start_processor, tmp_path):
    """Broken records (a login followed by junk) go to the DLQ; two are copied there twice,
    as after a processor crash. Exported, fixed, replayed twice: each reaches the input
    once and is counted once, as a late record (its window was published already)."""
    topics.extra_env = {"WINDOW_SECONDS": "5", "ALLOWED_LATENESS_SECONDS": "2"}
    topics.create(input_partitions=2)
    processor = start_processor(topics.env())
    processor.wait_for_log("assigned all 2", timeout=60)
    now = int(time.time())
    valid = [(i % 2, login(i, now), now * 1000) for i in range(40)]
    broken = [(i % 2, login(100 + i, now) + b" <- junk", now * 1000) for i in range(6)]
    produce(topics.bootstrap, topics.input, valid + broken)
    wait_until(
        lambda: (
            totals(topics.bootstrap, topics.output)
            == {"message_count": 40, "invalid_message_count": 6, "late_message_count": 0}
        ),
        30,
        message="the windows of the first records",
    )
    copies = read_topic(topics.bootstrap, topics.dlq)
    assert len(copies) == 6
    duplicate = Producer({"bootstrap.servers": topics.bootstrap, "log_level": 2})
    for copy in copies[:2]:
        duplicate.produce(topics.dlq, key=copy.key(), value=copy.value(), headers=copy.headers())
    assert duplicate.flush(10) == 0

    exported = tmp_path / "dlq.jsonl"
    result = run_module("ops.dlq_replay", "export", str(exported), env=topics.env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exported 6 record(s)" in result.stderr and "2 skipped" in result.stderr
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len({line["source"] for line in lines}) == 6
    for line in lines:  # the fix: drop the junk
        assert line["reason"] and line["value"].endswith(" <- junk")
        line["value"] = line["value"].removesuffix(" <- junk")
    exported.write_text("".join(json.dumps(line) + "\n" for line in lines + lines[:1]))  # one twice, by mistake
    input_size = len(read_topic(topics.bootstrap, topics.input))

    dry = run_module("ops.dlq_replay", "replay", str(exported), "--dry-run", env=topics.env(), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would send ") == 7 and "would send 6 record(s), skipped 1" in dry.stdout, dry.stdout
    assert len(read_topic(topics.bootstrap, topics.input)) == input_size
    for attempt, wanted in [(1, "sent 6 record(s), skipped 1"), (2, "sent 0 record(s), skipped 7")]:
        done = run_module("ops.dlq_replay", "replay", str(exported), env=topics.env(), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert wanted in done.stdout, (attempt, done.stdout)
    replayed = [
        m for m in read_topic(topics.bootstrap, topics.input) if dict(m.headers() or []).get("dlq.replayed.from")
    ]
    assert sorted(m.value() for m in replayed) == sorted(login(100 + i, now) for i in range(6))
    assert {(m.partition(), m.timestamp()[1]) for m in replayed} == {(0, now * 1000), (1, now * 1000)}
    again = run_module("ops.dlq_replay", "export", "-", env=topics.env(), cwd=tmp_path)
    assert again.stdout == "" and "exported 0 record(s)" in again.stderr

    # New logins close the next windows of both partitions, which carry the late counts.
    later = int(time.time())
    produce(topics.bootstrap, topics.input, [(i % 2, login(200 + i, later), later * 1000) for i in range(10)])
    wait_until(
        lambda: totals(topics.bootstrap, topics.output)["message_count"] == 50,
        30,
        message="the windows after the replay",
    )
    wait_until(lambda: totals(topics.bootstrap, topics.output)["late_message_count"] >= 6, 15, message="late counts")
    time.sleep(2)  # nothing more may come
    assert totals(topics.bootstrap, topics.output) == {
        "message_count": 50,
        "invalid_message_count": 6,
        "late_message_count": 6,
    }
    assert processor.terminate()[0] == 0
