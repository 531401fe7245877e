"""parts: the partials topic's format. Round trips, the same content whatever the order, the version check,
and parts split into pieces that each fit the broker's message size."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.columns import pack_device_ids, pack_ip_counts
from core.window_value import PROFILE_FIELDS, tallies_for
from ingest.parsing import NATIVE_PARSER_AVAILABLE, parse_values
from merging import parts
from merging.parts import (
    MIN_PIECE_BYTES,
    PARTS_FORMAT_VERSION,
    BadPartialRecord,
    PartPiece,
    Progress,
    UnknownPartFormat,
    decode_partial,
    encode_part,
    encode_progress,
    part_key,
    progress_key,
)

W = 30
T0 = 1_800_000_000 - 1_800_000_000 % W
PATHS = ["pure", "native"] if NATIVE_PARSER_AVAILABLE else ["pure"]


class FakeTallies:
    """Any content, through the WindowTallies reading API."""

    def __init__(self, profiles=None, device_ids=(), ips=None, missing=None, capped=(), message_count=None):
        self._profiles = dict(profiles or {})
        self._device_ids = set(device_ids)
        self._ips = dict(ips or {})
        self._missing = dict(missing or {})
        self._capped = set(capped)
        self.message_count = sum(self._profiles.values()) if message_count is None else message_count

    def profile_counts(self):
        return dict(self._profiles)

    def device_ids(self):
        return set(self._device_ids)

    def ip_counts(self):
        return dict(self._ips)

    def missing_counts(self):
        return dict(self._missing)

    def capped(self):
        return set(self._capped)

    def pack_values(self):
        return pack_device_ids(self._device_ids), pack_ip_counts(self._ips)


def counted(raws: list[bytes], native: bool):
    """Tallies of every record of `raws` (the way the aggregator counts one window)."""
    batch, _ = parse_values(raws, T0 + 10_000, 300, lambda position: T0, native=native)
    tallies = tallies_for(batch, 1_000_000)
    tallies.add(batch, T0, T0 + W)
    return tallies


def login(i: int, **fields) -> bytes:
    record = {"user_id": f"u{i}", "app_version": "2.3.0", "device_type": "android", "ip": f"10.0.{i % 3}.{i % 7}"}
    record |= {"locale": "RU", "device_id": f"d{i % 11}", "timestamp": T0 + i % W} | fields
    return json.dumps(record).encode()


def joined(pieces: list[PartPiece]) -> dict:
    """The content of a part's pieces, put back together."""
    return {
        "message_count": sum(p.message_count for p in pieces),
        "profiles": sorted(item for p in pieces for item in p.profiles),
        "device_ids": sorted(value for p in pieces for value in p.device_ids),
        "ip_counts": sorted(item for p in pieces for item in p.ip_counts),
        "missing": pieces[0].missing,
        "capped": pieces[0].capped,
        "invalid": sum(p.invalid_message_count for p in pieces),
        "late": sum(p.late_message_count for p in pieces),
    }


