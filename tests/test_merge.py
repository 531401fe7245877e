"""merge: per-partition parts summed into the contract's windows, byte for byte what one
processor counting every record publishes. No broker: parts are encoded and fed in
whatever order the partials topic could hold them."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.window_value import DEFAULT_MAX_DISTINCT, WindowTallies, iso_utc, render_window_value, tallies_for
from ingest.parsing import NATIVE_PARSER_AVAILABLE, parse_values
from merging.merge import MergedTallies, MergeStall, MergeState
from merging.parts import UNKNOWN_ORIGIN, decode_partial, encode_part, encode_progress
from testkit.oracle import expected_windows

W = 30
T0 = 1_800_000_000 - 1_800_000_000 % W
NOW = T0 + 10_000
TOP = 10
PATHS = ["pure", "native"] if NATIVE_PARSER_AVAILABLE else ["pure"]
_EMPTY = WindowTallies(0)


def login(t: int, **fields) -> bytes:
    record = {"user_id": "u1", "app_version": "2.3.0", "device_type": "android", "ip": "1.1.1.1"}
    record |= {"locale": "RU", "device_id": "d1", "timestamp": t} | fields
    return json.dumps(record).encode()


def windows_of(raws: list[bytes], kafka_s: list[int], native: bool, max_distinct: int = DEFAULT_MAX_DISTINCT):
    """{window start: (tallies or None, invalid count)}: how a processor counts these
    records, each window in one tallies (none of them late)."""
    batch, invalid = parse_values(raws, NOW, 300, lambda position: kafka_s[position], native=native)
    counted: dict[int, list] = {}
    for start in batch.window_counts(W):
        tallies = tallies_for(batch, max_distinct)
        tallies.add(batch, start, start + W)
        counted[start] = [tallies, 0]
    for item in invalid:
        seconds = kafka_s[item.position]
        counted.setdefault(seconds - seconds % W, [None, 0])[1] += 1
    return {start: (tallies, n) for start, (tallies, n) in sorted(counted.items())}


def single_processor(raws: list[bytes], kafka_s: list[int], native: bool) -> dict[bytes, bytes]:
    """What one processor owning every partition publishes: key -> value."""
    return {
        iso_utc(start).encode(): render_window_value(start, tallies or _EMPTY, invalid, 0, W, TOP)
        for start, (tallies, invalid) in windows_of(raws, kafka_s, native).items()
    }


def parts_of(
    raws, kafka_s, partition, partition_count, native, max_bytes=1 << 20, part_id=None, origin=UNKNOWN_ORIGIN
) -> list[bytes]:
    """Every piece of every part a partition's records make."""
    return [
        data
        for start, (tallies, invalid) in windows_of(raws, kafka_s, native).items()
        for data in encode_part(start, partition, partition_count, tallies, invalid, 0, max_bytes, part_id, origin)
    ]


class Feeder:
    """A MergeState and the partials topic it reads: each record at the next offset."""

    def __init__(self, state: MergeState | None = None) -> None:
        self.state = state or MergeState(W, TOP, DEFAULT_MAX_DISTINCT)
        self.offset = 0

    def __call__(self, *records: bytes) -> None:
        for data in records:
            self.state.add(decode_partial(data), self.offset)
            self.offset += 1

    def due(self) -> dict[bytes, bytes]:
        return {window.key: window.value for window in self.state.due_windows()}


def value(feeder: Feeder, start: int) -> dict:
    return json.loads(feeder.due()[iso_utc(start).encode()])


# ---- the key property ---------------------------------------------------------------------

_junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.lists(st.integers(), max_size=2))
_text = st.sampled_from(["android", "iOS", " iOS ", "", "  ", "unknown", "web", "1.1.1.1", "2.2.2.2", "é", "x" * 300])
_long = st.text(alphabet="0123456789abcdef", min_size=100, max_size=256)  # makes small pieces split
_field = st.one_of(_text, _text, _junk, st.just(...))
_id = st.one_of(_text, _text, _long, _junk, st.just(...))
_time = st.one_of(
    st.integers(0, 149).map(lambda d: T0 + d),
    st.integers(0, 149).map(lambda d: str(T0 + d)),
    st.integers(0, 149).map(lambda d: (T0 + d) * 1000),
    st.just("garbage"),
    st.just(...),
)
_row = st.fixed_dictionaries(
    {name: _field for name in ("user_id", "app_version", "device_type", "locale")}
    | {"ip": _id, "device_id": _id, "timestamp": _time}
)


@st.composite
def spread_records(draw):
    """Login records (and a few invalid ones), each on one of P partitions."""
    partitions = draw(st.integers(1, 6))
    rows = draw(st.lists(st.tuples(_row, st.integers(0, 5)), min_size=1, max_size=60))
    raws = [(json.dumps({k: v for k, v in row.items() if v is not ...}).encode(), p) for row, p in rows]
    raws += [(bad, draw(st.integers(0, 5))) for bad in draw(st.lists(st.sampled_from([b"{no", b"[1]", b"\xff"])))]
    # A burst of long distinct values in one window of one partition: parts that must be split.
    burst, owner, second = draw(st.integers(0, 60)), draw(st.integers(0, 5)), draw(st.integers(0, 149))
    long_ids = [(f"{i:03d}".ljust(250, "d"), f"{i:03d}".ljust(250, "i") if i % 2 else "1.1.1.1") for i in range(burst)]
    raws += [(login(T0 + second, device_id=device, ip=ip), owner) for device, ip in long_ids]
    return partitions, [(raw, p % partitions) for raw, p in raws]


