"""Per-partition tracking of in-flight offsets: commit the lowest unfinished offset, never past it.

Offsets may have gaps (compaction, transactions markers), so nothing assumes +1 between messages."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    in_flight: set[int] = field(default_factory=set)
    highest_seen: int | None = None
    committed: int | None = None

    def add(self, offset: int) -> None:
        self.in_flight.add(offset)
        if self.highest_seen is None or offset > self.highest_seen:
            self.highest_seen = offset

    def done(self, offset: int) -> None:
        self.in_flight.discard(offset)

    def committable(self) -> int | None:
        """The offset to commit (the next one to read): the lowest in-flight offset, or one past the
        highest seen when nothing is in flight. None when nothing was seen."""
        if self.in_flight:
            return min(self.in_flight)
        if self.highest_seen is None:
            return None
        return self.highest_seen + 1

    def pending_commit(self) -> int | None:
        """Like committable(), but None when it is not ahead of what was already committed."""
        target = self.committable()
        if target is None or (self.committed is not None and target <= self.committed):
            return None
        return target


class OffsetTracker:
    """Offsets of every assigned partition, keyed by any hashable partition id."""

    def __init__(self) -> None:
        self._parts: dict[Hashable, PartitionOffsets] = {}

    def add(self, tp: Hashable, offset: int) -> None:
        self._parts.setdefault(tp, PartitionOffsets()).add(offset)

    def done(self, tp: Hashable, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None:
            part.done(offset)

    def in_flight(self, tp: Hashable | None = None) -> int:
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.in_flight) if part else 0
        return sum(len(p.in_flight) for p in self._parts.values())

    def to_commit(self, tps: Collection[Hashable] | None = None) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        for tp, part in self._parts.items():
            if tps is not None and tp not in tps:
                continue
            target = part.pending_commit()
            if target is not None:
                out[tp] = target
        return out

    def mark_committed(self, offsets: dict[Hashable, int]) -> None:
        for tp, off in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = off

    def forget(self, tps: Iterable[Hashable]) -> None:
        for tp in list(tps):
            self._parts.pop(tp, None)
