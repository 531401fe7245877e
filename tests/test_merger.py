"""merger: the merge stage's turns, driven through an in-memory Kafka (tests/fake_kafka.py)
for the faults a broker will not make on cue: a failed read of the output's tail at a
hand-over, a refused window, a newer format, another pipeline's records, parts made
under other settings, a stuck partition; and the operator's warning when the merge
stands still."""

from __future__ import annotations

import json
import logging
import signal
import time

import msgspec
import pytest

from broker.kafka_io import BrokerHealth
from broker.pipeline_topics import newest_published
from config import build_settings
from core.window_value import iso_utc
from merging.merge import MergeStall
from merging.merger import WindowMerger, pipeline_origin
from merging.parts import PARTS_FORMAT_VERSION, PartOrigin, encode_progress
from tests.fake_kafka import FakeClients, FakeCluster, Faults
from tests.test_chaos import merger_of
from tests.test_merge import T0, Feeder, W, login, parts_of, single_processor


def test_a_stalled_merge_names_the_partitions_it_waits_on(caplog):
    merger = MergerRig().merger
    feeder = Feeder()
    # Partition 0 closed three windows; partition 1 closed one; partition 2 sent the
    # first of two pieces of its part of the first window (its publisher died, say).
    feeder(*parts_of([login(T0 + 1), login(T0 + 61)], [T0] * 2, 0, 3, native=False))
    feeder(encode_progress(0, 3, T0 + 3 * W), encode_progress(1, 3, T0 + W))
    many = [login(T0 + 2, device_id=f"{i:03d}".ljust(250, "d")) for i in range(40)]
    pieces = parts_of(many, [T0] * 40, 2, 3, native=False, max_bytes=4096)
    assert len(pieces) > 1
    feeder(pieces[0])
    merger._state, merger._stall = feeder.state, MergeStall(after_seconds=0)
    with caplog.at_level(logging.WARNING, logger="merger"):
        merger._warn_if_stalled()  # the first look starts the clock
        merger._warn_if_stalled()
    [record] = [r for r in caplog.records if r.name == "merger"]
    text = record.getMessage()
    assert "waiting for input partition(s) 2 (no window closed there yet)" in text
    assert f"incomplete: partition 2 of window {iso_utc(T0)} (1 of {len(pieces)} pieces)" in text


# ---- the merger thread's turns, through an in-memory Kafka (tests/fake_kafka.py) ------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MergerRig:
    """A WindowMerger of pipeline ("in", "g") over a fake cluster: the test writes partials
    records, turns the merger, and reads the output topic."""

    def __init__(self, faults: Faults | None = None, **env: str) -> None:
        self.settings = build_settings(
            {"KAFKA_BOOTSTRAP_SERVERS": "fake:9", "INPUT_TOPIC": "in", "CONSUMER_GROUP_ID": "g"}
            | {"WINDOW_SECONDS": str(W)}
            | env
        )
        self.clock = Clock()
        self.cluster = FakeCluster(lambda: T0 + 10_000.0, faults or Faults(enabled=False))
        for topic in (self.settings.partials_topic, self.settings.output_topic):
            self.cluster.create_topic(topic, 1)
        self.clients = FakeClients(self.cluster)
        self.origin = pipeline_origin(self.settings)
        self.published: list[bytes] = []
        self.merger = WindowMerger(
            self.settings,
            consumer_config={},
            producer_config={},
            health=BrokerHealth(self.settings.bootstrap_servers, logging.getLogger("test")),
            newest_published=lambda: newest_published(self.settings, self.clients),
            on_published=lambda window, _at: self.published.append(window.key),
            host="host",
            clients=self.clients,
            clock=self.clock,
        )
        self.merger.subscribe()

    def write(self, *records: bytes) -> None:
        for data in records:
            self.cluster.append(self.settings.partials_topic, 0, b"k", data)

    def parts(self, records, partition: int, count: int, **kw) -> list[bytes]:
        kw.setdefault("origin", self.origin)
        return parts_of(records, [T0] * len(records), partition, count, native=False, **kw)

    def progress(self, partition: int, count: int, until: int, origin=None) -> bytes:
        return encode_progress(partition, count, until, origin or self.origin)

    def turns(self, n: int = 3, seconds: float = 3.0) -> None:
        for _ in range(n):
            self.merger.turn(0)
            self.clock.now += seconds

    def output(self) -> list[tuple[bytes, dict]]:
        return [(m.key(), json.loads(m.value())) for m in self.cluster.logs[self.settings.output_topic][0]]

    def committed(self) -> int | None:
        return self.cluster.committed.get((f"{self.settings.consumer_group_id}-merge", self.settings.partials_topic, 0))


