"""Group commit: concurrent writes of one process share a round trip, with no added wait.

The first write to arrive starts a round trip on the next turn of the event loop; what arrives while a
round trip is in flight waits and goes in the next one, together. An idle process therefore writes one
document per round trip as before, and a busy one writes many. Every caller still waits until its own
write is acknowledged (or failed), so what a caller may assume afterwards does not change.

- `GroupInsert`: documents into one collection, one `insert_many(ordered=False)` per round trip.
- `GroupIncrement`: `$inc` / `$set` updates of one document by `_id`, merged into one `update_one` per
  round trip (increments add up, the last `$set` of a field wins), optionally followed by one read of the
  document that every caller of that round trip receives.

Why: on the embedded database a command's fixed cost is most of a small write's cost (measured: a history
record alone 0.86 ms of database CPU, in fours 0.36 ms; a world's `$inc` alone 0.79 ms, merged by eight
0.09 ms each), and the worker's per-call history records and per-transition world counters were a third of
its commands (bench/results/throughput.md)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pymongo.errors import BulkWriteError

from ai_worker.mongo import Collection, Document

__all__ = ["GroupIncrement", "GroupInsert"]

DUPLICATE_KEY = 11000


class GroupInsert:
    """Inserts into one collection, grouped. `insert` returns True once the document is written (or was
    already: a duplicate `_id` counts as written); on any other failure it calls `on_failed(doc, exc)`
    and returns False, so one bad round trip never raises into the caller that merely recorded something."""

    def __init__(self, collection: Collection, on_failed: Callable[[Document, BaseException], None], *,
                 max_batch: int = 200) -> None:
        self._collection = collection
        self._on_failed = on_failed
        self._max_batch = max_batch
        self._queue: list[tuple[Document, asyncio.Future[bool]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def insert(self, doc: Document) -> bool:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._queue.append((doc, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        # shield: a caller that is cancelled meanwhile does not take its document out of the round trip
        return await asyncio.shield(done)

    async def drain(self) -> None:
        """Wait until everything queued so far has been written or handed to `on_failed`."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)

    async def _drain(self) -> None:
        batch: list[tuple[Document, asyncio.Future[bool]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
                failed: dict[int, BaseException] = {}
                try:
                    await self._collection.insert_many([doc for doc, _ in batch], ordered=False)
                except BulkWriteError as exc:
                    for error in exc.details.get("writeErrors", []):
                        if error.get("code") != DUPLICATE_KEY:
                            failed[int(error["index"])] = exc
                except Exception as exc:  # the database is away: every document of the round trip failed
                    failed = dict.fromkeys(range(len(batch)), exc)
                self._settle(batch, failed)
                batch = []
        except BaseException as exc:  # cancelled (shutdown): nothing queued may be left unanswered
            leftover, self._queue = [*batch, *self._queue], []
            self._settle(leftover, dict.fromkeys(range(len(leftover)), exc))
            raise

    def _settle(self, batch: list[tuple[Document, asyncio.Future[bool]]], failed: dict[int, BaseException]) -> None:
        for i, (doc, done) in enumerate(batch):
            error = failed.get(i)
            if error is not None:
                self._on_failed(doc, error)
            if not done.done():
                done.set_result(error is None)


@dataclass
class _Round:
    inc: Counter[str] = field(default_factory=Counter)
    sets: dict[str, Any] = field(default_factory=dict)
    read: bool = False
    waiters: list[asyncio.Future[Document | None]] = field(default_factory=list)


class GroupIncrement:
    """`$inc` / `$set` updates of documents by `_id`, grouped per document. `update` returns the document
    as read after the round trip that carried the update (`projection` fields; only when some caller of
    that round trip asked for it, else an empty dict), or None when no such document exists. A failed
    round trip raises in each of its callers. `guard`: more conditions on the document; an update of a
    document that does not meet them is not applied and returns None, like a missing document."""

    def __init__(self, collection: Collection, projection: Mapping[str, Any] | None = None, *,
                 guard: Mapping[str, Any] | None = None) -> None:
        self._collection = collection
        self._projection = dict(projection) if projection is not None else None
        self._guard = dict(guard or {})
        self._next: dict[str, _Round] = {}
        self._drainers: dict[str, asyncio.Task[None]] = {}

    async def update(self, doc_id: str, inc: Mapping[str, float], sets: Mapping[str, Any] | None = None, *,
                     read: bool = False) -> Document | None:
        loop = asyncio.get_running_loop()
        nxt = self._next.get(doc_id)
        if nxt is None:
            nxt = self._next[doc_id] = _Round()
        nxt.inc.update(inc)
        nxt.sets.update(sets or {})
        nxt.read = nxt.read or read
        done: asyncio.Future[Document | None] = loop.create_future()
        nxt.waiters.append(done)
        if doc_id not in self._drainers:
            self._drainers[doc_id] = loop.create_task(self._drain(doc_id))
        return await asyncio.shield(done)

    async def _drain(self, doc_id: str) -> None:
        current: _Round | None = None
        try:
            while (current := self._next.pop(doc_id, None)) is not None:
                try:
                    result = await self._apply(doc_id, current)
                except Exception as exc:
                    self._answer(current, exc)
                    continue
                self._answer(current, result)
            current = None
        except BaseException as exc:  # cancelled (shutdown): nobody may wait forever
            for left in (current, self._next.pop(doc_id, None)):
                if left is not None:
                    self._answer(left, exc)
            raise
        finally:
            del self._drainers[doc_id]

    @staticmethod
    def _answer(done_round: _Round, outcome: Document | BaseException | None) -> None:
        for done in done_round.waiters:
            if done.done():
                continue
            if isinstance(outcome, asyncio.CancelledError):
                done.cancel()
            elif isinstance(outcome, BaseException):
                done.set_exception(outcome)
                done.exception()  # retrieved here too: a caller that was cancelled meanwhile must not warn
            else:
                done.set_result(outcome)

    async def _apply(self, doc_id: str, current: _Round) -> Document | None:
        update: Document = {}
        inc = {k: v for k, v in current.inc.items() if v}
        if inc:
            update["$inc"] = inc
        if current.sets:
            update["$set"] = current.sets
        if update:
            res = await self._collection.update_one({"_id": doc_id, **self._guard}, update)
            if not res.matched_count:
                return None
        if not current.read:
            return {}
        doc: Document | None = await self._collection.find_one({"_id": doc_id}, self._projection)
        return doc
