"""The DLQ replay's file: one dead-lettered record per line, for a person to fix.

`python -m ops.dlq_replay export` writes it, a person edits it, `replay` and `discard`
read it back (docs/operations.md, "Replay the DLQ"). One JSON object per line:

    {"source": "user-login/2/118", "reason": "not valid JSON: ...",
     "timestamp_ms": 1796083200123, "key": null, "value": "{\"user_id\": ..."}

`source` names the record the processor refused (topic/partition/offset, from the DLQ
copy's headers): the replay sends each source once. Bytes that are UTF-8 are written as
text (`key`, `value`: what a person edits); others as base64 (`key_base64`,
`value_base64`). A line holding both forms of one field is refused: which one the person
meant cannot be told, and taking either silently would send what they did not fix.

Pure: no Kafka I/O (a DLQ copy is read from a `Message` already consumed).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from dataclasses import dataclass, field

from confluent_kafka import Message

from core.errors import PipelineError


class FileError(PipelineError):
    """The file cannot be used as it is: `where` is the file (and line), `problem` says why.
    Not a bad setting: the script prints `<prog>: <where>: <problem>` and exits 2."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class DeadLetter:
    """One record to replay: where it came from, and what to send."""

    source: str  # "topic/partition/offset" of the record the processor refused
    partition: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    reason: str = ""
    # The line of the file it was read from (None: read from the DLQ), for messages.
    line: int | None = field(default=None, compare=False)

    def as_line(self) -> str:
        line: dict[str, object] = {"source": self.source, "reason": self.reason, "timestamp_ms": self.timestamp_ms}
        line.update(_encoded("key", self.key))
        line.update(_encoded("value", self.value))
        return json.dumps(line, ensure_ascii=False)


def _encoded(name: str, data: bytes | None) -> dict[str, object]:
    """Text where the bytes are UTF-8 (what a person edits), base64 where they are not."""
    if data is None:
        return {name: None}
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode()}


def _decoded(line: dict, name: str) -> bytes | None:
    if f"{name}_base64" in line:
        if name in line:
            raise ValueError(f'both "{name}" and "{name}_base64": keep the one that holds the fix and delete the other')
        encoded = line[f"{name}_base64"]
        if not isinstance(encoded, str):
            raise ValueError(f'"{name}_base64" must be a base64 string')
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error as error:
            raise ValueError(f'"{name}_base64" is not base64 ({error})') from None
    text = line.get(name)
    if text is not None and not isinstance(text, str):
        raise ValueError(f'"{name}" must be a string or null')
    return None if text is None else text.encode("utf-8")


def from_dlq(message: Message) -> DeadLetter | None:
    """A DLQ copy as a `DeadLetter`; None if it lacks the source headers."""
    headers = {name: value.decode("utf-8", "replace") for name, value in message.headers() or []}
    try:
        topic, partition, offset = (headers[f"dlq.source.{n}"] for n in ("topic", "partition", "offset"))
        timestamp_ms = int(headers.get("dlq.source.timestamp") or message.timestamp()[1])
        return DeadLetter(
            f"{topic}/{int(partition)}/{int(offset)}",
            int(partition),
            message.key(),
            message.value(),
            timestamp_ms,
            headers.get("dlq.reason", ""),
        )
    except (KeyError, ValueError):
        return None


def from_line(text: str, number: int | None = None) -> DeadLetter:
    """One line of an exported (and edited) file. Raises ValueError saying what is wrong."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a JSON object: {error}") from None
    if not isinstance(line, dict):
        raise ValueError("not a JSON object")
    source = line.get("source")
    parts = source.split("/") if isinstance(source, str) else []
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError('"source" must be "topic/partition/offset", as exported')
    timestamp_ms = line.get("timestamp_ms")
    if type(timestamp_ms) is not int or timestamp_ms < 0:
        raise ValueError('"timestamp_ms" must be a whole number of milliseconds')
    reason = line.get("reason")
    return DeadLetter(
        source,
        int(parts[1]),
        _decoded(line, "key"),
        _decoded(line, "value"),
        timestamp_ms,
        reason if isinstance(reason, str) else "",
        number,
    )


def read_file(path: str) -> list[DeadLetter]:
    """Every record of the file (`-`: standard input), blank lines skipped. Raises
    FileError naming the file and line of the first problem."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as stream:
                data = stream.read()
    except OSError as error:
        raise FileError(path, error.strerror or str(error)) from None
    letters = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FileError(f"{path} line {number}", "not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            letters.append(from_line(text, number))
        except ValueError as problem:
            raise FileError(f"{path} line {number}", str(problem)) from None
    return letters
