"""broker_clock: "now" as the broker's time, measured from acknowledgements stamped with
the append time; this machine's clock where the broker does not stamp them."""

from __future__ import annotations

import logging

from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME

from broker.broker_clock import BrokerClock


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def appended(seconds: float) -> tuple[int, int]:
    return TIMESTAMP_LOG_APPEND_TIME, int(seconds * 1000)


def test_unknown_until_the_first_acknowledgement_then_never_ahead_of_the_broker():
    wall = Wall(1000.0)  # this machine is 20 s ahead of the broker (broker: 980)
    clock = BrokerClock(wall)
    assert not clock.known and clock.offset_seconds is None
    assert clock.now() == 1000.0  # its own clock, until measured
    # Sent at 1000.0 (broker 980.0), appended at broker 980.05, acknowledged at 1000.1.
    clock.observe(1000.0, 1000.1, appended(980.05))
    assert clock.known
    assert 19.9 < clock.offset_seconds <= 20.1
    wall.now = 1010.0
    assert clock.now() <= 990.0 + 1e-9  # never ahead of the broker's time (990)
    assert clock.now() > 989.8


def test_the_tightest_recent_bound_wins():
    wall = Wall(500.0)
    clock = BrokerClock(wall)
    clock.observe(500.0, 502.0, appended(500.1))  # a slow round trip: bound -1.9
    clock.observe(503.0, 503.02, appended(503.01))  # a quick one: bound -0.01
    assert abs(clock.offset_seconds - 0.01) < 1e-6


def test_a_clock_stepped_forward_starts_the_estimate_afresh():
    wall = Wall(100.0)
    clock = BrokerClock(wall)
    clock.observe(100.0, 100.01, appended(100.005))
    wall.now = 200.0  # NTP steps this machine 50 s forward (the broker is at 150)
    clock.observe(200.0, 200.01, appended(150.005))
    assert abs(clock.offset_seconds - 50.0) < 0.05
    assert clock.now() <= 150.0 + 1e-9


def test_a_broker_that_does_not_stamp_its_time_leaves_this_machines_clock_said_once(caplog):
    wall = Wall(100.0)
    clock = BrokerClock(wall, where="topic g-partials")
    with caplog.at_level(logging.INFO, logger="processor"):
        clock.observe(100.0, 100.01, (TIMESTAMP_CREATE_TIME, 100_000))
        clock.observe(101.0, 101.01, (TIMESTAMP_CREATE_TIME, 101_000))
    assert clock.known and clock.offset_seconds is None and clock.now() == 100.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not stamp topic g-partials with its own time" in lines[0]


def test_passing_the_bound_is_logged_once_each_way(caplog):
    wall = Wall(1000.0)
    clock = BrokerClock(wall, bound_seconds=30)
    with caplog.at_level(logging.INFO, logger="processor"):
        clock.observe(1000.0, 1000.01, appended(960.0))  # 40 s ahead
        clock.observe(1001.0, 1001.01, appended(961.0))
        wall.now = 2000.0  # corrected by NTP: 5 s ahead now
        clock.observe(2000.0, 2000.01, appended(1995.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "+40.0s off the broker's (more than 30s)" in warnings[0]
    assert any("back within 30s" in r.getMessage() for r in caplog.records)