def topic_order(per_partition: list[list[bytes]], rnd: random.Random) -> list[bytes]:
    """One order the partials topic could hold: each partition's records in its own order
    (parts before its progress), partitions interleaved at random."""
    queues = [list(records) for records in per_partition if records]
    merged = []
    while queues:
        queue = rnd.choice(queues)
        merged.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return merged


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(spread_records(), st.sampled_from([4096, 8192, 1 << 20]), st.randoms(use_true_random=False))
def test_merged_parts_are_byte_for_byte_what_one_processor_publishes(path, spread, max_bytes, rnd):
    native = path == "native"
    partitions, records = spread
    kafka_ms = [(T0 + 60 + i % 50) * 1000 for i in range(len(records))]
    raws = [raw for raw, _ in records]
    expected = single_processor(raws, [ms // 1000 for ms in kafka_ms], native)

    per_partition = []
    for p in range(partitions):
        mine = [i for i, (_, owner) in enumerate(records) if owner == p]
        pieces = parts_of(
            [raws[i] for i in mine], [kafka_ms[i] // 1000 for i in mine], p, partitions, native, max_bytes
        )
        pieces += rnd.sample(pieces, min(len(pieces), rnd.randint(0, 2)))  # producer retries: duplicates
        rnd.shuffle(pieces)  # pieces of different parts, any order: only progress comes last
        per_partition.append([*pieces, encode_progress(p, partitions, T0 + 300)])
    feeder = Feeder()
    feeder(*topic_order(per_partition, rnd))

    merged = feeder.due()
    assert merged == expected
    assert list(merged) == sorted(merged)  # oldest first
    oracle = expected_windows(list(zip(raws, kafka_ms, strict=True)), window=W, now=NOW, top=TOP)
    assert {key.decode(): json.loads(data) for key, data in merged.items()} == oracle
    feeder.state.mark_published([window.start for window in feeder.state.due_windows()])
    assert (feeder.state.pending_windows(), feeder.state.committable_offset()) == (0, feeder.offset)


def partition_in_window_order(raws, kafka_s, partition, partitions, native, max_bytes, rnd) -> list[bytes]:
    """What one partition's owner writes: its parts in window order, each part's pieces in
    any order (some twice) and overlapping the next part's (sends are pipelined: a part's
    first piece is written before the next part's, a later part may complete first),
    progress once a part is written, and now and then a replay of a part rebuilt from
    only some of its records (a crash after the part was acknowledged)."""
    keyed: list[tuple[float, bytes]] = []
    replayed = windows_of([raw for raw in raws if rnd.random() < 0.5], kafka_s, native)
    for k, (start, (tallies, invalid)) in enumerate(windows_of(raws, kafka_s, native).items()):
        pieces = encode_part(start, partition, partitions, tallies, invalid, 0, max_bytes)
        pieces += rnd.sample(pieces, min(len(pieces), rnd.randint(0, 1)))
        rnd.shuffle(pieces)
        keyed += [(k if n == 0 else k + 1.5 * rnd.random(), data) for n, data in enumerate(pieces)]
        if rnd.random() < 0.5:
            keyed.append((k + 1.5, encode_progress(partition, partitions, start + W)))
        if start in replayed and rnd.random() < 0.3:
            keyed += [
                (k + 1.6, data) for data in encode_part(start, partition, partitions, *replayed[start], 0, max_bytes)
            ]
    keyed.sort(key=lambda item: item[0])
    return [data for _, data in keyed] + [encode_progress(partition, partitions, T0 + 300)]


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=100, deadline=None)
@given(spread_records(), st.sampled_from([4096, 1 << 20]), st.randoms(use_true_random=False))
def test_a_merger_publishing_as_it_reads_publishes_every_window_once_and_never_early(path, spread, max_bytes, rnd):
    """The merger's loop: read a record, now and then publish what is due and mark it
    published. Each window goes out once, in order, with its final value."""
    native = path == "native"
    partitions, records = spread
    kafka_s = [T0 + 60 + i % 50 for i in range(len(records))]
    raws = [raw for raw, _ in records]
    expected = single_processor(raws, kafka_s, native)
    per_partition = []
    for p in range(partitions):
        mine = [i for i, (_, owner) in enumerate(records) if owner == p]
        mine_raws, mine_s = [raws[i] for i in mine], [kafka_s[i] for i in mine]
        per_partition.append(partition_in_window_order(mine_raws, mine_s, p, partitions, native, max_bytes, rnd))
    feeder = Feeder()
    published: list[tuple[bytes, bytes]] = []

    def publish() -> None:
        due = feeder.state.due_windows()
        published.extend((window.key, window.value) for window in due)
        feeder.state.mark_published([window.start for window in due])

    for record in topic_order(per_partition, rnd):
        feeder(record)
        if rnd.random() < 0.3:
            publish()
    publish()
    assert published == sorted(expected.items())
    assert (feeder.state.pending_windows(), feeder.state.committable_offset()) == (0, feeder.offset)


# ---- splitting --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_big_part_split_under_256_kib_merges_back_to_the_same_tallies(path):
    raws = [
        login(T0 + i % W, device_id=f"device-{i:07d}", ip=f"10.{i % 40_000 // 256}.{i % 256}.1") for i in range(50_000)
    ]
    [(tallies, invalid)] = windows_of(raws, [T0] * len(raws), native=path == "native").values()
    assert (len(tallies.device_ids()), len(tallies.ip_counts()), invalid) == (50_000, 40_000, 0)
    encoded = encode_part(T0, 0, 1, tallies, 0, 0, max_bytes=256 * 1024)
    assert len(encoded) > 1 and all(len(data) <= 256 * 1024 for data in encoded)

    merged = MergedTallies(DEFAULT_MAX_DISTINCT)
    for data in encoded:
        merged.add(decode_partial(data))
    assert merged.message_count == tallies.message_count == 50_000
    assert merged.device_ids() == tallies.device_ids()
    assert merged.ip_counts() == tallies.ip_counts()
    assert merged.profile_counts() == tallies.profile_counts()
    assert merged.missing_counts() == {k: n for k, n in tallies.missing_counts().items() if n}
    assert merged.capped() == tallies.capped() == set()
    assert merged.top_ips(TOP) == tallies.top_ips(TOP)

    feeder = Feeder()
    feeder(*reversed(encoded), encode_progress(0, 1, T0 + W))
    assert feeder.due() == {iso_utc(T0).encode(): render_window_value(T0, tallies, 0, 0, W, TOP)}


# ---- first part wins, duplicates, replays --------------------------------------------------------


class TestFirstPartWins:
    def test_a_rebuilt_part_with_fewer_records_is_ignored(self):
        records = [login(T0 + i, device_id=f"d{i}") for i in range(5)]
        first = parts_of(records, [T0] * 5, 0, 1, native=False)
        rebuilt = parts_of(records[3:], [T0] * 2, 0, 1, native=False)  # a replay from a later commit
        feeder = Feeder()
        feeder(*first, *rebuilt, encode_progress(0, 1, T0 + W))
        assert feeder.due() == single_processor(records, [T0] * 5, native=False)

    def test_the_first_part_to_be_complete_wins_not_the_first_piece_read(self):
        many = [login(T0 + 1, device_id=f"{i:0200d}") for i in range(60)]
        slow = parts_of(many, [T0] * 60, 0, 1, native=False, max_bytes=4096)
        quick = parts_of(many[:1], [T0], 0, 1, native=False, max_bytes=4096)
        assert len(slow) > 1 and len(quick) == 1
        feeder = Feeder()
        feeder(slow[0], *quick, *slow[1:], encode_progress(0, 1, T0 + W))
        assert value(feeder, T0)["message_count"] == 1

    def test_duplicate_pieces_count_once(self):
        records = [login(T0 + i, device_id=f"{i:0200d}") for i in range(40)]
        pieces = parts_of(records, [T0] * 40, 0, 1, native=False, max_bytes=4096)
        assert len(pieces) > 2
        feeder = Feeder()
        feeder(*pieces, *pieces[:2], pieces[0], encode_progress(0, 1, T0 + W))
        assert feeder.due() == single_processor(records, [T0] * 40, native=False)

    def test_two_publications_of_a_part_are_told_apart_by_part_id(self):
        records = [login(T0 + i % W, device_id=f"{i:0200d}") for i in range(40)]
        a = parts_of(records, [T0] * 40, 0, 1, native=False, max_bytes=4096)
        b = parts_of(records[:20], [T0] * 20, 0, 1, native=False, max_bytes=4096)
        feeder = Feeder()
        feeder(*a[:-1], *b[1:], b[0], a[-1])  # b completes first: b's counts, never a mix
        assert value(feeder, T0)["message_count"] == 20


# ---- when a window is due -------------------------------------------------------------------------


class TestDue:
    def test_a_window_waits_for_every_partition_to_close_it(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 3, native=False))
        feeder(*parts_of([login(T0 + 2)], [T0], 1, 3, native=False))
        assert feeder.due() == {}  # partition 2 has said nothing
        feeder(encode_progress(2, 3, T0))
        assert feeder.due() == {}  # partition 2 closed only windows ending at T0
        feeder(encode_progress(2, 3, T0 + W))
        assert value(feeder, T0)["message_count"] == 2

    def test_an_idle_partition_that_only_sends_progress_does_not_hold_windows(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1), login(T0 + 31)], [T0] * 2, 0, 2, native=False))
        feeder(encode_progress(1, 2, T0 + 60))  # partition 1: no record at all
        assert [json.loads(v)["message_count"] for v in feeder.due().values()] == [1, 1]

    def test_a_complete_part_closes_its_window_on_its_partition(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1), login(T0 + 31)], [T0] * 2, 0, 1, native=False))
        assert [w.start for w in feeder.state.due_windows()] == [T0, T0 + W]
        assert feeder.state.closed_until() == {0: T0 + 2 * W}

    def test_closed_until_never_moves_back(self):
        feeder = Feeder()
        feeder(encode_progress(0, 1, T0 + 90), encode_progress(0, 1, T0 + 30))
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 1, native=False))  # a replayed part
        assert feeder.state.closed_until() == {0: T0 + 90}

    def test_a_window_with_no_part_is_not_published(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 61)], [T0], 0, 2, native=False), encode_progress(1, 2, T0 + 90))
        assert [w.start for w in feeder.state.due_windows()] == [T0 + 60]  # T0, T0+30: nothing

    def test_a_part_of_only_invalid_records_is_published_like_a_single_processor_would(self):
        feeder = Feeder()
        feeder(*encode_part(T0, 0, 1, None, 2, 1, 4096), encode_progress(0, 1, T0 + W))
        assert feeder.due() == {iso_utc(T0).encode(): render_window_value(T0, _EMPTY, 2, 1, W, TOP)}

    def test_added_input_partitions_are_waited_for_from_the_first_record_that_reports_them(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 2, native=False), encode_progress(1, 2, T0 + W))
        assert len(feeder.due()) == 1
        feeder(encode_progress(1, 3, T0 + W))  # the input topic has three partitions now
        assert feeder.state.partition_count == 3 and feeder.due() == {}
        feeder(encode_progress(2, 3, T0 + W))
        assert len(feeder.due()) == 1

    def test_due_windows_changes_nothing_and_renders_once(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 1, native=False), encode_progress(0, 1, T0 + W))
        first, again = feeder.state.due_windows(), feeder.state.due_windows()
        assert first == again and first[0] is again[0]
        assert feeder.state.pending_windows() == 1 and feeder.state.published_until == 0

    def test_a_misaligned_part_is_skipped(self, caplog):
        feeder = Feeder(MergeState(60, TOP, DEFAULT_MAX_DISTINCT))  # publishers use 30 s windows
        feeder(*parts_of([login(T0 + 31)], [T0], 0, 1, native=False), encode_progress(0, 1, T0 + 120))
        assert feeder.due() == {} and "not aligned" in caplog.text


