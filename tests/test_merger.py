"""merger: the operator's warning when the merge stands still. No broker is contacted:
the merger's clients are made but never used here."""

from __future__ import annotations

import logging

from aggregator import iso_utc
from config import build_settings
from kafka_io import BrokerHealth
from merge import MergeStall
from merger import WindowMerger
from parts import encode_progress
from tests.test_merge import T0, Feeder, W, login, parts_of


def test_a_stalled_merge_names_the_partitions_it_waits_on(caplog):
    settings = build_settings({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "WINDOW_SECONDS": str(W)})
    log = logging.getLogger("test")
    merger = WindowMerger(
        settings,
        {"bootstrap.servers": "127.0.0.1:9"},
        {"bootstrap.servers": "127.0.0.1:9"},
        BrokerHealth(settings.bootstrap_servers, log),
        lambda: 0,
        lambda *_: None,
        "host",
    )
    feeder = Feeder()
    # Partition 0 closed three windows; partition 1 closed one; partition 2 sent the
    # first of two pieces of its part of the first window (its publisher died, say).
    feeder(*parts_of([login(T0 + 1), login(T0 + 61)], [T0] * 2, 0, 3, native=False))
    feeder(encode_progress(0, 3, T0 + 3 * W), encode_progress(1, 3, T0 + W))
    many = [login(T0 + 2, device_id=f"{i:03d}".ljust(250, "d")) for i in range(40)]
    pieces = parts_of(many, [T0] * 40, 2, 3, native=False, max_bytes=4096)
    assert len(pieces) > 1
    feeder(pieces[0])
    merger._state, merger._stall = feeder.state, MergeStall(after_seconds=0)
    with caplog.at_level(logging.WARNING, logger="merger"):
        merger._warn_if_stalled()  # the first look starts the clock
        merger._warn_if_stalled()
    [record] = [r for r in caplog.records if r.name == "merger"]
    text = record.getMessage()
    assert "waiting for input partition(s) 2 (no window closed there yet)" in text
    assert f"incomplete: partition 2 of window {iso_utc(T0)} (1 of {len(pieces)} pieces)" in text
