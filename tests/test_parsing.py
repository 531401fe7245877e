"""parsing: decoding, event times and column cleaning, held to the contract's input rules."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.window_value import tallies_for
from ingest.parsing import (
    ALL_FIELDS,
    NATIVE_PARSER_AVAILABLE,
    LoginRecord,
    clean_strings,
    decode_records,
    event_time_of,
    event_times,
    kafka_time_of,
    parse_values,
    regular_record_type,
    to_columns,
)

if NATIVE_PARSER_AVAILABLE:
    import _login_columns

NOW = 1_800_000_000
SKEW = 300


class TestDecodeRecords:
    def test_valid_objects_decode_and_unknown_keys_are_ignored(self):
        records, positions, invalid = decode_records([b'{"ip": "1.2.3.4", "extra": [1]}', b"{}"])
        assert [r.ip for r in records] == ["1.2.3.4", ""]  # absent: "", the missing marker
        assert positions is None  # all valid: no position list built
        assert invalid == []

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "not a JSON object"),
            (b"null", "not a JSON object"),
            (b'"text"', "not a JSON object"),
            (b'{"ip": "\xff"}', "not valid UTF-8"),
            (b"\xff\xfe", "not valid JSON"),
            (None, "empty record"),
            (b"", "not valid JSON"),
            (b'{"ip": NaN}', "not valid JSON"),
            (b'{"timestamp": 1e400, "ip": Infinity}', "not valid JSON"),
            (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ],
    )
    def test_invalid_records_are_reported_with_reason(self, raw, reason):
        records, positions, invalid = decode_records([b"{}", raw, b"{}"])
        assert len(records) == 2
        assert positions == [0, 2]
        assert len(invalid) == 1 and invalid[0].position == 1
        assert reason in invalid[0].reason

    def test_object_with_number_msgspec_cannot_hold_is_still_an_object(self):
        records, _, invalid = decode_records([b'{"timestamp": 1e400, "ip": "9.9.9.9"}'])
        assert invalid == []
        assert records[0].ip == "9.9.9.9"
        assert event_time_of(records[0].timestamp, NOW, SKEW) is None  # inf is not a time

    def test_duplicate_keys_take_the_last_value_like_json_loads(self):
        records, _, _ = decode_records([b'{"ip": 1, "ip": "x"}'])
        assert records[0].ip == json.loads(b'{"ip": 1, "ip": "x"}')["ip"]


class TestLoneSurrogates:
    """A lone surrogate escape makes a record invalid wherever it is and whatever comes
    before it. (It used to depend on the key order: msgspec refuses the escape, but a
    number it cannot hold (1e400) seen first sent the record to json.loads, which
    accepts it, and its window could then not be written as UTF-8.)"""

    HOSTILE = ("\\ud800", "\\udfff", "a\\udc00b", "\\ud83d x")
    OTHERS = {"ip": "1e400", "timestamp": "1700000005", "locale": '"RU"'}

    def records(self, field: str, escape: str) -> list[bytes]:
        """Every key order of the hostile field with the other members (1e400 among them)."""
        import itertools

        members = [(name, value) for name, value in self.OTHERS.items() if name != field]
        members.append((field, f'"{escape}"'))
        return [
            ("{" + ", ".join(f'"{name}": {value}' for name, value in order) + "}").encode()
            for order in itertools.permutations(members)
        ]

    @pytest.mark.parametrize("native", [False, True] if NATIVE_PARSER_AVAILABLE else [False])
    @pytest.mark.parametrize("field", [*ALL_FIELDS, "unused_key"])
    def test_invalid_in_every_field_and_every_key_order(self, field, native):
        for escape in self.HOSTILE:
            raws = self.records(field, escape)
            batch, invalid = parse_values(raws, NOW, SKEW, lambda position: NOW, native=native)
            assert len(batch) == 0, (field, escape, raws)
            assert [item.position for item in invalid] == list(range(len(raws)))
            assert all(item.reason.startswith("not valid JSON") for item in invalid)

    @pytest.mark.parametrize("native", [False, True] if NATIVE_PARSER_AVAILABLE else [False])
    def test_in_a_key_or_nested_value_too(self, native):
        raws = [
            b'{"ip": 1e400, "\\ud800": 1}',
            b'{"ip": 1e400, "extra": {"deep": ["x", "\\udfff"]}}',
            b'{"timestamp": 1e400, "device_type": "\\ud800"}',
        ]
        batch, invalid = parse_values(raws, NOW, SKEW, lambda position: NOW, native=native)
        assert len(batch) == 0 and len(invalid) == 3

    @pytest.mark.parametrize("native", [False, True] if NATIVE_PARSER_AVAILABLE else [False])
    def test_a_surrogate_pair_is_one_valid_character(self, native):
        raw = b'{"ip": 1e400, "device_type": "\\ud83d\\ude00", "timestamp": 1700000005}'
        batch, invalid = parse_values([raw], NOW, SKEW, lambda position: NOW, native=native)
        assert invalid == [] and len(batch) == 1
        assert tallied(batch, 30, 100)[1699999980]["profiles"] == {("\U0001f600", "", ""): 1}


class TestEventTime:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (1694479551, 1694479551),
            (1694479551.9, 1694479551),  # whole seconds count
            ("1694479551", 1694479551),
            ("  1694479551.5 ", 1694479551),
            ("1.694479551e9", 1694479551),
            (1694479551123, 1694479551),  # above 10^12: milliseconds
            ("1694479551123", 1694479551),
            (1694479551123.7, 1694479551),
            (NOW + SKEW, NOW + SKEW),  # at the skew limit: still a time
        ],
    )
    def test_usable_times(self, value, expected):
        assert event_time_of(value, NOW, SKEW) == expected

    @pytest.mark.parametrize(
        "value",
        [
            True,
            False,
            None,
            0,
            -5,
            0.4,
            "",
            "  ",
            "abc",
            "1_000",
            "٣",
            "0x10",
            "nan",
            "inf",
            float("nan"),
            float("inf"),
            [1694479551],
            {"t": 1},
            NOW + SKEW + 1,  # a device clock too far ahead
            10**30,
            "1e400",
        ],
    )
    def test_not_times(self, value):
        assert event_time_of(value, NOW, SKEW) is None

    def test_column_fast_path_and_fallback_agree_with_per_value_rule(self):
        column = [NOW - 10, "bad", NOW + 10_000, None, NOW - 1]
        times, fell_back = event_times(column, SKEW, kafka_time=lambda i: NOW + i)
        assert times == [NOW - 10, NOW + 1, NOW + 2, NOW + 3, NOW - 1]
        assert fell_back == [1, 2, 3]

    def test_all_int_column_uses_values_as_they_are(self):
        column = [NOW - 3, NOW - 2, NOW - 1]
        assert event_times(column, SKEW, kafka_time=lambda i: NOW) == (column, [])

    def test_the_skew_is_counted_from_the_records_own_kafka_time_not_the_clock(self):
        """A function of the record: read live or replayed a day later, an event time
        just past the skew of its own Kafka timestamp falls back, and one just within
        it counts (the clock no longer decides)."""
        written = NOW - 86_400
        column = [written + SKEW, written + SKEW + 1]
        assert event_times(column, SKEW, kafka_time=lambda i: written) == ([written + SKEW, written], [1])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(st.integers(), st.floats(), st.text(), st.booleans(), st.none()), max_size=20))
    def test_column_equals_per_value(self, column):
        times, fell_back = event_times(list(column), SKEW, kafka_time=lambda i: NOW - 7 * i)
        for index, value in enumerate(column):
            single = event_time_of(value, NOW - 7 * index, SKEW)
            if single is None:
                assert index in fell_back and times[index] == NOW - 7 * index
            else:
                assert index not in fell_back and times[index] == single


class TestKafkaTimestamp:
    """The fallback time of a record without a usable event time, and of an invalid one."""

    # (type, ms) as Message.timestamp() gives them: 1 CreateTime, 2 LogAppendTime, 0 none
    @pytest.mark.parametrize(
        ("timestamp", "expected"),
        [
            ((1, (NOW - 100) * 1000 + 999), NOW - 100),  # whole seconds
            ((2, (NOW - 100) * 1000), NOW - 100),
            ((1, (NOW + SKEW) * 1000), NOW + SKEW),  # at the skew limit: still used
            ((0, -1), NOW),  # no timestamp: the wall clock
            ((1, 0), NOW),
            ((1, (NOW + SKEW + 1) * 1000), NOW),  # a producer clock too far ahead: the wall clock
            ((1, (NOW + 365 * 86400) * 1000), NOW),
        ],
    )
    def test_kafka_time(self, timestamp, expected):
        assert kafka_time_of(timestamp, NOW + 0.7, SKEW) == expected


class TestCleanStrings:
    def test_trims_and_marks_missing_as_empty(self):
        assert clean_strings([" a ", "", "  ", None, 12, 1.5, True, ["x"], {"k": 1}, "b"]) == [
            "a",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "b",
        ]

    def test_all_string_fast_path(self):
        assert clean_strings(["android ", "iOS"]) == ["android", "iOS"]

    def test_over_long_values_are_missing(self):
        assert clean_strings(["a" * 256, "b" * 257, " " + "c" * 256 + " "], max_length=256) == [
            "a" * 256,
            "",
            "c" * 256,
        ]
        assert clean_strings(["ok", 5, "d" * 300], max_length=256) == ["ok", "", ""]

    def test_numbers_in_string_fields_are_missing_not_converted(self):
        assert clean_strings([12, "12"]) == ["", "12"]


def test_to_columns_builds_parallel_columns_with_fallbacks():
    records = [
        LoginRecord(
            user_id="u", app_version="2.3.0", device_type="iOS", ip="1.1.1.1", locale="RU", device_id="d", timestamp=NOW
        ),
        LoginRecord(timestamp="soon"),
    ]
    columns = to_columns(records, SKEW, kafka_time=lambda i: NOW - 42 * i)
    assert columns.event_time == [NOW, NOW - 42]
    assert columns.profile == [("iOS", "2.3.0", "RU"), ("", "", "")]
    assert columns.timestamp_fallbacks == [1]
    subset = columns.take([1])
    assert subset.event_time == [NOW - 42] and subset.timestamp_fallbacks == [0] and subset.ip == [""]
    assert columns.slice(1, 2) == subset
    assert columns.slice(0, 1).timestamp_fallbacks == []


class TestRegularAndIrregularRecords:
    """Most records take the typed decoder; anything else takes the exact per-value path,
    and both must give the same columns."""

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"ip": "1.2.3.4", "timestamp": 1800000000}',
            b'{"ip": " 1.2.3.4 "}',  # trimming is done on the column
            b'{"timestamp": null}',
            b"{}",
        ],
    )
    def test_usual_shapes_are_regular(self, raw):
        records, _, _ = decode_records([raw], max_field_length=16)
        assert type(records[0]) is regular_record_type(16)

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"ip": null}',
            b'{"ip": 12}',
            b'{"ip": ["x"]}',
            b'{"ip": "' + b"9" * 17 + b'"}',  # longer than the bound
            b'{"timestamp": "1800000000"}',
            b'{"timestamp": 1800000000.5}',
            b'{"timestamp": true}',
            b'{"timestamp": 1e400}',
        ],
    )
    def test_other_shapes_are_irregular(self, raw):
        records, _, _ = decode_records([raw], max_field_length=16)
        assert type(records[0]) is LoginRecord

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    name: st.one_of(
                        st.sampled_from(["", " ", "a", " a ", "android", "x" * 16, " " + "y" * 16 + " ", "z" * 17]),
                        st.none(),
                        st.integers(-5, 5),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.booleans(),
                        st.lists(st.integers(), max_size=2),
                    )
                    for name in ("user_id", "app_version", "device_type", "ip", "locale", "device_id")
                }
                | {
                    "timestamp": st.one_of(
                        st.integers(-10, NOW + 2 * SKEW),
                        st.integers(NOW - 100, NOW),
                        st.just(str(NOW)),
                        st.floats(NOW - 100, NOW),
                        st.none(),
                        st.booleans(),
                    )
                },
            ),
            max_size=40,
        )
    )
    def test_columns_equal_the_exact_per_value_rules(self, objects):
        # Enough regular records around them that the few irregular ones take the
        # per-value branch of to_columns, as in real traffic.
        objects = [{"ip": "1.1.1.1", "timestamp": NOW}] * (8 * len(objects)) + objects
        raws = [json.dumps(obj).encode() for obj in objects]
        records, _, invalid = decode_records(raws, max_field_length=16)
        assert invalid == []
        fast = to_columns(records, SKEW, kafka_time=lambda i: NOW - 7, max_field_length=16)
        exact_records = [LoginRecord(**{k: obj.get(k) for k in LoginRecord.__struct_fields__}) for obj in objects]
        exact = to_columns(exact_records, SKEW, kafka_time=lambda i: NOW - 7, max_field_length=16)
        assert fast == exact


# ---- the native parser (native/login_columns.c) -------------------------------------------

# Values inside the native parser's subset (printable ASCII strings without escapes,
# integers, literals) are most of what is generated, so that most records are parsed
# natively; odd values (anything else) send their record to the exact path.
_plain_values = st.one_of(
    st.text(alphabet=st.sampled_from(list(" aZ09.-:")), max_size=8),
    st.sampled_from(["android", " iOS ", "1.2.3.4", "x" * 16, "y" * 17, str(NOW), f" {NOW} ", "12a"]),
    st.integers(NOW - 100, NOW + 2 * SKEW),
    st.integers(NOW * 1000 - 100, NOW * 1000),
    st.integers(-5, 5),
    st.booleans(),
    st.none(),
)
_odd_text = st.text(alphabet=st.sampled_from(list(' a"\\\t\né\u00a0\u2028\x1c\x00')), min_size=1, max_size=4)
_odd_values = st.one_of(
    _odd_text,
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False),
    st.recursive(
        _plain_values, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(_odd_text, inner, max_size=2)
    ),
)
# Texts json.dumps never writes: numbers and literals on the edge of the grammar.
_RAW_TOKENS = ["-0", "01", "1.", "-", "1e5", ".5", "tru", "nul", "truex", "1,", "9999999999999999999", "-9223372036"]
_keys = st.sampled_from([*ALL_FIELDS, *ALL_FIELDS, "other", "IP", "ip ", "time\\u0073tamp"])
_spaces = st.sampled_from(["", "", " ", "\n", "\t ", "\r\n", "\x0b"])


@st.composite
def login_record_values(draw) -> bytes:
    """One record value: mostly objects like real ones (repeated keys included), with
    everything the contract allows or refuses mixed in, and sometimes broken on purpose."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b" ", b"[1]", b"null", b'"s"', b"12", b"\xff{}", b"{}{}", b"{} x"]))
    parts = []
    for key in draw(st.lists(_keys, max_size=9)):
        odd = draw(st.integers(0, 15))
        if odd == 0:
            rendered = json.dumps(draw(_odd_values), ensure_ascii=draw(st.booleans()))
        elif odd == 1:
            rendered = draw(st.sampled_from(_RAW_TOKENS))
        else:
            rendered = json.dumps(draw(_plain_values))
        parts.append(f'{draw(_spaces)}"{key}"{draw(_spaces)}:{draw(_spaces)}{rendered}{draw(_spaces)}')
    data = (draw(_spaces) + "{" + ",".join(parts) + "}" + draw(_spaces)).encode()
    if draw(st.integers(0, 9)) == 0:  # broken on purpose: cut short, or a byte changed
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data[:cut] + bytes([draw(st.integers(0, 255))]) + data[cut + 1 :]
    return data


