"""Scheduling policy shared by the consumer (which task runs next) and the provider router (which waiting
request gets the next LLM or image slot): fair across worlds, then work that unlocks more work first.

Every unit of work carries a `WorkClass`: the world it belongs to and its job's `priority` (higher first:
the world description, character and post batches before leaf work such as images). When a slot frees,
the waiter chosen is the one whose world holds the fewest slots of that pool (a world started while others
run gets its share promptly), then the highest priority, then the longest waiting (FIFO). The running job's
class travels to the provider calls it makes through a context variable, so the router needs no
arguments from the job.

A `WorkClass` also names the provider pool its task mostly waits for (the job's `pool`). The consumer caps
the running tasks of each pool (`pool_cap`: the pool's slots and a few more): without the cap,
high-priority LLM work (posts) took every task slot while its tasks queued for the 15 LLM slots, and the
image slots idled for ~8 s of a 45 s world (bench/results/makespan.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WorkClass:
    world: str
    priority: int = 0
    pool: str = ""  # the provider slots its task mostly waits for ("llm", "image"; "" none)


def pool_cap(slots: int) -> int:
    """How many tasks of a provider pool one worker runs at once: its slots, plus a few (a fifth, at least
    two) already claimed and waiting, so that a slot freed by a call that ended is taken at once while the
    finished task records, uploads and completes. Not more: a claimed task waits for this worker's slots
    even when another worker's idle, so twice the slots (the cap until then) left one of two workers with
    up to ten images queued on its own slots at the end of a world while the other's slots emptied
    (bench/results/makespan.md)."""
    return slots + max(2, slots // 5)


UNCLASSIFIED = WorkClass(world="", priority=0)
CURRENT: ContextVar[WorkClass] = ContextVar("ai_worker_work_class", default=UNCLASSIFIED)


@contextlib.contextmanager
def working_as(work: WorkClass) -> Iterator[None]:
    """Run the enclosed code (and the provider calls it makes) as `work`."""
    token = CURRENT.set(work)
    try:
        yield
    finally:
        CURRENT.reset(token)


_seq = itertools.count()


@dataclass(order=False)
class _Waiter:
    work: WorkClass
    seq: int
    future: asyncio.Future[None] = field(repr=False)


class FairSlots:
    """A semaphore whose waiters are served fair by world, then by priority, then FIFO."""

    def __init__(self, capacity: int, name: str = "slots") -> None:
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be at least 1")
        self.capacity = capacity
        self.name = name
        self._held: Counter[str] = Counter()
        self._in_use = 0
        self._waiters: list[_Waiter] = []

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _key(self, w: _Waiter) -> tuple[int, int, int]:
        return (self._held[w.work.world], -w.work.priority, w.seq)

    async def acquire(self, work: WorkClass | None = None) -> WorkClass:
        work = work if work is not None else CURRENT.get()
        if self._in_use < self.capacity and not self._waiters:
            self._take(work)
            return work
        loop = asyncio.get_running_loop()
        waiter = _Waiter(work=work, seq=next(_seq), future=loop.create_future())
        self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                self.release(work)  # granted just as we were cancelled: give it back
            raise
        return work

    def _take(self, work: WorkClass) -> None:
        self._in_use += 1
        self._held[work.world] += 1

    def release(self, work: WorkClass) -> None:
        self._in_use -= 1
        self._held[work.world] -= 1
        if self._held[work.world] <= 0:
            del self._held[work.world]
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_use < self.capacity:
            best = min(self._waiters, key=self._key)
            self._waiters.remove(best)
            if best.future.done():  # cancelled while waiting
                continue
            self._take(best.work)
            best.future.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, work: WorkClass | None = None) -> AsyncIterator[None]:
        held = await self.acquire(work)
        try:
            yield
        finally:
            self.release(held)


class FairQueue(Generic[T]):
    """Buffered work items, taken fair by world (the world with the fewest running items first), then by
    priority, then in arrival order; never items of a `full` pool (so that tasks waiting for one provider's
    slots do not take every task slot while another provider idles, and stay pending where a worker whose
    slots of that pool idle can take them).
    O(worlds x pools) per pop."""

    def __init__(self) -> None:
        self._by_class: dict[tuple[str, str], list[tuple[int, int, T]]] = {}  # (world, pool) -> heap
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def pools(self) -> set[str]:
        """The pools of the buffered items."""
        return {pool for _, pool in self._by_class}

    def push(self, item: T, work: WorkClass) -> None:
        heapq.heappush(self._by_class.setdefault((work.world, work.pool), []), (-work.priority, next(_seq), item))
        self._size += 1

    def pop(self, running: Counter[str], full: Collection[str] = ()) -> tuple[T, WorkClass] | None:
        """The next item to start, given how many items of each world are running now and which pools are
        full."""
        if not self._size:
            return None
        keys = [k for k in self._by_class if k[1] not in full]
        if not keys:
            return None
        key = min(keys, key=lambda k: (running[k[0]], self._by_class[k][0][0], self._by_class[k][0][1]))
        heap = self._by_class[key]
        neg_priority, _, item = heapq.heappop(heap)
        if not heap:
            del self._by_class[key]
        self._size -= 1
        return item, WorkClass(world=key[0], priority=-neg_priority, pool=key[1])

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Drop (and return) the items for which `predicate` is true (e.g. of revoked partitions)."""
        removed: list[T] = []
        for key in list(self._by_class):
            keep = [entry for entry in self._by_class[key] if not predicate(entry[2])]
            removed.extend(entry[2] for entry in self._by_class[key] if predicate(entry[2]))
            if keep:
                heapq.heapify(keep)
                self._by_class[key] = keep
            else:
                del self._by_class[key]
        self._size -= len(removed)
        return removed


__all__ = ["CURRENT", "UNCLASSIFIED", "FairQueue", "FairSlots", "WorkClass", "working_as"]
