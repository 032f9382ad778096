"""PartitionOffsets / OffsetTracker: commit up to the lowest unfinished offset, never past it."""

from __future__ import annotations

from ai_worker.messaging.offsets import OffsetTracker, PartitionOffsets

TP0 = ("tasks", 0)
TP1 = ("tasks", 1)


def test_empty_partition_has_nothing_to_commit() -> None:
    part = PartitionOffsets()
    assert part.committable() is None
    assert part.pending_commit() is None
    assert OffsetTracker().to_commit() == {}


def test_out_of_order_completion_commits_only_up_to_lowest_unfinished() -> None:
    part = PartitionOffsets()
    for off in (10, 11, 12, 13):
        part.add(off)
    assert part.committable() == 10
    part.done(12)
    part.done(13)
    assert part.committable() == 10  # 10 and 11 still running
    part.done(10)
    assert part.committable() == 11
    part.done(11)
    assert part.committable() == 14  # all done: one past the highest seen


def test_gaps_in_offsets_do_not_assume_plus_one() -> None:
    part = PartitionOffsets()
    for off in (3, 7, 12):
        part.add(off)
    part.done(3)
    assert part.committable() == 7  # not 4
    part.done(12)
    assert part.committable() == 7
    part.done(7)
    assert part.committable() == 13


def test_nothing_in_flight_commits_highest_plus_one_even_if_added_out_of_order() -> None:
    part = PartitionOffsets()
    for off in (20, 5, 9):
        part.add(off)
    assert part.highest_seen == 20
    for off in (5, 9, 20):
        part.done(off)
    assert part.committable() == 21


def test_done_of_unknown_offset_is_harmless() -> None:
    part = PartitionOffsets()
    part.add(4)
    part.done(99)
    assert part.committable() == 4


def test_pending_commit_none_when_not_ahead_of_committed() -> None:
    tracker = OffsetTracker()
    tracker.add(TP0, 5)
    assert tracker.to_commit() == {TP0: 5}
    tracker.mark_committed({TP0: 5})
    assert tracker.to_commit() == {}  # equal to committed: nothing to do
    tracker.done(TP0, 5)
    assert tracker.to_commit() == {TP0: 6}
    tracker.mark_committed({TP0: 6})
    assert tracker.to_commit() == {}

    part = PartitionOffsets(committed=50)
    part.add(40)  # behind the committed position (e.g. a redelivery)
    assert part.committable() == 40
    assert part.pending_commit() is None


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.add(TP0, 1)
    tracker.add(TP0, 2)
    tracker.add(TP1, 100)
    tracker.add(TP1, 104)
    tracker.done(TP0, 2)
    tracker.done(TP1, 100)
    assert tracker.to_commit() == {TP0: 1, TP1: 104}
    assert tracker.in_flight(TP0) == 1
    assert tracker.in_flight(TP1) == 1
    assert tracker.in_flight() == 2

    tracker.mark_committed({TP1: 104})
    assert tracker.to_commit() == {TP0: 1}
    tracker.done(TP0, 1)
    assert tracker.to_commit() == {TP0: 3}


def test_to_commit_filters_by_partitions() -> None:
    tracker = OffsetTracker()
    tracker.add(TP0, 7)
    tracker.add(TP1, 8)
    assert tracker.to_commit([TP1]) == {TP1: 8}
    assert tracker.to_commit({TP0}) == {TP0: 7}
    assert tracker.to_commit([]) == {}
    assert tracker.to_commit([("other", 3)]) == {}
    assert tracker.to_commit(None) == {TP0: 7, TP1: 8}


def test_revoke_mid_flight_forget_then_done_does_not_resurrect() -> None:
    tracker = OffsetTracker()
    tracker.add(TP0, 10)
    tracker.add(TP0, 11)
    tracker.add(TP1, 3)
    tracker.mark_committed({TP0: 10})
    tracker.forget([TP0])
    assert tracker.in_flight(TP0) == 0
    assert tracker.in_flight() == 1

    # The job running offset 11 finishes after the revocation.
    tracker.done(TP0, 11)
    tracker.done(TP0, 10)
    tracker.mark_committed({TP0: 12})
    assert tracker.to_commit() == {TP1: 3}
    assert tracker.to_commit([TP0]) == {}
    assert tracker.in_flight(TP0) == 0

    # Reassigned later: starts afresh, nothing carried over from before the revocation.
    tracker.add(TP0, 30)
    assert tracker.to_commit([TP0]) == {TP0: 30}
    tracker.done(TP0, 30)
    assert tracker.to_commit([TP0]) == {TP0: 31}


def test_forget_accepts_a_generator_and_unknown_partitions() -> None:
    tracker = OffsetTracker()
    tracker.add(TP0, 1)
    tracker.add(TP1, 2)
    tracker.forget(tp for tp in (TP0, TP1, ("nope", 9)))
    assert tracker.to_commit() == {}
    assert tracker.in_flight() == 0
