"""ops.dlq_file: the exported lines read back as the same records; an edited line that
cannot be used is refused, naming the file, the line and the problem."""

from __future__ import annotations

import json

import pytest

from ops.dlq_file import DeadLetter, FileError, from_line, read_file


def letter(source: str, value: bytes | None = b'{"device_type": "iOS"}', key: bytes | None = None) -> DeadLetter:
    return DeadLetter(source, int(source.split("/")[1]), key, value, 1_796_083_200_123, "not JSON")


@pytest.mark.parametrize(
    ("key", "value"),
    [(None, b'{"a": 1}'), (b"k", b"caf\xc3\xa9"), (b"\xff\x00", b"\xff\xfe binary"), (None, None)],
)
def test_an_exported_line_reads_back_as_the_same_record(key, value):
    original = letter("user-login/2/118", value, key)
    line = original.as_line()
    assert "\n" not in line
    back = from_line(line, 7)
    assert back == original and back.line == 7
    assert (back.partition, back.key, back.value, back.reason) == (2, key, value, "not JSON")


def test_text_is_exported_as_text_for_a_person_to_fix_and_bytes_as_base64():
    assert json.loads(letter("t/0/1", b'{"x": "caf\xc3\xa9"').as_line())["value"] == '{"x": "café"'
    assert "value_base64" in json.loads(letter("t/0/1", b"\xff").as_line())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[1]", "not a JSON object"),
        ("{broken", "not a JSON object"),
        ('{"source": "t/x/1", "timestamp_ms": 1, "value": "v"}', '"source" must be'),
        ('{"source": "t/0/1", "value": "v"}', '"timestamp_ms" must be'),
        ('{"source": "t/0/1", "timestamp_ms": true, "value": "v"}', '"timestamp_ms" must be'),
        ('{"source": "t/0/1", "timestamp_ms": 1, "value": 12}', '"value" must be a string or null'),
        ('{"source": "t/0/1", "timestamp_ms": 1, "value_base64": "!!"}', '"value_base64" is not base64'),
    ],
)
def test_a_wrong_line_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        from_line(text)


@pytest.mark.parametrize("field", ["value", "key"])
def test_a_line_with_both_the_text_and_the_base64_of_a_field_is_refused(field):
    """Exported as base64 (not UTF-8), then fixed by adding the text: which one was meant
    cannot be told, so neither is taken."""
    line = json.loads(letter("t/0/1", b"\xff", b"\xfe").as_line())
    line[field] = '{"device_type": "iOS"}'
    with pytest.raises(ValueError, match=f'both "{field}" and "{field}_base64"'):
        from_line(json.dumps(line))


def test_reading_a_file_names_the_line_of_the_first_problem(tmp_path):
    path = tmp_path / "dlq.jsonl"
    both = json.loads(letter("t/0/2", b"\xff").as_line()) | {"value": "{}"}
    path.write_text(letter("t/0/1").as_line() + "\n\n" + json.dumps(both) + "\n")
    with pytest.raises(FileError) as refused:
        read_file(str(path))
    assert refused.value.where == f"{path} line 3"
    assert refused.value.problem.startswith('both "value" and "value_base64"')


def test_a_file_that_is_not_utf8_or_not_there_is_named(tmp_path):
    path = tmp_path / "dlq.jsonl"
    path.write_bytes(letter("t/0/1").as_line().encode() + b"\n\xff\xfe\n")
    with pytest.raises(FileError, match="line 2: not UTF-8 text"):
        read_file(str(path))
    with pytest.raises(FileError, match="No such file or directory"):
        read_file(str(tmp_path / "nope.jsonl"))


def test_reading_keeps_every_line_in_order_with_its_number(tmp_path):
    path = tmp_path / "dlq.jsonl"
    path.write_text(f"{letter('t/0/1').as_line()}\n\n{letter('t/1/5').as_line()}\n")
    assert [(one.source, one.line) for one in read_file(str(path))] == [("t/0/1", 1), ("t/1/5", 3)]