# ---- published windows, restore, offsets -------------------------------------------------------------


class TestPublishedAndOffsets:
    def test_pieces_of_a_published_window_are_ignored(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 1, native=False), encode_progress(0, 1, T0 + W))
        feeder.state.mark_published([T0])
        feeder(*parts_of([login(T0 + 2)], [T0], 0, 1, native=False))  # a replay, new part id
        assert (feeder.due(), feeder.state.pending_windows()) == ({}, 0)
        assert feeder.state.committable_offset() == feeder.offset

    def test_an_added_partitions_part_of_a_published_window_counts_late_once_however_often_it_is_made(self):
        """Partition 1 was added after window T0 was published from partition 0 alone: its
        part of T0 counts as late in the next window, once. A member that reads it again
        (its first reader crashed before committing) makes the part again, with a new part
        id: that is a replay, not more late records (fault schedule seed 1207 counted them
        twice)."""
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 1, native=False), encode_progress(0, 1, T0 + W))
        feeder.state.mark_published([T0])
        added = [login(T0 + 2, device_id="new1"), login(T0 + 3, device_id="new2")]
        feeder(*parts_of(added, [T0] * 2, 1, 2, native=False))
        feeder(*parts_of(added, [T0] * 2, 1, 2, native=False))  # made again from the same records
        feeder(*parts_of([login(T0 + 31)], [T0], 0, 2, native=False), encode_progress(0, 2, T0 + 2 * W))
        feeder(encode_progress(1, 2, T0 + 2 * W))
        window = value(feeder, T0 + W)
        assert (window["message_count"], window["late_message_count"]) == (1, 2)

    def test_restored_published_until_ignores_their_parts_for_good(self):
        feeder = Feeder()
        feeder.state.restore_published_until(T0 + W)
        feeder(*parts_of([login(T0 + 1), login(T0 + 31)], [T0] * 2, 0, 1, native=False))
        assert [w.start for w in feeder.state.due_windows()] == [T0 + W]
        assert feeder.state.published_until == T0 + W

    def test_restore_drops_windows_already_held(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1), login(T0 + 31)], [T0] * 2, 0, 1, native=False))
        feeder.state.restore_published_until(T0 + W)
        assert [w.start for w in feeder.state.due_windows()] == [T0 + W]

    def test_committable_offset_holds_the_lowest_piece_of_an_unpublished_window(self):
        feeder = Feeder()
        assert feeder.state.committable_offset() is None
        feeder(encode_progress(1, 2, T0 + W))  # offset 0: progress holds nothing
        assert feeder.state.committable_offset() == 1
        feeder(*parts_of([login(T0 + 1)], [T0], 0, 2, native=False))  # offset 1
        feeder(*parts_of([login(T0 + 31)], [T0], 0, 2, native=False))  # offset 2
        assert feeder.state.committable_offset() == 1
        assert [w.start for w in feeder.state.due_windows()] == [T0]
        assert feeder.state.committable_offset() == 1  # due is not published
        feeder.state.mark_published([T0])
        assert feeder.state.committable_offset() == 2
        assert feeder.state.published_until == T0 + W
        feeder(encode_progress(1, 2, T0 + 2 * W))
        feeder.state.mark_published([w.start for w in feeder.state.due_windows()])
        assert feeder.state.committable_offset() == 4

    def test_a_begun_part_holds_its_window_even_past_its_partitions_progress(self):
        many = [login(T0 + 1, device_id=f"{i:0200d}") for i in range(60)]
        orphan = parts_of(many, [T0] * 60, 0, 2, native=False, max_bytes=4096)[:1]  # its publisher died
        feeder = Feeder()
        feeder(*orphan, *parts_of(many[:3], [T0] * 3, 1, 2, native=False), encode_progress(0, 2, T0 + W))
        assert feeder.due() == {}  # publishing now would lose partition 0's records
        [(start, partition, received, pieces)] = feeder.state.incomplete_parts()
        assert (start, partition, received) == (T0, 0, 1) and pieces > 1
        assert feeder.state.committable_offset() == 0
        feeder(*parts_of(many, [T0] * 60, 0, 2, native=False))  # its successor's replay: complete, wins
        assert value(feeder, T0)["message_count"] == 63
        assert feeder.state.incomplete_parts() == []
        assert feeder.state.committable_offset() == 1  # the leftover can never win: it holds nothing
        feeder.state.mark_published([T0])
        assert feeder.state.committable_offset() == feeder.offset

    def test_a_later_window_waits_behind_one_waiting_for_a_part(self):
        many = [login(T0 + 1, device_id=f"{i:0200d}") for i in range(60)]
        begun = parts_of(many, [T0] * 60, 0, 1, native=False, max_bytes=4096)
        feeder = Feeder()
        feeder(begun[0], *parts_of([login(T0 + 31)], [T0], 0, 1, native=False), encode_progress(0, 1, T0 + 2 * W))
        assert feeder.due() == {}
        feeder(*begun[1:])
        assert [w.start for w in feeder.state.due_windows()] == [T0, T0 + W]

    def test_a_window_of_parts_that_count_nothing_is_dropped_once_closed(self):
        feeder = Feeder()
        feeder(*encode_part(T0, 0, 2, None, 0, 0, 4096))
        assert feeder.state.committable_offset() == 0
        feeder(encode_progress(1, 2, T0 + W))
        assert (feeder.due(), feeder.state.pending_windows(), feeder.state.committable_offset()) == ({}, 0, 2)

    def test_a_refused_window_stays_due_when_a_later_one_is_acknowledged(self):
        feeder = Feeder()
        feeder(*parts_of([login(T0 + 1), login(T0 + 31)], [T0] * 2, 0, 1, native=False))
        feeder.state.mark_published([T0 + W])
        assert [w.start for w in feeder.state.due_windows()] == [T0]
        assert feeder.state.published_until == T0 + 2 * W

    def test_newest_part_end_gives_the_merge_lag(self):
        feeder = Feeder()
        assert feeder.state.newest_part_end() is None
        feeder(*parts_of([login(T0 + 1), login(T0 + 95)], [T0] * 2, 0, 2, native=False))
        feeder(encode_progress(1, 2, T0 + W))
        feeder.state.mark_published([T0])
        assert feeder.state.newest_part_end() - feeder.state.published_until == 3 * W

    def test_the_partitions_a_window_waits_on_are_named(self):
        feeder = Feeder()
        feeder(encode_progress(0, 3, T0 + 2 * W))
        assert feeder.state.holding_partitions() == [1, 2]  # nothing from them yet
        feeder(encode_progress(1, 3, T0 + W), encode_progress(2, 3, T0 + 2 * W))
        assert feeder.state.holding_partitions() == [1]  # the one that closed the fewest
        feeder(encode_progress(1, 3, T0 + 2 * W))
        assert feeder.state.holding_partitions() == [0, 1, 2]