class TestRoundTrip:
    @pytest.mark.parametrize("path", PATHS)
    def test_a_part_decodes_to_its_tallies(self, path):
        odd = json.loads(login(40, device_type=None, ip=" ", user_id=7))
        del odd["device_id"]
        raws = [login(i) for i in range(40)] + [json.dumps(odd).encode()]
        tallies = counted(raws, native=path == "native")
        [data] = encode_part(T0, 2, 4, tallies, invalid=3, late=1, max_bytes=1 << 20)
        piece = decode_partial(data)
        assert isinstance(piece, PartPiece)
        assert (piece.version, piece.window_start, piece.partition, piece.partition_count) == (2, T0, 2, 4)
        assert (piece.piece, piece.pieces, piece.message_count) == (0, 1, 41)
        assert (piece.invalid_message_count, piece.late_message_count) == (3, 1)
        assert {(d, v, loc): n for d, v, loc, n in piece.profiles} == tallies.profile_counts()
        assert sorted(piece.device_ids) == sorted(tallies.device_ids())  # in the tables' order
        assert dict(piece.ip_counts) == tallies.ip_counts()
        assert piece.missing == {"device_id": 1, "ip": 1, "user_id": 1}  # zeros left out
        assert piece.capped == []

    def test_a_part_without_tallies_carries_only_invalid_and_late_counts(self):
        [data] = encode_part(T0, 0, 1, None, invalid=2, late=5, max_bytes=MIN_PIECE_BYTES)
        piece = decode_partial(data)
        assert (piece.message_count, piece.profiles, piece.device_ids, piece.ip_counts) == (0, [], [], [])
        assert (piece.invalid_message_count, piece.late_message_count, piece.missing) == (2, 5, {})

    def test_capped_names_travel_sorted(self):
        tallies = FakeTallies({("a", "", ""): 1}, capped={"unique_ip_count", "top_ips"})
        [data] = encode_part(T0, 0, 1, tallies, 0, 0, MIN_PIECE_BYTES)
        assert decode_partial(data).capped == ["top_ips", "unique_ip_count"]

    def test_progress(self):
        record = decode_partial(encode_progress(3, 6, T0 + 90))
        assert record == Progress(version=PARTS_FORMAT_VERSION, partition=3, partition_count=6, closed_until=T0 + 90)

    @pytest.mark.parametrize("path", PATHS)
    def test_same_content_whatever_the_order_counted(self, path):
        """Values travel in the tables' order (the merge unions and sums them): the
        content, not the bytes, is the same however the records were counted."""
        raws = [login(i) for i in range(60)]
        [first] = encode_part(T0, 0, 1, counted(raws, path == "native"), 0, 0, 1 << 20, part_id="p")
        [again] = encode_part(T0, 0, 1, counted(raws[::-1], path == "native"), 0, 0, 1 << 20, part_id="p")
        a, b = decode_partial(first), decode_partial(again)
        assert sorted(a.device_ids) == sorted(b.device_ids) and sorted(a.ip_counts) == sorted(b.ip_counts)
        assert (a.profiles, a.message_count, a.missing) == (b.profiles, b.message_count, b.missing)

    def test_each_publication_has_its_own_part_id(self):
        tallies = FakeTallies({("a", "", ""): 1})
        ids = {decode_partial(encode_part(T0, 0, 1, tallies, 0, 0, 1 << 20)[0]).part_id for _ in range(3)}
        assert len(ids) == 3


V = PARTS_FORMAT_VERSION


class TestVersionAndDamage:
    def test_another_version_of_the_same_layout_is_refused(self):
        newer = msgspec.structs.replace(decode_partial(encode_progress(0, 1, T0)), version=V + 1)
        with pytest.raises(UnknownPartFormat, match=f"version {V + 1}"):
            decode_partial(msgspec.msgpack.encode(newer))

    @pytest.mark.parametrize("tag", ["part", "progress"])
    def test_another_version_of_another_layout_is_refused_not_called_damage(self, tag):
        with pytest.raises(UnknownPartFormat) as raised:
            decode_partial(msgspec.msgpack.encode([tag, 7, {"something": "else"}]))
        assert raised.value.version == 7

    def test_a_newer_version_that_only_appends_fields_is_still_refused(self):
        record = msgspec.msgpack.decode(encode_progress(0, 1, T0))
        with pytest.raises(UnknownPartFormat):
            decode_partial(msgspec.msgpack.encode(["progress", V + 1, *record[2:], "new field"]))

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"\xc1",
            b'{"json": true}',
            msgspec.msgpack.encode(["other", V, 0]),
            msgspec.msgpack.encode(["progress", V, 0]),  # too short
            msgspec.msgpack.encode(["progress", V, "0", 1, T0]),  # wrong type
            msgspec.msgpack.encode(["progress", V, 3, 3, T0]),  # partition 3 of 3
            msgspec.msgpack.encode(["progress", str(V), 0, 1, T0]),
            msgspec.msgpack.encode({"version": V}),
        ],
    )
    def test_damaged_records_are_bad_records(self, data):
        with pytest.raises(BadPartialRecord):
            decode_partial(data)

    def test_a_piece_numbered_past_its_part_is_a_bad_record(self):
        [data] = encode_part(T0, 0, 1, None, 1, 0, MIN_PIECE_BYTES, part_id="p")
        fields = msgspec.msgpack.decode(data)
        fields[6] = fields[7]  # piece == pieces
        with pytest.raises(BadPartialRecord):
            decode_partial(msgspec.msgpack.encode(fields))


