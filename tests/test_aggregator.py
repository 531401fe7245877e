"""aggregator: windows, watermark, late records, offsets and the exact window value.

A fake clock makes every closing decision deterministic.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import Aggregator
from core.window_value import ClosedWindow, iso_utc
from ingest.parsing import NATIVE_PARSER_AVAILABLE, parse_values
from merging.merge import MergeState
from testkit.oracle import expected_windows

W = 30
T0 = 1_800_000_000 - 1_800_000_000 % W  # a window start


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_aggregator(clock: FakeClock, partitions=(0,), lateness: int = 5, top_ips: int = 10) -> Aggregator:
    aggregator = Aggregator(window_seconds=W, allowed_lateness_seconds=lateness, top_ips=top_ips, clock=clock)
    aggregator.assign(partitions, total_partitions=len(partitions))
    return aggregator


def event(t: int, **fields) -> bytes:
    record = {"user_id": "u1", "app_version": "2.3.0", "device_type": "android", "ip": "1.1.1.1"}
    record |= {"locale": "RU", "device_id": "d1", "timestamp": t}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


_parser = {"native": False}


@pytest.fixture(autouse=True, scope="module", params=["pure", "native"] if NATIVE_PARSER_AVAILABLE else ["pure"])
def parser(request):
    """Every test here runs on both paths: the native batch and tallies must give the
    pure-Python answer (module scope, so that Hypothesis tests are run twice too)."""
    _parser["native"] = request.param == "native"
    yield request.param


def feed(aggregator: Aggregator, partition: int, first_offset: int, raws: list[bytes], now: float, kafka_s=None):
    """What the poll loop does for one partition run (parse, then add_batch)."""
    kafka_s = kafka_s or [int(now)] * len(raws)
    batch, invalid = parse_values(raws, now, 300, lambda position: kafka_s[position], native=_parser["native"])
    invalid_times = [kafka_s[item.position] for item in invalid]
    return aggregator.add_batch(partition, first_offset, first_offset + len(raws), batch, invalid_times)


def close(agg: Aggregator, acknowledge: bool = False) -> list[ClosedWindow]:
    """What the pipeline publishes for what `agg` closes now: its parts and progress,
    through the partials encoding, into the merge (one merge per aggregator)."""
    from merging.parts import decode_partial, encode_part, encode_progress

    merge = agg.__dict__.setdefault("test_merge", MergeState(W, agg.top_ips, agg.max_distinct_per_window))
    poll_loop_turn(agg)
    closed = agg.close_due_parts(
        lambda partition, start, window, accounted: encode_part(
            start,
            partition,
            agg.total_partitions,
            window.tallies,
            window.invalid_message_count,
            window.late_message_count,
            1 << 20,
            accounted_to=accounted,
        )
    )
    pieces = [piece for part in closed.parts for piece in part.pieces]
    pieces += [encode_progress(p, agg.total_partitions, until) for p, until in sorted(closed.progress.items())]
    for piece in pieces:
        offset = agg.__dict__["test_offset"] = agg.__dict__.get("test_offset", -1) + 1
        merge.add(decode_partial(piece), offset)
    if acknowledge:
        agg.acknowledge([(part.partition, part.start) for part in closed.parts])
    due = merge.due_windows()
    merge.mark_published([window.start for window in due])
    if acknowledge:  # and the output topic tells the processor what is published
        agg.release_published(merge.published_until)
    return due


def poll_loop_turn(agg: Aggregator) -> None:
    """What the poll loop does on every turn: a partition still read to its end is
    confirmed so again, now (the watermark's clock follows that confirmation)."""
    for partition, progress in agg.partition_summary().items():
        if progress.caught_up:
            agg.mark_caught_up(partition, progress.next_offset)


def values(closed) -> dict[str, dict]:
    return {w.key.decode(): json.loads(w.value) for w in closed}


class TestWindowing:
    def test_records_fall_in_epoch_aligned_windows(self):
        clock = FakeClock(T0 + 1000)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0), event(T0 + 29), event(T0 + 30), event(T0 + 61)], clock.now)
        agg.mark_caught_up(0, 4)
        closed = values(close(agg))
        assert [v["message_count"] for v in closed.values()] == [2, 1, 1]
        assert list(closed) == [iso_utc(T0), iso_utc(T0 + 30), iso_utc(T0 + 60)]
        assert closed[iso_utc(T0)]["window_end"] == iso_utc(T0 + 30)

    def test_window_closes_only_when_watermark_reaches_its_end(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock, lateness=5)
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 34)], clock.now)  # stream time end+4: not yet
        assert close(agg) == []
        feed(agg, 0, 2, [event(T0 + 35)], clock.now)  # stream time - lateness == end
        assert [w.key for w in close(agg)] == [iso_utc(T0).encode()]

    def test_lowest_active_partition_holds_the_watermark(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock, partitions=(0, 1))
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 500)], clock.now)
        feed(agg, 1, 0, [event(T0 + 2)], clock.now)  # partition 1 is behind
        assert close(agg) == []
        feed(agg, 1, 1, [event(T0 + 40)], clock.now)
        closed = values(close(agg))
        assert closed[iso_utc(T0)]["message_count"] == 2

    def test_caught_up_partition_does_not_hold_the_watermark(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock, partitions=(0, 1))
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 100)], clock.now)
        feed(agg, 1, 0, [event(T0 + 2)], clock.now)
        agg.mark_caught_up(1, 1)
        assert iso_utc(T0) in values(close(agg))

    def test_partition_not_read_yet_holds_the_watermark(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock, partitions=(0, 1))
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 100)], clock.now)
        assert close(agg) == []  # partition 1: no record, no EOF yet
        agg.mark_caught_up(1, 0)
        assert len(close(agg)) == 1

    def test_quiet_input_closes_by_wall_clock_minus_lateness(self):
        clock = FakeClock(T0 + 10)
        agg = make_aggregator(clock, lateness=5)
        feed(agg, 0, 0, [event(T0 + 1)], clock.now)
        agg.mark_caught_up(0, 1)
        clock.now = T0 + 34
        assert close(agg) == []
        clock.now = T0 + 35
        assert len(close(agg)) == 1

    def test_no_window_closes_while_some_partitions_belong_to_another_consumer(self):
        clock = FakeClock(T0 + 10_000)
        agg = Aggregator(W, 5, 10, clock=clock)
        agg.assign([0], total_partitions=2)
        feed(agg, 0, 0, [event(T0 + 1)], clock.now)
        agg.mark_caught_up(0, 1)
        assert close(agg) == []

    def test_backlog_is_many_windows_not_one(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        raws = [event(T0 + i) for i in range(0, 600)]  # ten minutes, one per second
        feed(agg, 0, 0, raws, clock.now)
        agg.mark_caught_up(0, len(raws))
        closed = values(close(agg))
        assert len(closed) == 20
        assert all(v["message_count"] == 30 for v in closed.values())


class TestLateAndInvalid:
    def test_late_record_is_counted_in_the_next_window_published(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 40)], clock.now)
        assert len(close(agg)) == 1  # window T0 closed
        late = feed(agg, 0, 2, [event(T0 + 2), event(T0 + 80)], clock.now)
        assert late == 1
        closed = values(close(agg))
        window = closed[iso_utc(T0 + 30)]
        assert window["late_message_count"] == 1
        assert window["message_count"] == 1  # the late record is not added anywhere

    def test_invalid_record_counts_in_window_of_its_kafka_timestamp(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 1), b"{oops", event(T0 + 61)], clock.now, kafka_s=[T0 + 1, T0 + 31, T0 + 61])
        agg.mark_caught_up(0, 3)
        closed = values(close(agg))
        assert closed[iso_utc(T0 + 30)] | {} == closed[iso_utc(T0 + 30)]
        assert closed[iso_utc(T0 + 30)]["invalid_message_count"] == 1
        assert closed[iso_utc(T0 + 30)]["message_count"] == 0
        assert closed[iso_utc(T0)]["invalid_message_count"] == 0

    def test_invalid_record_for_a_closed_window_goes_to_the_next_one(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 40)], clock.now)
        close(agg)
        feed(agg, 0, 2, [b"[]", event(T0 + 80)], clock.now, kafka_s=[T0 + 3, T0 + 80])
        closed = values(close(agg))
        assert closed[iso_utc(T0 + 30)]["invalid_message_count"] == 1

    def test_future_timestamp_does_not_close_windows_early(self):
        clock = FakeClock(T0 + 10)
        agg = make_aggregator(clock)
        far_future = int(clock.now) + 10_000
        feed(agg, 0, 0, [event(T0 + 1), event(far_future)], clock.now, kafka_s=[T0 + 2, T0 + 3])
        assert close(agg) == []
        clock.now = T0 + 35
        agg.mark_caught_up(0, 2)
        window = values(close(agg))[iso_utc(T0)]
        assert window["message_count"] == 2
        assert window["missing_field_counts"] == {"timestamp": 1}