class TestMergeStall:
    """The operator's warning: newer parts in, nothing published for a while."""

    def test_warns_once_per_period_while_stuck_and_not_while_moving(self):
        stall = MergeStall(after_seconds=60)
        assert not stall.due(0, published_until=T0, windows_held=5)
        assert not stall.due(59, published_until=T0, windows_held=6)
        assert stall.due(60, published_until=T0, windows_held=6)
        assert not stall.due(100, published_until=T0, windows_held=6)  # said already
        assert stall.due(120, published_until=T0, windows_held=6)  # still stuck: again
        assert not stall.due(121, published_until=T0 + W, windows_held=5)  # it moved
        assert not stall.due(180, published_until=T0 + W, windows_held=5)
        assert stall.due(181, published_until=T0 + W, windows_held=5)

    def test_no_window_held_is_no_stall(self):
        stall = MergeStall(after_seconds=60)
        for now in range(0, 600, 30):  # a quiet input: parts stop, and so do windows
            assert not stall.due(now, published_until=T0 + W, windows_held=0)


# ---- bounds -------------------------------------------------------------------------------------------


class TestMergeBound:
    def test_past_the_bound_new_values_are_left_out_whatever_the_order_read(self):
        a = parts_of([login(T0 + 1, device_id=f"a{i}", ip=f"1.0.0.{i}") for i in range(3)], [T0] * 3, 0, 2, False)
        b = parts_of([login(T0 + 2, device_id=f"b{i}", ip=f"2.0.0.{i}") for i in range(3)], [T0] * 3, 1, 2, False)
        values = set()
        for order in ([*a, *b], [*b, *a]):
            feeder = Feeder(MergeState(W, TOP, max_distinct_per_window=4))
            feeder(*order)
            window = value(feeder, T0)
            assert (window["message_count"], window["unique_device_count"], window["unique_ip_count"]) == (6, 4, 4)
            assert window["capped_counts"] == ["top_ips", "unique_device_count", "unique_ip_count"]
            values.add(json.dumps(window))
        assert len(values) == 1

    def test_a_part_capped_on_its_partition_stays_capped_in_the_merge(self):
        records = [login(T0 + 1, device_id=f"d{i}") for i in range(5)]
        [(tallies, _)] = windows_of(records, [T0] * 5, native=False, max_distinct=2).values()
        feeder = Feeder()
        feeder(*encode_part(T0, 0, 1, tallies, 0, 0, 4096), encode_progress(0, 1, T0 + W))
        assert value(feeder, T0)["capped_counts"] == ["unique_device_count"]
