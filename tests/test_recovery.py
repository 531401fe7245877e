"""Recovery against a real broker: recomputing the windows of a time range, replaying the DLQ.

The procedure and its commands are in docs/operations.md ("Recovery").
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aggregator import iso_utc
from tests.conftest import ROOT, aligned_past, latest_by_key, produce, read_topic, wait_until
from tests.oracle import expected_windows
from tests.workloads import login_workload

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
