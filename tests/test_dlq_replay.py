"""ops.dlq_replay's command line without a broker: a file that cannot be used is one line
naming it (and the line), exit 2, and not a bad setting; a bad setting still is. Against
a real broker (overlapping runs, questioning, discarding, where records count):
tests/test_recovery.py."""

from __future__ import annotations

import json

import pytest

from ops.dlq_file import DeadLetter
from ops.dlq_replay import main

# Nothing listens here: a test that reached the broker would fail, not hang on a default.
NO_BROKER = ["--env-file", "", "--bootstrap-servers", "127.0.0.1:1"]


def line(source: str, value: bytes) -> str:
    return DeadLetter(source, int(source.split("/")[1]), None, value, 1_796_083_200_123, "not JSON").as_line()


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [["replay", "--dry-run"], ["replay"], ["discard"], ["discard", "--undo"]])
def test_a_broken_file_exits_2_with_one_line_naming_the_line(tmp_path, capsys, command):
    exported = tmp_path / "dlq.jsonl"
    exported.write_text(line("t/0/1", b"{}") + "\n\n{broken\n")
    assert main([command[0], str(exported), *command[1:], *NO_BROKER]) == 2
    assert one_error_line(capsys).startswith(f"python -m ops.dlq_replay: {exported} line 3: not a JSON object")


def test_a_line_keeping_value_base64_beside_an_edited_value_is_an_error_naming_the_line(tmp_path, capsys):
    edited = json.loads(line("t/0/2", b"\xff{broken")) | {"value": '{"device_type": "iOS"}'}
    exported = tmp_path / "dlq.jsonl"
    exported.write_text(line("t/0/1", b"{}") + "\n" + json.dumps(edited) + "\n")
    assert main(["replay", str(exported), "--dry-run", *NO_BROKER]) == 2
    assert one_error_line(capsys) == (
        f'python -m ops.dlq_replay: {exported} line 2: both "value" and "value_base64":'
        " keep the one that holds the fix and delete the other"
    )


def test_a_missing_file_exits_2_naming_it(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "nope.jsonl"), *NO_BROKER]) == 2
    assert one_error_line(capsys) == f"python -m ops.dlq_replay: {tmp_path / 'nope.jsonl'}: No such file or directory"


def test_an_export_file_that_cannot_be_written_exits_2_naming_it(tmp_path, capsys):
    assert main(["export", str(tmp_path / "no-such-dir" / "dlq.jsonl"), *NO_BROKER]) == 2
    assert one_error_line(capsys).endswith("no-such-dir/dlq.jsonl: No such file or directory")


def test_a_bad_setting_is_still_a_bad_setting(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["replay", str(tmp_path / "dlq.jsonl"), "--window-seconds", "thirty", *NO_BROKER])
    assert exited.value.code == 2
    assert one_error_line(capsys).startswith("python -m ops.dlq_replay: bad setting --window-seconds: ")
