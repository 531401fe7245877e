"""ops.dlq_replay without a broker: the exported lines, the checks on an edited file, the
skipping of what was replayed. Against a real broker: tests/test_recovery.py."""

from __future__ import annotations

import json

import pytest

from ops.dlq_replay import DeadLetter, from_line, main, pending


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
    back = from_line(line)
    assert (back.source, back.partition, back.key, back.value, back.timestamp_ms) == (
        original.source,
        2,
        key,
        value,
        original.timestamp_ms,
    )


def test_text_is_exported_as_text_for_a_person_to_fix_and_bytes_as_base64():
    assert json.loads(letter("t/0/1", b'{"x": "caf\xc3\xa9"').as_line())["value"] == '{"x": "café"'
    assert "value_base64" in json.loads(letter("t/0/1", b"\xff").as_line())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[1]", "not a JSON object"),
        ('{"source": "t/x/1", "timestamp_ms": 1, "value": "v"}', '"source" must be'),
        ('{"source": "t/0/1", "value": "v"}', '"timestamp_ms" must be'),
        ('{"source": "t/0/1", "timestamp_ms": 1, "value": 12}', '"value" must be a string or null'),
    ],
)
def test_a_wrong_line_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        from_line(text)


def test_pending_skips_what_was_replayed_and_second_copies():
    letters = [letter("t/0/1"), letter("t/0/2"), letter("t/0/1"), letter("t/1/1")]
    send, skipped = pending(iter(letters), done={"t/0/2"})
    assert [one.source for one in send] == ["t/0/1", "t/1/1"]
    assert skipped == [("t/0/2", "already replayed"), ("t/0/1", "a second copy of the same source record")]


def test_a_broken_file_exits_2_with_one_line_naming_the_line(tmp_path, capsys):
    exported = tmp_path / "dlq.jsonl"
    exported.write_text(letter("t/0/1").as_line() + "\n\n{broken\n")
    with pytest.raises(SystemExit) as exited:
        main(["replay", str(exported), "--dry-run", "--env-file", ""])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"python -m ops.dlq_replay: bad setting {exported} line 3: ")


def test_a_missing_file_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["replay", str(tmp_path / "nope.jsonl"), "--env-file", ""])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m ops.dlq_replay: bad setting {tmp_path / 'nope.jsonl'}: No such file or directory"
    )
