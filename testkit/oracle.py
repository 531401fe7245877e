"""A deliberately naive, per-record reading of the contract, written independently
of `parsing`/`aggregator` (no shared code), to check the real pipeline against.

It knows nothing of watermarks: it assumes no record is late, which is how the
tests use it (their input arrives in event-time order within the grace period).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime

FIELDS = ("user_id", "app_version", "device_type", "ip", "locale", "device_id")
NUMBER = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _string(record: dict, name: str, max_length: int = 256) -> str | None:
    value = record.get(name)
    if isinstance(value, str) and 0 < len(value.strip()) <= max_length:
        return value.strip()
    return None


def _time(value, kafka_s: int, skew: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not NUMBER.match(text):
            return None
        value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not isinstance(value, int | float):
        return None
    if value > 10**12:
        value = value / 1000 if isinstance(value, float) else value // 1000
    seconds = math.floor(value)
    if seconds <= 0 or seconds > kafka_s + skew:
        return None
    return seconds


def _not_json(name: str):
    raise ValueError(name)  # NaN, Infinity: accepted by json.loads, not JSON (RFC 8259)


def decode_object(raw: bytes | None):
    if raw is None:
        return None
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def expected_windows(
    records: list[tuple[bytes | None, int]], window: int = 30, now: float | None = None, skew: int = 300, top: int = 10
) -> dict[str, dict]:
    """records: (raw value, Kafka timestamp in ms). Returns window key -> expected value."""
    now = now if now is not None else datetime.now(UTC).timestamp()
    state: dict[int, dict] = defaultdict(
        lambda: {
            "n": 0,
            "device": Counter(),
            "locale": Counter(),
            "versions": defaultdict(Counter),
            "devices": set(),
            "ips": Counter(),
            "missing": Counter(),
            "invalid": 0,
        }
    )
    for raw, kafka_ms in records:
        # The record's Kafka time: its timestamp, unless more than the skew ahead of the
        # clock (then the clock). An event time may be at most the skew ahead of it.
        kafka_s = kafka_ms // 1000 if 0 < kafka_ms // 1000 <= now + skew else int(now)
        record = decode_object(raw)
        if record is None:
            state[kafka_s // window * window]["invalid"] += 1
            continue
        seconds = _time(record.get("timestamp"), kafka_s, skew)
        s_missing = seconds is None
        if s_missing:
            seconds = kafka_s
        w = state[seconds // window * window]
        w["n"] += 1
        values = {name: _string(record, name) for name in FIELDS}
        for name, value in values.items():
            if value is None:
                w["missing"][name] += 1
        if s_missing:
            w["missing"]["timestamp"] += 1
        device = values["device_type"] or "unknown"
        w["device"][device] += 1
        w["locale"][values["locale"] or "unknown"] += 1
        w["versions"][device][values["app_version"] or "unknown"] += 1
        if values["device_id"]:
            w["devices"].add(values["device_id"])
        if values["ip"]:
            w["ips"][values["ip"]] += 1

    def ordered(counter: Counter) -> dict:
        return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

    result = {}
    for start, w in sorted(state.items()):
        result[_iso(start)] = {
            "schema_version": 1,
            "window_start": _iso(start),
            "window_end": _iso(start + window),
            "message_count": w["n"],
            "device_counts": ordered(w["device"]),
            "locale_counts": ordered(w["locale"]),
            "unique_device_count": len(w["devices"]),
            "app_version_by_device": {d: ordered(v) for d, v in sorted(w["versions"].items())},
            "unique_ip_count": len(w["ips"]),
            "top_ips": [{"ip": ip, "count": c} for ip, c in sorted(w["ips"].items(), key=lambda kv: (-kv[1], kv[0]))][
                :top
            ],
            "missing_field_counts": ordered(+w["missing"]),
            "invalid_message_count": w["invalid"],
            "late_message_count": 0,
        }
    return result