class TestRestartAndRebalance:
    def test_replayed_records_of_published_windows_are_skipped_not_late(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        agg.restore_published_until(T0 + 30)
        late = feed(agg, 0, 0, [event(T0 + 1), event(T0 + 31), b"{bad"], clock.now, kafka_s=[T0 + 1, T0 + 31, T0 + 5])
        assert late == 0
        agg.mark_caught_up(0, 3)
        closed = values(close(agg))
        assert list(closed) == [iso_utc(T0 + 30)]
        assert closed[iso_utc(T0 + 30)]["late_message_count"] == 0
        assert closed[iso_utc(T0 + 30)]["invalid_message_count"] == 0

    def test_a_partition_added_since_the_newest_window_makes_parts_of_published_windows(self):
        """Window T0 was published merged from partition 0 alone; partition 1 was added
        since. Its records of T0 were counted in no window, and this member cannot know
        whether another member's part of them reached the merger already: it makes
        partition 1's part of T0, and the merger, which knows, counts it late once (a
        second such part is a replay). Counted late here as well, a replay of partition 1
        after a crash counted them twice (fault schedule seed 1207)."""
        clock = FakeClock(T0 + 10_000)
        agg = Aggregator(window_seconds=W, allowed_lateness_seconds=5, top_ips=10, clock=clock)
        agg.restore_published_until(T0 + W, partition_count=1)
        agg.assign([0, 1], total_partitions=2)
        late = feed(agg, 1, 0, [event(T0 + 1), event(T0 + 2), event(T0 + 31)], clock.now)
        late += feed(agg, 0, 0, [event(T0 + 3)], clock.now)  # a replay on partition 0: skipped
        assert late == 0
        agg.mark_caught_up(0, 1)
        agg.mark_caught_up(1, 3)
        made = []
        agg.close_due_parts(lambda p, start, window, _: made.append((p, start, window.tallies.message_count)) or [])
        assert sorted(made) == [(1, T0, 2), (1, T0 + W, 1)]

    def test_revoke_drops_open_state_and_replay_rebuilds_the_same_window(self):
        clock = FakeClock(T0 + 10_000)
        raws = [event(T0 + 1), event(T0 + 40, ip="2.2.2.2"), event(T0 + 45)]
        reference = make_aggregator(clock)
        feed(reference, 0, 0, raws, clock.now)
        reference.mark_caught_up(0, 3)
        expected = values(close(reference))

        agg = make_aggregator(clock)
        feed(agg, 0, 0, raws[:2], clock.now)
        first = values(close(agg))  # window T0 published
        agg.revoke_all()
        agg.assign([0], 1)
        feed(agg, 0, 0, raws, clock.now)  # replay from the committed offset 0
        agg.mark_caught_up(0, 3)
        assert first | values(close(agg)) == expected


class TestOffsets:
    def test_commit_holds_the_lowest_offset_of_open_unacknowledged_and_unpublished_windows(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock, partitions=(0, 1))
        feed(agg, 0, 100, [event(T0 + 1), event(T0 + 2)], clock.now)
        feed(agg, 0, 102, [event(T0 + 40)], clock.now)
        feed(agg, 1, 7, [event(T0 + 50)], clock.now)
        assert agg.committable_offsets() == {0: 100, 1: 7}
        agg.mark_caught_up(1, 8)
        closed = close(agg)  # closes window T0 (partition 0 at T0+40)
        assert [w.start for w in closed] == [T0]
        assert agg.committable_offsets() == {0: 100, 1: 7}  # not acknowledged yet
        agg.acknowledge([(0, T0)])
        assert agg.committable_offsets() == {0: 100, 1: 7}  # acknowledged, but not published yet
        agg.release_published(T0 + W)  # the output topic has the window
        assert agg.committable_offsets() == {0: 102, 1: 7}

    def test_a_part_the_merger_never_publishes_keeps_its_records_uncommitted(self):
        """A merger that refuses a part (made under other settings) never publishes its
        window: its records must be read again once the settings agree, so its offsets
        stay held however long the window waits."""
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        feed(agg, 0, 100, [event(T0 + 1)], clock.now)
        feed(agg, 0, 101, [event(T0 + 40)], clock.now)
        agg.mark_caught_up(0, 102)
        closed = agg.close_due_parts(lambda partition, start, window, accounted: [b"piece"])
        agg.acknowledge([(part.partition, part.start) for part in closed.parts])
        assert [part.start for part in closed.parts] == [T0, T0 + W]
        assert agg.committable_offsets() == {0: 100}
        agg.release_published(T0 + W)
        assert agg.committable_offsets() == {0: 101}
        agg.release_published(T0 + 2 * W)
        assert agg.committable_offsets() == {0: 102}

    def test_a_paused_member_closes_nothing_it_has_not_read(self):
        """Caught up as of the poll loop's last look, not as of the timer's clock: after
        a pause (a stopped or starved process) the timer must not close windows whose
        records arrived meanwhile and are not read yet."""
        clock = FakeClock(T0 + 20)
        agg = make_aggregator(clock, lateness=5)
        feed(agg, 0, 0, [event(T0 + 19)], clock.now)
        agg.mark_caught_up(0, 1)
        clock.now = T0 + 60  # the process was stopped for 40 s; the poll loop has not turned since
        assert agg.close_due_parts(lambda partition, start, window, accounted: [b"piece"]).parts == []
        agg.mark_caught_up(0, 1)  # the poll loop turned and found it still read to its end
        assert [part.start for part in agg.close_due_parts(lambda *_: [b"piece"]).parts] == [T0]

    def test_nothing_open_commits_next_offset_but_a_carried_late_count_holds_its_own(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 1)], clock.now)
        agg.mark_caught_up(0, 1)
        close(agg, acknowledge=True)
        assert agg.committable_offsets() == {0: 1}  # nothing open: the next offset
        assert feed(agg, 0, 1, [event(T0 + 3)], clock.now) == 1  # late: carried, no window open
        assert agg.committable_offsets() == {0: 1}  # the carry holds it, not next_offset 2


