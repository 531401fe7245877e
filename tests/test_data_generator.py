"""data_generator: the reference profile's shape, the realistic profile's mix, a real run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from data_generator import US_STATES, RealisticProfile, event_times, reference_event
from testkit.processes import ROOT, read_topic, run_script, wait_until


def test_reference_profile_matches_the_original_generator():
    rng = random.Random(1)
    events = [json.loads(reference_event(rng, 1_700_000_000 + i)) for i in range(4000)]
    assert len(US_STATES) == 50
    assert all(e["app_version"] == "2.3.0" and e["locale"] in US_STATES for e in events)
    assert all(uuid.UUID(e["user_id"]).version == 4 and uuid.UUID(e["device_id"]).version == 4 for e in events)
    assert len({e["device_id"] for e in events}) == len(events)  # every device id is fresh
    assert all(type(e["timestamp"]) is int for e in events)
    assert all(len(e["ip"].split(".")) == 4 for e in events)
    without_device_type = sum("device_type" not in e for e in events) / len(events)
    assert 0.03 < without_device_type < 0.07
    assert {e["device_type"] for e in events if "device_type" in e} == {"android", "iOS"}


def test_realistic_profile_has_returning_devices_heavy_ips_and_some_bad_data():
    rng = random.Random(2)
    profile = RealisticProfile(rng, devices=500)
    raws = [profile.event(rng, 1_700_000_000) for _ in range(20_000)]
    parsed = []
    invalid = 0
    for raw in raws:
        try:
            value = json.loads(raw)
        except ValueError:
            invalid += 1
            continue
        if isinstance(value, dict):
            parsed.append(value)
        else:
            invalid += 1
    assert 0 < invalid < 200  # a small rate of malformed records
    assert len({e["device_id"] for e in parsed}) <= 500  # devices come back
    top_ip_share = Counter(e.get("ip") for e in parsed).most_common(10)
    assert sum(count for _, count in top_ip_share) / len(parsed) > 0.1  # a few heavy hitters
    assert any(isinstance(e["timestamp"], str) for e in parsed)  # some string timestamps
    assert len({e.get("app_version") for e in parsed if e.get("device_type") == "android"}) >= 2


def test_backlog_times_are_spread_over_the_past_in_order():
    time_of = event_times(count=100, backlog_seconds=600, now=10_000)
    times = [time_of(i) for i in range(100)]
    assert times == sorted(times) and times[0] == 9_400 and times[-1] < 10_000


def test_times_since_a_moment_advance_at_the_rate_so_two_runs_join_without_a_hole():
    backlog = event_times(count=2400, backlog_seconds=0, now=0, since=9_880.0, rate=20)
    live = event_times(count=0, backlog_seconds=0, now=0, since=10_000.0, rate=20)
    seconds = [backlog(i) for i in range(2400)] + [live(i) for i in range(100)]
    assert seconds == sorted(seconds)
    assert Counter(seconds) == dict.fromkeys(range(9_880, 10_005), 20)


@pytest.mark.parametrize("extra", [("--backlog-seconds", "60", "--count", "10"), ("--rate", "0")])
def test_since_without_a_rate_to_advance_at_is_one_line_and_exit_2(tmp_path, extra):
    result = run_script("data_generator.py", "--since", "1000", *extra, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--since needs a --rate above 0 and no --backlog-seconds")
    assert "Traceback" not in result.stderr


def test_help_lists_only_what_the_generator_reads_with_defaults(tmp_path):
    result = run_script("data_generator.py", "--help", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for flag in ("--profile", "--rate", "--count", "--backlog-seconds", "--since", "--seed", "--bootstrap-servers"):
        assert flag in text
    assert "--input-topic VALUE topic of login events (default: user-login; env INPUT_TOPIC)" in text
    assert "--input-partitions" in text  # it may be first to create the input topic
    for processor_only in ("--window-seconds", "--output-topic", "--metrics-port", "--consumer-group-id"):
        assert processor_only not in text
    assert "(default: realistic)" in text and "(default: 0 = run forever)" in text


@pytest.mark.broker
def test_generator_produces_its_count_to_a_real_broker(topics, tmp_path):
    generator_args = ("--count", "500", "--backlog-seconds", "60", "--seed", "3")
    result = run_script("data_generator.py", *generator_args, env=topics.env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_topic(topics.bootstrap, topics.input)) == 500


def test_stopped_before_ever_reaching_the_broker_exits_3(tmp_path):
    """Issue 18, item 8 (for the generator too): 0 would read as a clean run."""
    from broker.embedded_broker import free_port

    log_path = tmp_path / "generator.log"
    with open(log_path, "w") as log:
        generator = subprocess.Popen(
            [sys.executable, str(ROOT / "data_generator.py"), "--bootstrap-servers", f"127.0.0.1:{free_port()}"],
            env={"PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
            stderr=log,
        )
    try:
        wait_until(lambda: "unreachable" in log_path.read_text(), 20, message="the unreachable broker's line")
        generator.send_signal(signal.SIGINT)
        assert generator.wait(15) == 3
        assert "never reached the broker" in log_path.read_text()
    finally:
        if generator.poll() is None:
            generator.kill()
            generator.wait()
