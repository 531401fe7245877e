"""poll_turns: a pause of the process between or inside poll turns makes the client's
cached partition ends stale; they are not believed until fetched anew."""

from __future__ import annotations

from ingest.poll_turns import AFTER_PAUSE_SECONDS, PAUSE_SECONDS, PollTurns


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_regular_turns_are_believed():
    clock = Monotonic()
    turns = PollTurns(clock)
    for _ in range(5):
        started = turns.turn_started()
        clock.now += 0.5  # consume() waited its 0.5 s
        assert not turns.turn_ended(started, 0.5)
        assert turns.ends_believed()


def test_a_pause_inside_a_turn_is_caught_after_the_reads():
    clock = Monotonic()
    turns = PollTurns(clock)
    started = turns.turn_started()
    clock.now += PAUSE_SECONDS + 1  # stopped inside position(), after the time was read
    assert turns.turn_ended(started, 0.0)
    assert not turns.ends_believed()
    clock.now += AFTER_PAUSE_SECONDS
    assert turns.ends_believed()


def test_a_pause_between_turns_is_caught_at_the_next():
    clock = Monotonic()
    turns = PollTurns(clock)
    turns.turn_started()
    clock.now += 10
    started = turns.turn_started()
    assert not turns.ends_believed()
    assert not turns.turn_ended(started, 0.0)  # the turn itself was quick