class TestWindowValue:
    def test_example_shape_and_ordering(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock, top_ips=2)
        raws = [
            event(T0 + 1, device_type="iOS", ip="9.9.9.9"),
            event(T0 + 2, device_type="android", ip="1.1.1.1", device_id="d2"),
            event(T0 + 3, device_type="android", ip="1.1.1.1", app_version="2.2.1", device_id="d2"),
            event(T0 + 4, device_type=None, ip="  ", locale=7, device_id=...),
            event(T0 + 5, device_type="android", ip="0.0.0.1", device_id="d3"),
        ]
        feed(agg, 0, 0, raws, clock.now)
        agg.mark_caught_up(0, len(raws))
        window = values(close(agg))[iso_utc(T0)]
        assert list(window) == [
            "schema_version",
            "window_start",
            "window_end",
            "message_count",
            "device_counts",
            "locale_counts",
            "unique_device_count",
            "app_version_by_device",
            "unique_ip_count",
            "top_ips",
            "missing_field_counts",
            "invalid_message_count",
            "late_message_count",
        ]
        assert window["device_counts"] == {"android": 3, "iOS": 1, "unknown": 1}
        assert list(window["device_counts"]) == ["android", "iOS", "unknown"]
        assert window["locale_counts"] == {"RU": 4, "unknown": 1}
        assert window["unique_device_count"] == 3  # d1, d2, d3; the missing one is not a device
        assert window["app_version_by_device"] == {
            "android": {"2.2.1": 1, "2.3.0": 2} | {"2.3.0": 2},
            "iOS": {"2.3.0": 1},
            "unknown": {"2.3.0": 1},
        }
        assert window["unique_ip_count"] == 3
        assert window["top_ips"] == [{"ip": "1.1.1.1", "count": 2}, {"ip": "0.0.0.1", "count": 1}]
        assert window["missing_field_counts"] == {"device_id": 1, "device_type": 1, "ip": 1, "locale": 1}

    def test_literal_unknown_and_missing_merge(self):
        clock = FakeClock(T0 + 10_000)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 1, device_type="unknown"), event(T0 + 2, device_type="")], clock.now)
        agg.mark_caught_up(0, 2)
        window = values(close(agg))[iso_utc(T0)]
        assert window["device_counts"] == {"unknown": 2}
        assert window["missing_field_counts"] == {"device_type": 1}


