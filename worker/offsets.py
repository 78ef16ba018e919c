"""Per-partition offset tracking: which input offsets are done, and how far each partition may be committed.

Captions finish out of order, so a partition is committed only up to its first
offset that is not done. An offset is done when the output or error record of
every image of its message has been acknowledged. A message with no image is
done at once. Offsets need not be contiguous: compaction and transaction markers
leave gaps, and a gap never blocks a commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    # Open images per offset that is not done yet.
    open_parts: dict[int, int] = field(default_factory=dict)
    # Offset after the highest offset added, or None before the first message.
    next_offset: int | None = None
    # Position of the last successful commit, or the first offset seen since the assignment.
    committed: int | None = None


class OffsetTracker:
    """Done and open offsets of each assigned partition, kept by the stream loop's thread only."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}

    def add(self, tp: TopicPartitionKey, offset: int, parts: int) -> None:
        """Register a polled offset with `parts` open images. With 0 parts it is done at once.

        Offsets of one partition must be added in increasing order, as the consumer returns them.
        """
        if parts < 0:
            raise ValueError(f"parts must be >= 0, got {parts}")
        state = self._partitions.setdefault(tp, _PartitionState())
        if state.next_offset is not None and offset < state.next_offset:
            raise ValueError(f"offset {offset} of {tp} added after offset {state.next_offset - 1}")
        if state.committed is None:
            state.committed = offset
        if parts:
            state.open_parts[offset] = parts
        state.next_offset = offset + 1

    def finish_part(self, tp: TopicPartitionKey, offset: int) -> bool:
        """Mark one image of an offset done, and return True when that makes the whole offset done.

        Returns False for a partition or offset that is not tracked (forgotten after a revocation).
        """
        state = self._partitions.get(tp)
        if state is None or offset not in state.open_parts:
            return False
        state.open_parts[offset] -= 1
        if state.open_parts[offset] > 0:
            return False
        del state.open_parts[offset]
        return True

    def is_open(self, tp: TopicPartitionKey, offset: int) -> bool:
        state = self._partitions.get(tp)
        return state is not None and offset in state.open_parts

    def position(self, tp: TopicPartitionKey) -> int | None:
        """Return the first offset of `tp` that is not done (the offset to commit), or None if none was seen."""
        state = self._partitions.get(tp)
        if state is None or state.next_offset is None:
            return None
        if state.open_parts:
            return min(state.open_parts)
        return state.next_offset

    def positions_to_commit(self) -> dict[TopicPartitionKey, int]:
        """Return the position of each partition that has moved since its last commit."""
        result = {}
        for tp, state in self._partitions.items():
            position = self.position(tp)
            if position is not None and position != state.committed:
                result[tp] = position
        return result

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        """Record committed positions; a result that arrives late never moves a position back."""
        for tp, position in positions.items():
            state = self._partitions.get(tp)
            if state is not None and (state.committed is None or position > state.committed):
                state.committed = position

    def committed(self, tp: TopicPartitionKey) -> int | None:
        """Return the last committed position of `tp`, or its first offset seen if none was committed since."""
        state = self._partitions.get(tp)
        return None if state is None else state.committed

    def open_count(self, tp: TopicPartitionKey | None = None) -> int:
        """Return the number of offsets not done, in `tp` or in all partitions."""
        if tp is not None:
            state = self._partitions.get(tp)
            return 0 if state is None else len(state.open_parts)
        return sum(len(state.open_parts) for state in self._partitions.values())

    def forget(self, tp: TopicPartitionKey) -> None:
        """Drop all state of `tp`, so that late results of its work are ignored."""
        self._partitions.pop(tp, None)

    def partitions(self) -> list[TopicPartitionKey]:
        return list(self._partitions)
