import random

import pytest

from worker.offsets import OffsetTracker

TP = ("images", 0)
OTHER = ("images", 1)


def test_nothing_seen_has_no_position():
    tracker = OffsetTracker()
    assert tracker.position(TP) is None
    assert tracker.positions_to_commit() == {}


def test_open_offset_blocks_commit():
    tracker = OffsetTracker()
    tracker.add(TP, 10, parts=1)
    assert tracker.position(TP) == 10
    assert tracker.positions_to_commit() == {}


def test_done_offset_moves_position():
    tracker = OffsetTracker()
    tracker.add(TP, 10, parts=1)
    assert tracker.finish_part(TP, 10) is True
    assert tracker.position(TP) == 11
    assert tracker.positions_to_commit() == {TP: 11}


def test_out_of_order_completion_commits_only_prefix():
    tracker = OffsetTracker()
    for offset in (0, 1, 2, 3):
        tracker.add(TP, offset, parts=1)

    tracker.finish_part(TP, 2)
    tracker.finish_part(TP, 3)
    assert tracker.position(TP) == 0

    tracker.finish_part(TP, 0)
    assert tracker.position(TP) == 1

    tracker.finish_part(TP, 1)
    assert tracker.position(TP) == 4


def test_offset_with_several_images_done_when_all_are():
    tracker = OffsetTracker()
    tracker.add(TP, 5, parts=3)
    assert tracker.finish_part(TP, 5) is False
    assert tracker.finish_part(TP, 5) is False
    assert tracker.position(TP) == 5
    assert tracker.finish_part(TP, 5) is True
    assert tracker.position(TP) == 6


def test_skipped_message_is_done_at_once():
    tracker = OffsetTracker()
    tracker.add(TP, 7, parts=0)
    assert tracker.position(TP) == 8
    assert tracker.open_count() == 0


def test_gaps_in_offsets_do_not_block_commit():
    tracker = OffsetTracker()
    tracker.add(TP, 3, parts=1)
    tracker.add(TP, 9, parts=1)
    tracker.add(TP, 20, parts=0)
    tracker.finish_part(TP, 9)
    assert tracker.position(TP) == 3
    tracker.finish_part(TP, 3)
    assert tracker.position(TP) == 21


def test_skipped_behind_open_offset_waits():
    tracker = OffsetTracker()
    tracker.add(TP, 0, parts=1)
    tracker.add(TP, 1, parts=0)
    assert tracker.position(TP) == 0
    tracker.finish_part(TP, 0)
    assert tracker.position(TP) == 2


def test_partitions_are_independent():
    tracker = OffsetTracker()
    tracker.add(TP, 0, parts=1)
    tracker.add(OTHER, 100, parts=1)
    tracker.finish_part(OTHER, 100)
    assert tracker.positions_to_commit() == {OTHER: 101}
    assert tracker.position(TP) == 0


def test_committed_position_is_not_offered_again():
    tracker = OffsetTracker()
    tracker.add(TP, 0, parts=0)
    positions = tracker.positions_to_commit()
    tracker.mark_committed(positions)
    assert tracker.positions_to_commit() == {}
    assert tracker.committed(TP) == 1

    tracker.add(TP, 1, parts=0)
    assert tracker.positions_to_commit() == {TP: 2}


def test_first_offset_seen_counts_as_committed():
    tracker = OffsetTracker()
    tracker.add(TP, 42, parts=1)
    assert tracker.committed(TP) == 42


def test_forgotten_partition_ignores_late_results():
    tracker = OffsetTracker()
    tracker.add(TP, 0, parts=1)
    tracker.forget(TP)
    assert tracker.finish_part(TP, 0) is False
    assert tracker.position(TP) is None
    assert tracker.positions_to_commit() == {}


def test_unknown_offset_finish_is_ignored():
    tracker = OffsetTracker()
    tracker.add(TP, 0, parts=1)
    assert tracker.finish_part(TP, 5) is False
    assert tracker.is_open(TP, 0)


def test_offsets_must_increase():
    tracker = OffsetTracker()
    tracker.add(TP, 5, parts=1)
    with pytest.raises(ValueError, match="added after"):
        tracker.add(TP, 4, parts=1)


def test_negative_parts_rejected():
    tracker = OffsetTracker()
    with pytest.raises(ValueError, match="parts"):
        tracker.add(TP, 0, parts=-1)


def test_open_count_per_partition_and_total():
    tracker = OffsetTracker()
    tracker.add(TP, 0, parts=2)
    tracker.add(TP, 1, parts=1)
    tracker.add(OTHER, 0, parts=1)
    assert tracker.open_count(TP) == 2
    assert tracker.open_count() == 3


def test_random_completion_order_always_commits_first_open():
    rng = random.Random(7)
    tracker = OffsetTracker()
    offsets = list(range(0, 200, 2))  # with gaps
    open_parts = []
    for offset in offsets:
        parts = rng.randint(0, 3)
        tracker.add(TP, offset, parts=parts)
        open_parts.extend([offset] * parts)
    rng.shuffle(open_parts)
    for offset in open_parts:
        tracker.finish_part(TP, offset)
        still_open = [o for o in offsets if tracker.is_open(TP, o)]
        expected = min(still_open) if still_open else offsets[-1] + 1
        assert tracker.position(TP) == expected