def test_a_new_merger_that_cannot_read_the_output_tail_waits_and_asks_again():
    """The hand-over hole: a window already published, then (after the partials commit)
    only a part rebuilt from a replay of its later records. Taking "unknown" for "nothing
    published" would publish it again with fewer records, over the right value."""
    faults = Faults(tail_read_fails=1.0)
    rig = MergerRig(faults)
    records = [login(T0 + i, device_id=f"d{i}") for i in range(5)]
    right = single_processor(records, [T0] * 5, native=False)[iso_utc(T0).encode()]
    rig.cluster.append(rig.settings.output_topic, 0, iso_utc(T0).encode(), right)  # published before
    rig.write(*rig.parts(records[3:], 0, 1), rig.progress(0, 1, T0 + W))  # a replay's rebuilt part
    rig.turns(4)
    assert rig.output() == [(iso_utc(T0).encode(), json.loads(right))]  # nothing published while unknown
    assert rig.committed() is None  # and nothing committed
    faults.tail_read_fails = 0.0
    rig.turns(3)
    assert [value for _, value in rig.output()] == [json.loads(right)]  # the rebuilt part was ignored
    assert rig.committed() == 2


def test_a_refused_window_holds_every_later_one():
    faults = Faults(topics={"device-login-aggregates"}, deliveries=["refuse"])
    rig = MergerRig(faults)
    first, second = [login(T0 + 1)], [login(T0 + W + 1, device_id="d2")]
    rig.write(*rig.parts(first, 0, 1), *rig.parts(second, 0, 1), rig.progress(0, 1, T0 + 2 * W))
    rig.merger.turn(0)  # assigned; reads the (empty) output tail next turn
    rig.merger.turn(0)  # the first window is refused
    assert rig.output() == []  # and the second was not produced behind it
    assert (rig.committed() or 0) == 0  # nothing committed past the first window's part
    rig.clock.now += 5
    rig.turns(2)
    assert [key for key, _ in rig.output()] == [iso_utc(T0).encode(), iso_utc(T0 + W).encode()]
    assert rig.published == [iso_utc(T0).encode(), iso_utc(T0 + W).encode()]


def test_a_newer_format_makes_it_leave_the_merge_not_exit(caplog):
    rig = MergerRig()
    rig.write(msgspec.msgpack.encode(["part", PARTS_FORMAT_VERSION + 1, "whatever", "layout"]))
    with caplog.at_level(logging.ERROR, logger="merger"):
        rig.turns(2)
    assert rig.merger.left_the_merge and not rig.merger.is_merger and not rig.merger.failed.is_set()
    assert "newer than this processor's" in caplog.text and "leaving the merge" in caplog.text
    assert rig.merger.skipped["newer_format"] == 1
    assert rig.merger not in rig.cluster.group("g-merge").members or rig.merger._consumer not in (
        rig.cluster.group("g-merge").members
    )


def test_another_pipelines_records_are_skipped_counted_and_logged_once_a_minute(caplog):
    rig = MergerRig()
    theirs = PartOrigin("in", "other-group", rig.origin.shaping)
    mine = [login(T0 + 1)]
    rig.write(*rig.parts([login(T0 + 2, device_id="x")], 0, 1, origin=theirs), rig.progress(0, 1, T0 + W, theirs))
    rig.write(*rig.parts(mine, 0, 1), rig.progress(0, 1, T0 + W))
    with caplog.at_level(logging.WARNING, logger="merger"):
        rig.turns(3)
    assert [value for _, value in rig.output()] == [
        json.loads(single_processor(mine, [T0], False)[iso_utc(T0).encode()])
    ]
    assert rig.merger.skipped["other_pipeline"] == 2
    lines = [r.getMessage() for r in caplog.records if "another pipeline" in r.getMessage()]
    assert len(lines) == 1 and "group 'other-group'" in lines[0]