class TestDistinctBound:
    """MAX_DISTINCT_PER_WINDOW: memory stays bounded, and the value says which counts are lower bounds."""

    def bounded(self, clock: FakeClock, bound: int) -> Aggregator:
        aggregator = Aggregator(W, 5, 10, clock=clock, max_distinct_per_window=bound)
        aggregator.assign([0], total_partitions=1)
        return aggregator

    def test_at_the_bound_counts_are_exact_and_unflagged(self):
        clock = FakeClock(T0 + 10_000)
        agg = self.bounded(clock, 3)
        raws = [event(T0 + i, device_id=f"d{i % 3}", ip=f"10.0.0.{i % 3}") for i in range(6)]
        feed(agg, 0, 0, raws[:2], clock.now)
        feed(agg, 0, 2, raws[2:], clock.now)  # more records than room left: the per-value path, nothing left out
        agg.mark_caught_up(0, len(raws))
        window = values(close(agg))[iso_utc(T0)]
        assert (window["unique_device_count"], window["unique_ip_count"]) == (3, 3)
        assert "capped_counts" not in window

    def test_past_the_bound_new_values_are_left_out_and_flagged(self):
        clock = FakeClock(T0 + 10_000)
        agg = self.bounded(clock, 2)
        first = [event(T0 + 1, device_id="d1", ip="a"), event(T0 + 2, device_id="d2", ip="b")]
        later = [event(T0 + 3, device_id="d3", ip="c"), event(T0 + 4, device_id="d1", ip="a")]
        feed(agg, 0, 0, first, clock.now)
        feed(agg, 0, 2, later, clock.now)
        agg.mark_caught_up(0, 4)
        window = values(close(agg))[iso_utc(T0)]
        assert window["message_count"] == 4  # every record still counts
        assert window["device_counts"] == {"android": 4}
        assert (window["unique_device_count"], window["unique_ip_count"]) == (2, 2)
        assert window["top_ips"] == [{"ip": "a", "count": 2}, {"ip": "b", "count": 1}]  # "a" kept counting
        assert window["capped_counts"] == ["top_ips", "unique_device_count", "unique_ip_count"]


