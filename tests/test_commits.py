"""commits: the offsets that are safe to commit, and the one-slot hand-off between threads."""

from __future__ import annotations

import threading

from ingest.commits import CommitSlot, safe_offsets


def test_a_pending_dead_letter_copy_holds_its_partition_back():
    assert safe_offsets({0: 10, 1: 7, 2: 3}, {0: 4, 2: 9, 5: 1}) == {0: 4, 1: 7, 2: 3}


class TestCommitSlot:
    def test_newest_request_wins_and_leaves_the_slot_when_taken(self):
        slot = CommitSlot()
        assert slot.take() is None
        assert slot.offer({0: 1})
        assert slot.offer({0: 5})
        assert slot.take() == {0: 5}
        assert slot.take() is None

    def test_what_is_committed_already_is_not_asked_again(self):
        slot = CommitSlot()
        slot.done({0: 5})
        assert not slot.offer({0: 5})
        assert not slot.offer({})
        assert slot.take() is None

    def test_a_failed_commit_is_put_back_unless_a_newer_one_came(self):
        slot = CommitSlot()
        slot.offer({0: 3})
        taken = slot.take()
        slot.put_back(taken)
        assert slot.take() == {0: 3}
        slot.offer({0: 3})
        taken = slot.take()
        slot.offer({0: 8})  # the timer asked again meanwhile
        slot.put_back(taken)
        assert slot.take() == {0: 8}

    def test_clear_forgets_requests_and_commits(self):
        slot = CommitSlot()
        slot.done({0: 5})
        slot.offer({0: 6})
        slot.clear()
        assert slot.take() is None
        assert slot.offer({0: 5})  # after a rebalance the same offsets may be needed again

    def test_the_newest_request_is_never_lost_between_threads(self):
        """The timer offers ever-growing offsets while the main thread takes them; once
        the timer stops, the last offer has been taken or is still in the slot."""
        slot = CommitSlot()
        taken: list[dict[int, int]] = []
        stop = threading.Event()

        def main_thread() -> None:
            while not stop.is_set():
                request = slot.take()
                if request:
                    taken.append(request)
                    slot.done(request)

        consumer = threading.Thread(target=main_thread)
        consumer.start()
        for offset in range(1, 20_001):
            slot.offer({0: offset})
        stop.set()
        consumer.join()
        final = slot.take()
        last = final or taken[-1]
        assert last == {0: 20_000}
        assert [t[0] for t in taken] == sorted(t[0] for t in taken)  # never an older one after a newer