def test_parts_made_under_another_window_length_are_never_merged_and_hold_the_windows(caplog):
    rig = MergerRig()
    sixty = PartOrigin("in", "g", rig.origin.shaping | {"WINDOW_SECONDS": 60})
    rig.write(*rig.parts([login(T0 + 1)], 0, 2))
    rig.write(*rig.parts([login(T0 + 2, device_id="x")], 1, 2, origin=sixty), rig.progress(1, 2, T0 + 60, sixty))
    rig.write(rig.progress(0, 2, T0 + 60))
    with caplog.at_level(logging.ERROR, logger="merger"):
        rig.turns(3)
    assert rig.output() == []  # nothing published from a mix
    assert "WINDOW_SECONDS=60 (this merger: 30)" in caplog.text
    assert rig.committed() is None or rig.committed() <= 1  # not past the first refused record
    # Partition 1's owner restarts with this merger's settings and publishes its part again.
    again = [login(T0 + 2, device_id="x")]
    rig.write(*rig.parts(again, 1, 2), rig.progress(1, 2, T0 + W))
    rig.turns(3)
    assert [key for key, _ in rig.output()] == [iso_utc(T0).encode()]
    assert rig.output()[0][1]["message_count"] == 2


def test_memory_stays_bounded_while_a_partition_is_stuck_and_nothing_is_lost():
    """Partition 1's member is stuck: partition 0 closes 40 windows. The merger holds at
    most 5 of them; when partition 1's new owner writes its parts (at the end of the
    topic), every window comes out, as one processor would publish them."""
    rig = MergerRig(MERGE_MAX_PENDING_WINDOWS="5")
    zero = [login(T0 + k * W + 1, device_id=f"a{k}") for k in range(40)]
    one = [login(T0 + k * W + 2, device_id=f"b{k}") for k in range(40)]
    for k in range(40):
        rig.write(*parts_of([zero[k]], [T0 + k * W], 0, 2, native=False, origin=rig.origin))
    rig.write(rig.progress(0, 2, T0 + 40 * W))
    held = []
    for _ in range(6):
        rig.turns(1)
        held.append(rig.merger.pending_windows())
    assert max(held) <= 5 and rig.output() == []
    for k in range(40):  # the new owner of partition 1 replays it
        rig.write(*parts_of([one[k]], [T0 + k * W], 1, 2, native=False, origin=rig.origin))
    rig.write(rig.progress(1, 2, T0 + 40 * W))
    for _ in range(40):
        rig.turns(1)
        held.append(rig.merger.pending_windows() or 0)
    assert max(held) <= 5
    expected = single_processor(zero + one, [T0 + k * W for k in range(40)] * 2, native=False)
    assert {key: json.dumps(value) for key, value in rig.output()} == {
        key: json.dumps(json.loads(value)) for key, value in expected.items()
    }
    assert [key for key, _ in rig.output()] == sorted(expected)  # once each, in order


# ---- real broker: memory while a member is stopped ----------------------------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _pending_windows(port: int) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = [
        line.split()[-1] for line in text.splitlines() if line.startswith("login_processor_merge_pending_windows ")
    ]
    return float(found[0]) if found else None