class TestProfileBound:
    """The distinct (device type, app version, locale) combinations of a window are bounded
    too: a client sending random device types must not grow a window without limit."""

    def test_a_flood_of_random_device_types_keeps_at_most_the_bound(self):
        clock = FakeClock(T0 + 10_000)
        agg = Aggregator(W, 5, 10, clock=clock, max_profiles_per_window=100)
        agg.assign([0], total_partitions=1)
        rnd = random.Random(7)
        raws = [event(T0 + i % 30, device_type="".join(rnd.choices("abcdef", k=200))) for i in range(5000)]
        for offset in range(0, len(raws), 1000):  # several batches: the bulk path, then the per-value one
            feed(agg, 0, offset, raws[offset : offset + 1000], clock.now)
        agg.mark_caught_up(0, len(raws))
        window = values(close(agg))[iso_utc(T0)]
        assert window["message_count"] == 5000  # every record still counts
        assert len(window["device_counts"]) == 100
        assert sum(len(versions) for versions in window["app_version_by_device"].values()) == 100
        assert window["capped_counts"] == sorted(
            ["device_counts", "locale_counts", "app_version_by_device", "missing_field_counts"]
        )

    def test_known_combinations_keep_counting_past_the_bound(self):
        clock = FakeClock(T0 + 10_000)
        agg = Aggregator(W, 5, 10, clock=clock, max_profiles_per_window=2)
        agg.assign([0], total_partitions=1)
        feed(agg, 0, 0, [event(T0 + 1, device_type="a"), event(T0 + 2, device_type="b")], clock.now)
        feed(agg, 0, 2, [event(T0 + 3, device_type="c"), event(T0 + 4, device_type="a")], clock.now)
        agg.mark_caught_up(0, 4)
        window = values(close(agg))[iso_utc(T0)]
        assert window["device_counts"] == {"a": 2, "b": 1}
        assert window["message_count"] == 4
        assert "device_counts" in window["capped_counts"]

    def test_at_the_bound_nothing_is_flagged(self):
        clock = FakeClock(T0 + 10_000)
        agg = Aggregator(W, 5, 10, clock=clock, max_profiles_per_window=2)
        agg.assign([0], total_partitions=1)
        feed(agg, 0, 0, [event(T0 + i, device_type="ab"[i % 2]) for i in range(6)], clock.now)
        agg.mark_caught_up(0, 6)
        window = values(close(agg))[iso_utc(T0)]
        assert window["device_counts"] == {"a": 3, "b": 3} and "capped_counts" not in window


