"""Members' clocks do not shape the output (real processes, real brokers).

Whole processes run with their wall clock shifted, Python's and librdkafka's alike, by
an LD_PRELOAD shim (tests/clockshift.c: CLOCK_REALTIME, gettimeofday and time() moved
by CLOCKSHIFT_SECONDS; monotonic clocks and waits untouched), as on a machine whose
clock is off. On Apache Kafka the partials topic is stamped with the broker's time and
each member measures its offset from it (broker/broker_clock.py): three members 20 s
ahead, 20 s behind and 30 s ahead publish exactly one processor's windows. The
embedded broker does not stamp its time: there a member's own clock stands in, said
once in its log (a difference between the brokers, in docs/design.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from broker.embedded_broker import free_port
from testkit.oracle import expected_windows
from testkit.processes import ROOT, latest_by_key, wait_until
from tests.test_chaos import LiveStream

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="session")
def clockshift(tmp_path_factory) -> str:
    """tests/clockshift.c built as a shared library (cc is what builds the native parser too)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed (.ci/run installs gcc)"
    library = tmp_path_factory.mktemp("clockshift") / "clockshift.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(ROOT / "tests" / "clockshift.c"), "-ldl"],
        check=True,
    )
    return str(library)


def shifted(env: dict[str, str], library: str, seconds: float) -> dict[str, str]:
    return env | {"LD_PRELOAD": library, "CLOCKSHIFT_SECONDS": str(seconds)}


def clock_offset(port: int) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = [line.split()[-1] for line in text.splitlines() if line.startswith("login_processor_clock_offset_seconds ")]
    return float(found[0]) if found else None


def test_the_shim_shifts_a_whole_process_clock(clockshift):
    """The shim itself: Python's wall clock moves, its monotonic clock and sleeps do not."""
    probe = "import time; a, m = time.time(), time.monotonic(); time.sleep(0.2); print(a, time.monotonic() - m)"
    result = subprocess.run(
        ["python3", "-c", probe], env=shifted({}, clockshift, 3600), capture_output=True, text=True, check=True
    )
    wall, slept = map(float, result.stdout.split())
    assert abs(wall - time.time() - 3600) < 5
    assert 0.15 < slept < 1.0


@pytest.mark.both_brokers
def test_members_with_clocks_20s_apart_publish_one_processors_windows(topics, start_processor, clockshift):
    topics.create(input_partitions=4)
    # 10 s windows: clocks 20 and 30 s off are two and three windows off, and 35 s of
    # stream gives windows enough to see it (30 s windows needed 75 s: make test's budget).
    env = topics.env(ALLOWED_LATENESS_SECONDS="5", WINDOW_SECONDS="10")
    offsets = (20.0, -20.0, 30.0)
    ports = [free_port() for _ in offsets]
    members = [
        start_processor(shifted(env | {"METRICS_PORT": str(port)}, clockshift, offset))
        for port, offset in zip(ports, offsets, strict=True)
    ]
    for member in members:
        member.wait_for_log("assigned", timeout=60)
    stream = LiveStream(topics.bootstrap, topics.input, 4, per_second=100, seed=47).start()
    if topics.broker == "tansu":
        # No broker time to measure: each member's own clock stands in, and says so once,
        # however long it reads (the windows themselves are the Kafka variant's to show).
        for member in members:
            wait_until(lambda m=member: "does not stamp topic" in m.log(), 60, message="the no-broker-time line")
        time.sleep(10)
        stream.stop()
        for member in members:
            assert member.log().count("does not stamp topic") == 1, member.log()
        assert all(clock_offset(port) is None for port in ports)
        for member in members:
            assert member.terminate()[0] == 0
        return
    time.sleep(35)
    stream.stop()
    expected = expected_windows(stream.records, window=10)
    wait_until(
        lambda: {k: json.loads(v) for k, v in latest_by_key(topics.bootstrap, topics.output).items()} == expected,
        90,
        message="every window as one processor with a right clock publishes it",
    )
    measured = {offset: clock_offset(port) for port, offset in zip(ports, offsets, strict=True)}
    for offset, seen in measured.items():
        if seen is not None:  # a member without partitions publishes no part: nothing to measure
            assert abs(seen - offset) < 1.0, measured
    assert sum(seen is not None for seen in measured.values()) >= 2, measured
    ahead = members[offsets.index(30.0)]
    if measured[30.0] is not None:
        assert "more than 30s" in ahead.log() or measured[30.0] <= 30.0
    for member in members:
        assert member.terminate()[0] == 0