@pytest.mark.broker
@pytest.mark.slow
def test_the_merger_stays_bounded_while_a_member_is_stopped_and_loses_nothing(topics, start_processor):
    """Two members; the one that does not merge is SIGSTOPped for 16 s, within its 20 s
    session, so nobody takes its partitions: 1-second windows pile up behind it. The
    merger holds at most 3 (MERGE_MAX_PENDING_WINDOWS), says why in its log, and its
    memory stays flat; once the member resumes, every window is exact."""
    from broker.embedded_broker import free_port
    from testkit.oracle import expected_windows
    from testkit.processes import latest_by_key, wait_until
    from tests.test_chaos import LiveStream

    topics.create(input_partitions=4)
    env = topics.env(
        WINDOW_SECONDS="1",
        ALLOWED_LATENESS_SECONDS="1",
        KAFKA_SESSION_TIMEOUT_MS="20000",
        MERGE_MAX_PENDING_WINDOWS="3",
    )
    ports = [free_port(), free_port()]
    members = [start_processor(env | {"METRICS_PORT": str(port)}) for port in ports]
    for member in members:
        member.wait_for_log("assigned partitions", timeout=60)  # each owns some of them
    merger = wait_until(lambda: merger_of(members), 30, message="a merger")
    stopped = next(m for m in members if m is not merger)
    port = ports[members.index(merger)]
    stream = LiveStream(topics.bootstrap, topics.input, 4, per_second=2000, seed=3, long_values=True).start()
    time.sleep(3)
    stopped.process.send_signal(signal.SIGSTOP)
    samples = []
    for _ in range(16):
        time.sleep(1)
        samples.append((_rss_mb(merger.process.pid), _pending_windows(port)))
    stopped.process.send_signal(signal.SIGCONT)
    time.sleep(3)
    stream.stop()
    assert "its bound (MERGE_MAX_PENDING_WINDOWS 3" in merger.log()
    assert "waiting for input partition(s)" in merger.log()
    pending = [p for _, p in samples if p is not None]
    assert pending and max(pending) <= 3, samples
    rss = [r for r, _ in samples]
    assert max(rss[4:]) - rss[4] < 3, f"merger RSS (MB) while windows waited: {rss}"  # unbounded: +6 to +8
    expected = expected_windows(stream.records, window=1)
    wait_until(
        lambda: {k: json.loads(v) for k, v in latest_by_key(topics.bootstrap, topics.output).items()} == expected,
        60,
        message="every window, exact",
    )
    for member in members:
        assert member.terminate()[0] == 0


def test_a_new_merger_says_exactly_which_windows_are_published_and_where_it_resumes(caplog):
    """'windows up to 21:01:00Z already published' was followed by the merger publishing
    21:01:00Z itself: it named the end of the newest window, read as its start. The line
    now names the newest window on the output by its start, and the first one to come."""
    rig = MergerRig()
    rig.cluster.append(rig.settings.output_topic, 0, iso_utc(T0).encode(), b"{}")  # the newest window: T0
    with caplog.at_level(logging.INFO, logger="merger"):
        rig.turns(2)
    expected = (
        f"this processor is now the merger: the output holds every window up to the one starting {iso_utc(T0)};"
        f" it publishes from {iso_utc(T0 + W)} on"
    )
    assert expected in caplog.text


# ---- a partition added to the input, met at a hand-over or while a window is in flight ---------


def _published_before(rig: MergerRig, records: list[bytes], partitions: int) -> None:
    """Window T0 of `records` on the output already, merged from `partitions` partitions."""
    value = single_processor(records, [T0] * len(records), native=False)[iso_utc(T0).encode()]
    headers = [("pipeline.input", b"in"), ("pipeline.group", b"g"), ("pipeline.partitions", str(partitions).encode())]
    rig.cluster.append(rig.settings.output_topic, 0, iso_utc(T0).encode(), value, headers=headers)


def _counted(rig: MergerRig) -> int:
    return sum(value["message_count"] + value["late_message_count"] for _, value in rig.output())


def test_a_new_partitions_part_of_a_published_window_read_at_a_hand_over_counts_as_late():
    """Window T0 was published from one partition; partition 1 was added since, and its
    part of T0 waits on the partials topic. A new merger that read it before it knew what
    the output holds merged it into T0 as a normal part, then forgot it with T0: its
    records were counted nowhere. They count as late in the next window."""
    rig = MergerRig()
    _published_before(rig, [login(T0 + 1)], partitions=1)
    added = [login(T0 + 2, device_id="new1"), login(T0 + 3, device_id="new2")]
    rig.write(*rig.parts(added, 1, 2), rig.progress(1, 2, T0 + W))
    later = [login(T0 + W + 1, device_id="p0")]
    rig.write(*parts_of(later, [T0 + W], 0, 2, native=False, origin=rig.origin), rig.progress(0, 2, T0 + 2 * W))
    rig.write(rig.progress(1, 2, T0 + 2 * W))
    rig.turns(4)
    [(key, value)] = [(k, v) for k, v in rig.output() if k != iso_utc(T0).encode()]
    assert key == iso_utc(T0 + W).encode()
    assert (value["message_count"], value["late_message_count"]) == (1, 2)