def tallied(batch, width: int, max_distinct: int) -> dict[int, dict]:
    """Everything the windows of `batch` count, per window: the parser's output as the
    aggregator sees it (a native batch has no per-record Python view)."""
    windows = {}
    for start, count in sorted(batch.window_counts(width).items()):
        tallies = tallies_for(batch, max_distinct)
        assert tallies.add(batch, start, start + width) == count
        windows[start] = {
            "message_count": tallies.message_count,
            "profiles": tallies.profile_counts(),
            "device_ids": tallies.device_ids(),
            "unique_device_count": tallies.unique_device_count(),
            "ip_counts": tallies.ip_counts(),
            "unique_ip_count": tallies.unique_ip_count(),
            "top_ips": tallies.top_ips(3),
            "missing": {name: n for name, n in tallies.missing_counts().items() if n},
            "capped": tallies.capped(),
        }
    return windows


class TestNativeParser:
    """The native parser and tallies must give exactly the pure-Python answer, or defer to it."""

    def test_the_native_module_is_built(self):
        # CI and `make test` install it; without it the processor runs at about two fifths of the speed.
        assert NATIVE_PARSER_AVAILABLE, (
            "install it: pip install -r requirements.txt (from the repository root; ./native needs a C compiler"
            " and the Python headers, and installs without the module if they are missing)"
        )

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(login_record_values(), max_size=25),
        st.integers(1, 40),
        st.sampled_from([1, 30, 10**9]),
        st.integers(1, 30),
    )
    def test_native_and_pure_paths_agree(self, raws, max_field_length, width, max_distinct):
        def kafka_time(position: int) -> int:
            return NOW - 1000 + position  # different per position: checks the position mapping

        native, native_invalid = parse_values(raws, NOW, SKEW, kafka_time, max_field_length, native=True)
        pure, pure_invalid = parse_values(raws, NOW, SKEW, kafka_time, max_field_length, native=False)
        assert native_invalid == pure_invalid
        assert len(native) == len(pure)
        assert native.newest_time() == pure.newest_time()
        assert tallied(native, width, max_distinct) == tallied(pure, width, max_distinct)

    def test_usual_records_are_parsed_natively(self):
        raws = [
            b'{"user_id": "u", "app_version": "2.3.0", "device_type": " android ", "ip": "1.2.3.4",'
            b' "locale": "RU", "device_id": "d", "timestamp": 1800000000}',
            b'{"ip": 12, "locale": null, "device_type": true, "timestamp": " 1800000001 "}',
            b" { } ",
        ]
        batch = _login_columns.parse_batch(raws, 16, NOW, SKEW)
        assert batch.deferred() == []
        assert batch.fallback_rows() == [2]  # no timestamp: waits for its Kafka timestamp
        with pytest.raises(ValueError, match="row 2 has no event time"):
            batch.window_counts(30)  # never counted half-known
        batch.set_fallback_time(2, NOW + 1)
        assert len(batch) == 3
        assert batch.window_counts(30) == {NOW - NOW % 30: 3}
        [window] = tallied(batch, 30, 100).values()
        assert window["profiles"] == {("android", "2.3.0", "RU"): 1, ("", "", ""): 2}
        assert window["device_ids"] == {"d"}
        assert window["ip_counts"] == {"1.2.3.4": 1}
        assert window["missing"] == {"user_id": 2, "device_id": 2, "ip": 2, "timestamp": 1}

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"ip": "1.2.3.\\u0034"}',  # an escape
            '{"locale": "é"}'.encode(),  # non-ASCII
            b'{"ip": "a\tb"}',  # a raw control character (invalid JSON)
            b'{"timestamp": 1800000000.0}',  # a float
            b'{"timestamp": "1.8e9"}',  # a numeric string that is not plain digits
            b'{"extra": {"nested": 1}}',
            b'{"ip": "a",}',  # malformed
            b"[1]",
            b"",
            None,
        ],
    )
    def test_anything_else_is_deferred(self, raw):
        batch = _login_columns.parse_batch([b'{"timestamp": 1800000000}', raw], 16, NOW, SKEW)
        assert batch.deferred() == [1]
        assert len(batch) == 1  # the deferred row counts only once it is set
        with pytest.raises(ValueError, match="row 1 has no values"):
            batch.window_counts(30)

    @pytest.mark.parametrize("special", [b"\x7f", b"\x1f", b"\x80", b"\\", b"\xc3\xa9"])
    def test_a_byte_outside_the_subset_is_found_at_every_position(self, special):
        # The string scan reads 8 bytes at a time: a special byte at each offset of a
        # long value, last before the closing quote included, must send the record to
        # the exact path (and there be refused or read exactly as the pure path does).
        for length in range(24):
            for before in (b"a" * length, b"a" * length + special):
                raw = b'{"ip": "' + before + special + b'", "timestamp": 1800000000}'
                assert _login_columns.parse_batch([raw], 256, NOW, SKEW).deferred() == [0], raw
                native, native_invalid = parse_values([raw], NOW, SKEW, lambda position: NOW, 256, native=True)
                pure, pure_invalid = parse_values([raw], NOW, SKEW, lambda position: NOW, 256, native=False)
                assert native_invalid == pure_invalid
                assert tallied(native, 30, 100) == tallied(pure, 30, 100)

    def test_non_ascii_values_are_one_key_however_they_were_written(self):
        # Deferred records are set back as UTF-8 bytes: an escape and the raw character
        # must be the same device id / IP, and come back as the same str.
        raws = [
            '{"ip": "é", "device_id": "😀", "timestamp": 1800000000}'.encode(),
            b'{"ip": "\\u00e9", "device_id": "\\ud83d\\ude00", "timestamp": 1800000000}',
        ]
        for native in (True, False):
            batch, invalid = parse_values(raws, NOW, SKEW, lambda position: NOW, 256, native=native)
            assert invalid == []
            [window] = tallied(batch, 30, 100).values()
            assert window["ip_counts"] == {"é": 2}
            assert window["device_ids"] == {"😀"}

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.integers(0, 300), min_size=1, max_size=400), st.sampled_from([1, 3, 10, 64, 65, 1000]))
    def test_top_ips_are_the_pure_paths_whatever_n(self, ip_numbers, n):
        # Few distinct IPs with repeats and ties: both ways of ranking (one pass keeping
        # the best n, or a full sort for a large n) must give the pure path's order.
        raws = [json.dumps({"ip": f"10.0.{k % 7}.{k}", "timestamp": NOW}).encode() for k in ip_numbers]
        native, _ = parse_values(raws, NOW, SKEW, lambda position: NOW, 256, native=True)
        pure, _ = parse_values(raws, NOW, SKEW, lambda position: NOW, 256, native=False)
        [native_window] = native.window_counts(30)
        native_tallies, pure_tallies = tallies_for(native, 1000), tallies_for(pure, 1000)
        native_tallies.add(native, native_window, native_window + 30)
        pure_tallies.add(pure, native_window, native_window + 30)
        assert native_tallies.top_ips(n) == pure_tallies.top_ips(n)

    def test_tables_grow_past_their_first_size_and_keep_every_value(self):
        # 20,000 distinct IPs and 5,000 locales: the native tables start at 1,024 and 64 slots.
        objects = [
            {"locale": f"L{i % 5000}", "ip": f"10.0.{i // 256}.{i % 256}", "timestamp": NOW} for i in range(20_000)
        ]
        raws = [json.dumps(obj).encode() for obj in objects]
        native, _ = parse_values(raws, NOW, SKEW, lambda position: NOW, 256, native=True)
        pure, _ = parse_values(raws, NOW, SKEW, lambda position: NOW, 256, native=False)
        assert tallied(native, 30, 1_000_000) == tallied(pure, 30, 1_000_000)
        [window] = tallied(native, 30, 1_000_000).values()
        assert window["unique_ip_count"] == 20_000
        assert len(window["profiles"]) == 5000