class TestSplitting:
    def test_pieces_fit_and_only_piece_zero_has_the_additive_counts(self):
        tallies = FakeTallies(
            {(f"device-{i}", "1.0", "RU"): 2 for i in range(300)},
            device_ids=[f"id-{i:06d}" for i in range(3000)],
            ips={f"10.1.{i // 250}.{i % 250}": i + 1 for i in range(3000)},  # tallies never count 0
            missing={"ip": 4, "user_id": 0},
            capped={"top_ips"},
            message_count=600,
        )
        encoded = encode_part(T0, 1, 2, tallies, invalid=7, late=8, max_bytes=8192, part_id="p")
        pieces = [decode_partial(data) for data in encoded]
        assert len(pieces) >= 8 and all(len(data) <= 8192 for data in encoded)
        assert [p.piece for p in pieces] == list(range(len(pieces)))
        assert {p.pieces for p in pieces} == {len(pieces)}
        assert all(p.device_ids or p.ip_counts or p.profiles for p in pieces)
        assert pieces[0].profiles and len(pieces[0].profiles) == 300  # profiles fill piece 0 first
        for p in pieces[1:]:
            assert (p.message_count, p.invalid_message_count, p.late_message_count, p.missing, p.capped) == (
                0,
                0,
                0,
                {},
                [],
            )
        assert joined(pieces) == {
            "message_count": 600,
            "profiles": sorted((d, v, loc, n) for (d, v, loc), n in tallies.profile_counts().items()),
            "device_ids": sorted(tallies.device_ids()),
            "ip_counts": sorted(tallies.ip_counts().items()),
            "missing": {"ip": 4},
            "capped": ["top_ips"],
            "invalid": 7,
            "late": 8,
        }

    def test_pieces_are_filled_close_to_the_bound(self):
        tallies = FakeTallies(device_ids=[f"{i:040d}" for i in range(10_000)])
        encoded = encode_part(T0, 0, 1, tallies, 0, 0, max_bytes=16_384)
        # Packed values move in chunks of 1/64 of a piece: a piece is filled to within one.
        assert all(16_384 - 16_384 // 32 <= len(data) <= 16_384 for data in encoded[:-1])

    def test_a_bound_too_small_for_a_value_is_refused(self):
        with pytest.raises(ValueError, match="at least"):
            encode_part(T0, 0, 1, None, 0, 0, max_bytes=MIN_PIECE_BYTES - 1)
        with pytest.raises(ValueError, match="cannot fit"):
            encode_part(T0, 0, 1, FakeTallies(device_ids=["x" * 5000]), 0, 0, max_bytes=MIN_PIECE_BYTES)

    def test_the_largest_values_fit_in_the_smallest_piece(self):
        value = "\U0001f600" * 256  # 256 characters of 4 bytes each
        tallies = FakeTallies(
            {(value, value, value): 1, (value, value, ""): 2},
            device_ids=[value, value[:-1]],
            ips={value: 3},
            missing={"user_id": 1, "device_id": 2, "ip": 3, "timestamp": 4},
            capped={*PROFILE_FIELDS, "unique_device_count", "unique_ip_count", "top_ips"},
        )
        encoded = encode_part(T0, 0, 1, tallies, 10**9, 10**9, max_bytes=MIN_PIECE_BYTES)
        assert all(len(data) <= MIN_PIECE_BYTES for data in encoded)
        assert joined([decode_partial(data) for data in encoded])["device_ids"] == sorted([value, value[:-1]])


_value = st.text(min_size=1, max_size=256)
_content = st.fixed_dictionaries(
    {
        "profiles": st.dictionaries(st.tuples(st.text(max_size=256), _value, st.just("")), st.integers(1, 10**6)),
        "device_ids": st.sets(_value, max_size=80),
        "ips": st.dictionaries(_value, st.integers(1, 2**40), max_size=80),
        "small_ids": st.integers(0, 3000),  # many short values: pieces filled to the last byte
        "message_count": st.integers(0, 2**40),
        "missing": st.dictionaries(st.sampled_from(["user_id", "device_id", "ip", "timestamp"]), st.integers(0, 2**40)),
        "capped": st.sets(st.sampled_from([*PROFILE_FIELDS, "unique_device_count", "unique_ip_count", "top_ips"])),
        "invalid": st.integers(0, 2**40),
        "late": st.integers(0, 2**40),
    }
)


@settings(max_examples=150, deadline=None)
@given(_content, st.integers(MIN_PIECE_BYTES, 40_000))
def test_any_content_splits_into_fitting_pieces_that_join_back(content, max_bytes):
    device_ids = content["device_ids"] | {f"{i:x}" for i in range(content["small_ids"])}
    tallies = FakeTallies(
        content["profiles"],
        device_ids,
        content["ips"],
        content["missing"],
        content["capped"],
        message_count=content["message_count"],
    )
    encoded = encode_part(T0, 5, 6, tallies, content["invalid"], content["late"], max_bytes, part_id="p" * 32)
    pieces = [decode_partial(data) for data in encoded]
    assert all(len(data) <= max_bytes for data in encoded)
    assert [p.piece for p in pieces] == list(range(len(pieces)))
    assert joined(pieces)["profiles"] == sorted((*key, n) for key, n in content["profiles"].items())
    assert joined(pieces)["device_ids"] == sorted(device_ids)
    assert joined(pieces)["ip_counts"] == sorted(content["ips"].items())
    assert joined(pieces)["missing"] == {name: n for name, n in sorted(content["missing"].items()) if n}
    assert joined(pieces)["capped"] == sorted(content["capped"])
    assert [joined(pieces)[name] for name in ("message_count", "invalid", "late")] == [
        content["message_count"],
        content["invalid"],
        content["late"],
    ]


def test_keys_name_the_window_and_partition():
    assert part_key(T0, 3) == f"{parts.iso_utc(T0)}/3".encode()
    assert part_key(1_795_633_200, 3) == b"2026-11-25T19:00:00Z/3"
    assert progress_key(5) == b"progress/5"


class TestPackedValues:
    """Device ids and IP counts travel packed; both paths make and read the same format."""

    @staticmethod
    def empty(path: str, bound: int = 1_000_000):
        from core.window_value import WindowTallies

        if path == "native":
            import _login_columns

            return _login_columns.WindowTallies(bound)
        return WindowTallies(bound)

    @pytest.mark.parametrize("packer", PATHS)
    @pytest.mark.parametrize("reader", PATHS)
    def test_values_packed_on_one_path_are_read_on_the_other(self, packer, reader):
        tallies = counted([login(i) for i in range(60)] + [login(61, device_id="é-ü", ip="::1")], packer == "native")
        devices, ips = tallies.pack_values()
        merged = self.empty(reader)
        merged.add_packed(devices, ips)
        merged.add_packed(devices, ips)  # a second part with the same values
        assert merged.device_ids() == tallies.device_ids()
        assert merged.ip_counts() == {ip: 2 * n for ip, n in tallies.ip_counts().items()}
        assert merged.capped() == set()

    @pytest.mark.parametrize("reader", PATHS)
    def test_the_bound_holds_when_merging(self, reader):
        tallies = counted([login(i) for i in range(60)], native=False)
        merged = self.empty(reader, bound=3)
        merged.add_packed(*tallies.pack_values())
        assert merged.unique_device_count() == 3 and merged.unique_ip_count() == 3
        assert merged.capped() == {"unique_device_count", "unique_ip_count", "top_ips"}

    @pytest.mark.parametrize("reader", PATHS)
    @pytest.mark.parametrize(
        ("devices", "ips"),
        [(b"\x05\x00ab", b""), (b"\x00\x00", b""), (b"", b"\x01\x00a\x00\x00\x00\x00\x00\x00\x00\x00"), (b"\x01", b"")],
    )
    def test_malformed_packed_values_are_refused(self, reader, devices, ips):
        with pytest.raises(ValueError, match="malformed"):
            self.empty(reader).add_packed(devices, ips)