class TestClosingIsTotal:
    """A window whose part cannot be made must never vanish: the error says which
    window, and its records stay uncommitted (it is never acknowledged), so the
    processor stops and the next run replays them."""

    def poisoned(self, clock: FakeClock) -> Aggregator:
        from core.columns import LoginColumns

        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 1), event(T0 + 31)], clock.now)
        # A value parsing never lets through (a lone surrogate), put in by hand: the
        # pure columns take any str, so this stands for any bug in value making.
        poison = LoginColumns([T0 + 62], [], [("\ud800", "1", "RU")], ["1.1.1.1"], ["d9"], [])
        agg.add_batch(0, 2, 3, poison)
        feed(agg, 0, 3, [event(T0 + 95)], clock.now)
        agg.mark_caught_up(0, 4)
        return agg

    def test_an_unrenderable_window_raises_and_its_records_stay_uncommitted(self):
        from core.window_value import WindowRenderError

        clock = FakeClock(T0 + 10_000)
        agg = self.poisoned(clock)
        assert agg.committable_offsets() == {0: 0}
        with pytest.raises(WindowRenderError, match=iso_utc(T0 + 60)):
            close(agg, acknowledge=True)  # nothing is acknowledged when encoding fails
        assert agg.committable_offsets() == {0: 0}
        close(agg, acknowledge=True)  # later windows, whatever happens to them...
        assert agg.committable_offsets() == {0: 0}  # ...never commit past the poisoned one

    def test_carried_counts_stay_held_when_rendering_fails(self):
        from core.columns import LoginColumns
        from core.window_value import WindowRenderError

        clock = FakeClock(T0 + 45)
        agg = make_aggregator(clock)
        feed(agg, 0, 0, [event(T0 + 20)], clock.now)
        agg.mark_caught_up(0, 1)
        assert len(close(agg, acknowledge=True)) == 1  # T0 closed by the wall clock
        feed(agg, 0, 1, [event(T0 + 2)], clock.now)  # late: carried to the next window closed
        agg.add_batch(0, 2, 3, LoginColumns([T0 + 31], [], [("\udfff", "", "")], [""], [""], []))
        agg.mark_caught_up(0, 3)
        clock.now = T0 + 100
        with pytest.raises(WindowRenderError):
            close(agg, acknowledge=True)
        assert agg.committable_offsets() == {0: 1}  # the late record's offset is still held