class TestKafkaTimeFromMessages:
    """The processor hands the native parser the consumed messages: it reads each one's
    timestamp in C. That must be the Python rule (`kafka_time_of`) exactly, on records
    whose event times sit on either side of the skew from their own Kafka time."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(-400, 400),  # event time - Kafka time
                st.sampled_from([0, 1, 2]),  # timestamp type: 0 is "not available"
                st.one_of(st.integers(-5, 0), st.integers(NOW - 10_000, NOW + 2 * SKEW)),  # Kafka time, seconds
                st.integers(0, 999),
            ),
            min_size=1,
            max_size=30,
        )
    )
    def test_native_reading_the_messages_equals_the_python_rule(self, rows):
        from confluent_kafka import Message

        values, messages = [], []
        for offset, (seconds_ahead, kind, kafka_seconds, millis) in enumerate(rows):
            stamp = (kind, kafka_seconds * 1000 + millis)
            reference = kafka_time_of(stamp, NOW, SKEW)
            values.append(json.dumps({"device_id": f"d{offset}", "timestamp": reference + seconds_ahead}).encode())
            messages.append(Message(value=values[-1], offset=offset, timestamp=stamp))

        def kafka_time(position: int) -> int:
            return kafka_time_of(messages[position].timestamp(), NOW, SKEW)

        from_messages, _ = parse_values(values, NOW, SKEW, kafka_time, native=True, messages=messages)
        from_function, _ = parse_values(values, NOW, SKEW, kafka_time, native=True)
        pure, _ = parse_values(values, NOW, SKEW, kafka_time, native=False)
        assert tallied(from_messages, 1, 100) == tallied(from_function, 1, 100) == tallied(pure, 1, 100)
        for position, (seconds_ahead, *_rest) in enumerate(rows):  # and each is the rule
            expected = kafka_time(position) + seconds_ahead
            if seconds_ahead > SKEW or expected <= 0:
                expected = kafka_time(position)  # not a time: the Kafka time stands in
            assert from_messages.window_counts(1).get(expected, 0) >= 1
