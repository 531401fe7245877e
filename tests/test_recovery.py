"""Recovery against a real broker: recomputing the windows of a time range, replaying the DLQ.

The procedure and its commands are in docs/operations.md ("Recovery").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from core.window_value import iso_utc
from testkit.oracle import expected_windows
from testkit.processes import ROOT, aligned_past, latest_by_key, produce, read_topic, wait_until
from testkit.workloads import invalid_record_positions, login_workload

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
    # Its log says what it does, not that the empty staging topic held windows already.
    assert f"recomputing from {iso_utc(recompute_from)} (RECOMPUTE_FROM)" in recompute.log()
    assert "already published" not in recompute.log() and "the output holds every window" not in recompute.log()
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
    # What would change: each window, with the figures that differ (3 top IPs -> 10).
    assert dry.stdout.count("would copy window") == 5, dry.stdout
    for key in sorted(in_range)[:5]:
        assert f"would copy window {key}: changed (1 figure(s))\n    top_ips: [" in dry.stdout, dry.stdout
    shown = [line for line in dry.stdout.splitlines() if line.startswith("    top_ips: ")]
    assert len(shown) == 5 and all(
        [side.count(", ") + 1 for side in line.split(" -> ")] == [3, 10] for line in shown
    ), shown
    assert f"would copy 5 window(s) from {staging} to {topics.output}: 5 changed, 0 new, 0 same;" in dry.stdout
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
    again = run_module("ops.recompute", *args, "--dry-run", env=topics.env(), cwd=tmp_path)
    assert "would copy 5 window(s)" in again.stdout and "0 changed, 0 new, 5 same;" in again.stdout, again.stdout

    # Step 4, without kafka-topics.sh: the recomputation's topics and groups go, never the live ones.
    group = f"{topics.group}-recompute"
    leftovers = [staging, f"{staging}-partials", f"{topics.dlq}-recompute"]
    cleanup = ("--group", group, *(arg for topic in leftovers for arg in ("--topic", topic)))
    for wrong, named in [
        (("--group", group, "--topic", topics.output), f"{topics.output} is the live pipeline's OUTPUT_TOPIC"),
        (("--group", topics.group), f"{topics.group} is the live pipeline's group"),
        (
            ("--group", "someone-else", "--topic", staging),
            f"{staging} holds records of group {group}, not someone-else",
        ),
    ]:
        refused = run_module("ops.recompute_cleanup", *wrong, env=topics.env(), cwd=tmp_path)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr
    dry = run_module("ops.recompute_cleanup", *cleanup, "--dry-run", env=topics.env(), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert all(f"would delete topic {topic}" in dry.stdout for topic in leftovers), dry.stdout
    assert f"would delete group {group}\nwould delete group {group}-merge" in dry.stdout
    admin = AdminClient({"bootstrap.servers": topics.bootstrap})
    assert set(leftovers) <= set(admin.list_topics(timeout=10).topics)
    assert committed(topics.bootstrap, f"{group}-merge", f"{staging}-partials") >= 0
    done = run_module("ops.recompute_cleanup", *cleanup, env=topics.env(), cwd=tmp_path)
    assert done.returncode == 0 and "deleted 3 topic(s) and 2 group(s)" in done.stdout, (done.stdout, done.stderr)
    wait_until(lambda: not set(leftovers) & set(admin.list_topics(timeout=10).topics), 10, message="topics deleted")
    assert {topics.input, topics.output, topics.dlq} <= set(admin.list_topics(timeout=10).topics)
    assert committed(topics.bootstrap, group, topics.input) < 0  # the group's offsets are gone
    assert values(topics.bootstrap, topics.output) == after


def committed(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offset of partition 0 of `topic` (negative: none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 2})
    try:
        return consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        consumer.close()


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
    assert f"exported 6 record(s) to {exported}; left out: 2 a second copy of the same source record" in result.stderr
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
    # Their windows are published: each will count as late on its source partition.
    late = "counted as late in the next window that closes on partition"
    for number, line in enumerate(lines, 1):
        source = line["source"]
        said = next(text for text in dry.stdout.splitlines() if text.startswith(f"would send {source} (line {number})"))
        assert f": {late} {source.split('/')[1]} (window " in said, said
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


def test_two_overlapping_replays_send_each_source_once(topics, tmp_path, monkeypatch):
    """Run B reads the ledger, then stalls (a slow machine, a paused container) while run A
    replays the whole file and commits; B then carries on. B's reading is stale: only a
    read after its producer fenced every other run of this DLQ may decide what to send."""
    import threading

    import ops.dlq_replay as tool

    topics.create(input_partitions=2)
    now = int(time.time())
    exported = tmp_path / "dlq.jsonl"
    exported.write_text(
        "".join(
            json.dumps(
                {"source": f"{topics.input}/{i % 2}/{i}", "timestamp_ms": now * 1000, "value": login(i, now).decode()}
            )
            + "\n"
            for i in range(6)
        )
    )
    for name, value in topics.env().items():
        monkeypatch.setenv(name, value)

    ledger = f"{topics.dlq}-replayed"
    b_has_read, a_is_done = threading.Event(), threading.Event()
    real_read = tool.read_topic_tail

    def read(settings, topic, *args, **kwargs):
        records = real_read(settings, topic, *args, **kwargs)
        if topic == ledger and threading.current_thread().name == "replay-b":
            b_has_read.set()
            assert a_is_done.wait(60), "run A did not finish"
        return records

    monkeypatch.setattr(tool, "read_topic_tail", read)
    outcome: dict[str, object] = {}

    def run_b() -> None:
        try:
            outcome["b"] = tool.main(["replay", str(exported), "--env-file", ""])
        except SystemExit as exited:
            outcome["b"] = exited.code

    b = threading.Thread(target=run_b, name="replay-b")
    b.start()
    try:
        assert b_has_read.wait(60), "run B never read the ledger"
        assert tool.main(["replay", str(exported), "--env-file", ""]) == 0
    finally:
        a_is_done.set()
        b.join(90)
    assert not b.is_alive()

    replayed = [
        dict(m.headers())["dlq.replayed.from"].decode()
        for m in read_topic(topics.bootstrap, topics.input)
        if dict(m.headers() or []).get("dlq.replayed.from")
    ]
    assert sorted(replayed) == sorted(f"{topics.input}/{i % 2}/{i}" for i in range(6)), replayed
    assert outcome["b"] == 1  # it says it was overtaken; it sent nothing


def dead_letter_line(source: str, value: bytes, timestamp_ms: int) -> str:
    return json.dumps({"source": source, "reason": "test", "timestamp_ms": timestamp_ms, "value": value.decode()})


def replayed_sources(bootstrap: str, topic: str) -> list[str]:
    return [
        dict(m.headers())["dlq.replayed.from"].decode()
        for m in read_topic(bootstrap, topic)
        if dict(m.headers() or []).get("dlq.replayed.from")
    ]


def test_the_replay_says_where_each_record_will_be_counted(topics, tmp_path):
    """The window of its event time while that window is not on the output, else late in
    the next window closing on its source partition: what the processor does with a
    record carrying dlq.replayed.from (docs/semantics.md)."""
    from broker.pipeline_topics import output_headers
    from config import Settings

    topics.create(input_partitions=2)
    start = aligned_past(10)  # windows [start, start+30) and [start+30, start+60) are published
    settings = Settings(input_topic=topics.input, consumer_group_id=topics.group)
    published = Producer({"bootstrap.servers": topics.bootstrap, "log_level": 2})
    for window in (start, start + 30):
        published.produce(topics.output, key=iso_utc(window).encode(), value=b"{}", headers=output_headers(settings, 2))
    # Another pipeline's newer window on the same output says nothing about this one.
    published.produce(topics.output, key=iso_utc(start + 300).encode(), value=b"{}", headers=[("pipeline.group", b"x")])
    assert published.flush(10) == 0

    kafka_ms = (start + 100) * 1000
    exported = tmp_path / "dlq.jsonl"
    exported.write_text(
        "\n".join(
            [
                dead_letter_line(f"{topics.input}/0/1", login(1, start + 12), kafka_ms),  # published window: late
                dead_letter_line(f"{topics.input}/1/2", login(2, start + 45), kafka_ms),  # published window: late
                dead_letter_line(f"{topics.input}/1/3", login(3, start + 61), kafka_ms),  # not published
                dead_letter_line(f"{topics.input}/0/4", b'{"device_type": "iOS"}', kafka_ms),  # no time: Kafka's
            ]
        )
    )
    dry = run_module("ops.dlq_replay", "replay", str(exported), "--dry-run", env=topics.env(), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"({topics.output}: the window ending {iso_utc(start + 60)})" in dry.stdout, dry.stdout
    late = "counted as late in the next window that closes on partition"
    assert (
        f"would send {topics.input}/0/1 (line 1) -> {topics.input}: event time {iso_utc(start + 12)}: {late} 0"
        in dry.stdout
    )
    assert f"{topics.input}/1/2 (line 2) -> {topics.input}: event time {iso_utc(start + 45)}: {late} 1" in dry.stdout
    on_time = f"counted in window {iso_utc(start + 60)} (not published yet)"
    assert f"{topics.input}/1/3 (line 3) -> {topics.input}: event time {iso_utc(start + 61)}: {on_time}" in dry.stdout
    kafka_time = f"event time {iso_utc(start + 100)}: counted in window {iso_utc(start + 90)} (not published yet)"
    assert f"{topics.input}/0/4 (line 4) -> {topics.input}: {kafka_time}" in dry.stdout
    assert (
        f"  window {iso_utc(start + 60)}: 1 record(s)\n"
        f"  window {iso_utc(start + 90)}: 1 record(s)\n"
        "  late, in the next window that closes on partition 0: 1 record(s)\n"
        "  late, in the next window that closes on partition 1: 1 record(s)\n"
    ) in dry.stdout
    assert replayed_sources(topics.bootstrap, topics.input) == []


def test_a_value_the_processor_would_still_refuse_is_questioned_and_nothing_is_sent(topics, tmp_path):
    topics.create(input_partitions=2)
    now = int(time.time())
    exported = tmp_path / "dlq.jsonl"
    good = dead_letter_line(f"{topics.input}/0/1", login(1, now), now * 1000)
    exported.write_text(good + "\n" + dead_letter_line(f"{topics.input}/1/2", b"{not json", now * 1000) + "\n")
    for dry_run in (["--dry-run"], []):
        done = run_module("ops.dlq_replay", "replay", str(exported), *dry_run, env=topics.env(), cwd=tmp_path)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert f"question {topics.input}/1/2 (line 2) -> {topics.input}: not sent: the processor would refuse" in (
            done.stdout
        )
        [error] = [line for line in done.stderr.splitlines() if line.startswith("python -m ops.dlq_replay:")]
        assert error.startswith(f"python -m ops.dlq_replay: {exported}: 1 record(s) the processor would refuse again")
        assert "(line 2)" in error and "bad setting" not in error
    assert replayed_sources(topics.bootstrap, topics.input) == []
    # Fixed (here: its line deleted), the rest goes; the questioned source was never marked.
    exported.write_text(good + "\n")
    done = run_module("ops.dlq_replay", "replay", str(exported), env=topics.env(), cwd=tmp_path)
    assert done.returncode == 0 and "sent 1 record(s), skipped 0" in done.stdout, (done.stdout, done.stderr)
    assert replayed_sources(topics.bootstrap, topics.input) == [f"{topics.input}/0/1"]


def test_records_nobody_will_fix_can_be_set_aside_and_brought_back(topics, tmp_path):
    topics.create(input_partitions=2)
    now = int(time.time())
    copies = Producer({"bootstrap.servers": topics.bootstrap, "log_level": 2})
    for offset in range(3):
        headers = {
            "dlq.reason": "not valid JSON",
            "dlq.source.topic": topics.input,
            "dlq.source.partition": "0",
            "dlq.source.offset": str(offset),
            "dlq.source.timestamp": str(now * 1000),
        }
        copies.produce(topics.dlq, value=login(offset, now) + b" <- junk", headers=list(headers.items()))
    assert copies.flush(10) == 0

    def export(*extra: str) -> list[dict]:
        done = run_module("ops.dlq_replay", "export", "-", *extra, env=topics.env(), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    def run(*args: str) -> str:
        done = run_module("ops.dlq_replay", *args, env=topics.env(), cwd=tmp_path)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout

    lines = export()
    assert [line["source"] for line in lines] == [f"{topics.input}/0/{offset}" for offset in range(3)]
    unfixable = tmp_path / "unfixable.jsonl"
    unfixable.write_text(json.dumps(lines[2]) + "\n")
    assert "would discard 1 record(s)" in run("discard", str(unfixable), "--dry-run")
    assert len(export()) == 3  # a dry run changes nothing
    assert "discarded 1 record(s), skipped 0" in run("discard", str(unfixable))
    assert [line["source"] for line in export()] == [f"{topics.input}/0/{offset}" for offset in range(2)]
    assert [line["source"] for line in export("--discarded")] == [f"{topics.input}/0/2"]

    # The whole file replayed, fixed: the discarded one is skipped, saying why.
    fixed = tmp_path / "dlq.jsonl"
    fixed.write_text(
        "".join(json.dumps(line | {"value": line["value"].removesuffix(" <- junk")}) + "\n" for line in lines)
    )
    out = run("replay", str(fixed))
    assert f"skip {topics.input}/0/2: discarded" in out and "sent 2 record(s), skipped 1" in out, out
    # Replayed ones cannot be discarded; a discarded one is not discarded twice.
    assert run("discard", str(fixed)).splitlines() == [
        f"skip {topics.input}/0/0: already replayed",
        f"skip {topics.input}/0/1: already replayed",
        f"skip {topics.input}/0/2: discarded already",
        "discarded 0 record(s), skipped 3",
    ]
    assert export() == []

    # Undone: listed again, and replayable.
    assert "undiscarded 1 record(s)" in run("discard", str(unfixable), "--undo")
    assert [line["source"] for line in export()] == [f"{topics.input}/0/2"]
    assert "sent 1 record(s), skipped 2" in run("replay", str(fixed))
    assert sorted(replayed_sources(topics.bootstrap, topics.input)) == [
        f"{topics.input}/0/{offset}" for offset in range(3)
    ]