# Values of every type in every field: what the contract calls "missing".
_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)
)
_text = st.sampled_from(["android", "iOS", " iOS ", "", "  ", "unknown", "web", "1.1.1.1", "2.2.2.2", "é", "x" * 300])
_field = st.one_of(_text, _text, _junk, st.just(...))
_time = st.one_of(
    st.integers(0, 119).map(lambda d: T0 + d),
    st.integers(0, 119).map(lambda d: str(T0 + d)),
    st.integers(0, 119).map(lambda d: (T0 + d) * 1000),
    st.just("garbage"),
    st.just(...),
)


@st.composite
def workloads(draw):
    rows = draw(
        st.lists(
            st.fixed_dictionaries(
                {name: _field for name in ("user_id", "app_version", "device_type", "ip", "locale", "device_id")}
                | {"timestamp": _time}
            ),
            min_size=1,
            max_size=60,
        )
    )
    raws = [json.dumps({k: v for k, v in row.items() if v is not ...}).encode() for row in rows]
    raws += draw(st.lists(st.sampled_from([b"{nope", b"[1]", b"\xff"]), max_size=3))
    return raws


@settings(max_examples=150, deadline=None)
@given(workloads(), st.integers(1, 3), st.randoms(use_true_random=False))
def test_every_window_matches_the_oracle_whatever_the_batching(raws, partitions, rnd: random.Random):
    """Any split into partitions and batches gives exactly the oracle's values."""
    clock = FakeClock(T0 + 10_000)
    kafka_ms = [(T0 + 60 + i % 50) * 1000 for i in range(len(raws))]
    agg = make_aggregator(clock, partitions=tuple(range(partitions)), lateness=10_000)
    offsets = [0] * partitions
    order = list(range(len(raws)))
    rnd.shuffle(order)
    by_partition: dict[int, list[int]] = {p: [] for p in range(partitions)}
    for index in order:
        by_partition[index % partitions].append(index)
    for partition, indices in by_partition.items():
        while indices:
            size = rnd.randint(1, 7)
            batch, indices = indices[:size], indices[size:]
            feed(
                agg,
                partition,
                offsets[partition],
                [raws[i] for i in batch],
                clock.now,
                [kafka_ms[i] // 1000 for i in batch],
            )
            offsets[partition] += len(batch)
    for partition in range(partitions):
        agg.mark_caught_up(partition, offsets[partition])
    parsed_at = clock.now
    clock.now += 100_000  # input quiet, wall clock far past every window and the huge lateness
    closed = close(agg)
    expected = expected_windows(list(zip(raws, kafka_ms, strict=True)), window=W, now=parsed_at)
    assert values(closed) == expected
    for window in closed:  # same bytes as a canonical encoding of the oracle's value
        assert json.loads(window.value) == expected[window.key.decode()]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=80), st.booleans())
def test_time_ordered_and_shuffled_batches_split_at_window_edges_alike(offsets, shuffle):
    """One batch crossing several windows (edges, gaps, repeats), in order or not."""
    clock = FakeClock(T0 + 10_000)
    seconds = sorted(offsets)
    if shuffle:
        random.Random(len(seconds)).shuffle(seconds)
    raws = [event(T0 + d, ip=f"10.0.0.{d % 7}") for d in seconds]
    agg = make_aggregator(clock)
    feed(agg, 0, 0, raws, clock.now, kafka_s=[T0] * len(raws))
    agg.mark_caught_up(0, len(raws))
    expected = expected_windows([(raw, T0 * 1000) for raw in raws], window=W, now=clock.now)
    assert values(close(agg)) == expected


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=4), st.integers(1, 5), max_size=60), st.integers(1, 12))
def test_top_by_count_equals_a_full_sort(counts, n):
    from collections import Counter

    from core.window_value import _top_by_count

    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]
    assert _top_by_count(Counter(counts), n) == expected