def test_the_same_while_the_output_tail_cannot_be_read_at_first():
    faults = Faults(tail_read_fails=1.0)
    rig = MergerRig(faults)
    _published_before(rig, [login(T0 + 1)], partitions=1)
    rig.write(*rig.parts([login(T0 + 2, device_id="new1")], 1, 2), rig.progress(1, 2, T0 + W))
    rig.turns(4)  # reads, but cannot learn what is published
    faults.tail_read_fails = 0.0
    later = [login(T0 + W + 1, device_id="p0")]
    rig.write(*parts_of(later, [T0 + W], 0, 2, native=False, origin=rig.origin), rig.progress(0, 2, T0 + 2 * W))
    rig.write(rig.progress(1, 2, T0 + 2 * W))
    rig.turns(4)
    assert [k for k, _ in rig.output()] == [iso_utc(T0).encode(), iso_utc(T0 + W).encode()]
    assert rig.output()[1][1]["late_message_count"] == 1


def test_a_late_acknowledgement_records_the_partition_count_the_window_was_merged_with():
    """Window T0 is produced from one partition and acknowledged a turn late, after a
    record reporting a second partition: noted as merged from two, partition 1's part of
    T0 was then taken for a replay and dropped. It counts as late in the next window."""
    faults = Faults(topics={"device-login-aggregates"}, deliveries=["delay"])
    rig = MergerRig(faults)
    rig.write(*rig.parts([login(T0 + 1)], 0, 1), rig.progress(0, 1, T0 + W))
    rig.turns(2)  # assigned; then T0 is produced, its acknowledgement delayed
    assert rig.output() == [] and rig.merger._in_flight is not None
    rig.write(rig.progress(1, 2, 0))  # partition 1 appears (it has closed nothing yet)
    rig.turns(1)  # the acknowledgement comes
    assert [k for k, _ in rig.output()] == [iso_utc(T0).encode()]
    rig.write(*rig.parts([login(T0 + 2, device_id="new")], 1, 2), rig.progress(1, 2, T0 + 2 * W))
    rig.write(*parts_of([login(T0 + W + 1)], [T0 + W], 0, 2, native=False, origin=rig.origin))
    rig.write(rig.progress(0, 2, T0 + 2 * W))
    rig.turns(3)
    assert [k for k, _ in rig.output()] == [iso_utc(T0).encode(), iso_utc(T0 + W).encode()]
    assert _counted(rig) == 3


def test_a_part_that_arrives_while_its_window_is_in_flight_is_not_forgotten_with_it():
    faults = Faults(topics={"device-login-aggregates"}, deliveries=["delay"])
    rig = MergerRig(faults)
    rig.write(*rig.parts([login(T0 + 1)], 0, 1), rig.progress(0, 1, T0 + W))
    rig.turns(2)  # T0 produced from one partition, not acknowledged yet
    rig.write(*rig.parts([login(T0 + 2, device_id="new")], 1, 2), rig.progress(1, 2, T0 + W))
    rig.turns(1)  # the new partition's part of T0 is read, then T0 is acknowledged
    rig.write(*parts_of([login(T0 + W + 1)], [T0 + W], 0, 2, native=False, origin=rig.origin))
    rig.write(rig.progress(0, 2, T0 + 2 * W), rig.progress(1, 2, T0 + 2 * W))
    rig.turns(3)
    assert [k for k, _ in rig.output()] == [iso_utc(T0).encode(), iso_utc(T0 + W).encode()]
    assert rig.output()[0][1]["message_count"] == 1  # T0 as produced
    assert _counted(rig) == 3
