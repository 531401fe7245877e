"""Known input for integration tests: records with every kind of trouble the contract names.

Each partition's records are in event-time order, so none is late, and the
oracle's answer is exactly what the processor must publish.
"""

from __future__ import annotations

import json
import random


def login_workload(
    start: int, seconds: int, count: int, partitions: int, seed: int = 7
) -> list[tuple[int, bytes | None, int]]:
    """(partition, value, Kafka timestamp ms) for `count` events spread over [start, start+seconds)."""
    rng = random.Random(seed)
    devices = [f"device-{i}" for i in range(max(10, count // 5))]
    heavy_ips = [f"10.0.0.{i}" for i in range(1, 6)]
    records = []
    for index in range(count):
        event_time = start + index * seconds // count
        kafka_ms = event_time * 1000 + rng.randint(0, 999)
        partition = index % partitions
        roll = rng.random()
        if roll < 0.005:
            value = rng.choice([b"{broken", b"[1, 2]", b"\xff\xfe", b"null", b'"text"'])
            records.append((partition, value, kafka_ms))
            continue
        event: dict[str, object] = {
            "user_id": f"user-{rng.randint(1, 500)}",
            "app_version": rng.choice(["2.3.0", "2.3.0", "2.2.1", "2.1.0"]),
            "device_type": rng.choice(["android", "android", "iOS", "web"]),
            "ip": rng.choice(heavy_ips) if rng.random() < 0.2 else f"192.168.{rng.randint(0, 9)}.{rng.randint(1, 254)}",
            "locale": rng.choice(["TX", "CA", "NY", "RU", "DE"]),
            "device_id": rng.choice(devices),
            "timestamp": event_time,
        }
        if roll < 0.03:
            event[rng.choice(["device_type", "locale", "app_version", "ip", "device_id", "user_id"])] = rng.choice(
                [None, "", "   ", 12, ["x"]]
            )
        elif roll < 0.04:
            del event[rng.choice(["device_type", "locale", "ip"])]
        elif roll < 0.06:
            event["timestamp"] = f" {event_time} "
        elif roll < 0.07:
            event["timestamp"] = event_time * 1000 + 250
        elif roll < 0.075:
            event["timestamp"] = rng.choice([None, "soon", True, 9_999_999_999])  # falls back to Kafka time
        records.append((partition, json.dumps(event).encode(), kafka_ms))
    return records


def invalid_record_positions(records: list[tuple[int, bytes | None, int]]) -> set[tuple[int, int]]:
    """(partition, offset) of every record the contract calls invalid (the oracle's rule),
    once `records` are produced in order to a new topic: the n-th record of a partition
    has offset n. What the dead-letter headers must cover."""
    from tests.oracle import decode_object

    next_offset: dict[int, int] = {}
    positions = set()
    for partition, value, _ in records:
        offset = next_offset.get(partition, 0)
        next_offset[partition] = offset + 1
        if decode_object(value) is None:
            positions.add((partition, offset))
    return positions
