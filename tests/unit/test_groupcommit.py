"""Group commit (ai_worker.groupcommit): concurrent writes share a round trip, each caller still gets its
own outcome, and nothing is lost or double counted. The real database runs the same code in every
integration test (history records, world counters)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakedb import FakeCollection
from pymongo.errors import AutoReconnect, BulkWriteError

from ai_worker.groupcommit import GroupIncrement, GroupInsert


class Gated(FakeCollection):
    """A collection whose writes can be held in flight (`gate`), counting round trips."""

    def __init__(self) -> None:
        super().__init__("c")
        self.gate = asyncio.Event()
        self.gate.set()
        self.batches: list[list[dict[str, Any]]] = []
        self.fail_with: BaseException | None = None

    async def insert_many(self, docs: list[dict[str, Any]], ordered: bool = True) -> None:
        self.batches.append(list(docs))
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        for doc in docs:
            self.docs[doc["_id"]] = doc

    async def update_one(self, query: dict[str, Any], update: dict[str, Any], upsert: bool = False,
                         **kwargs: Any) -> Any:
        self.batches.append([update])
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return await super().update_one(query, update, upsert, **kwargs)


async def test_an_idle_process_writes_each_record_at_once() -> None:
    col, failed = Gated(), []
    group = GroupInsert(col, lambda doc, exc: failed.append(doc))  # type: ignore[arg-type]
    assert await group.insert({"_id": 1})
    assert await group.insert({"_id": 2})
    assert [len(b) for b in col.batches] == [1, 1] and set(col.docs) == {1, 2} and not failed


async def test_concurrent_records_share_one_insert() -> None:
    col = Gated()
    group = GroupInsert(col, lambda doc, exc: None)  # type: ignore[arg-type]
    assert all(await asyncio.gather(*(group.insert({"_id": i}) for i in range(25))))
    assert [len(b) for b in col.batches] == [25] and len(col.docs) == 25


async def test_records_that_arrive_during_a_round_trip_go_in_the_next_one_together() -> None:
    col = Gated()
    group = GroupInsert(col, lambda doc, exc: None)  # type: ignore[arg-type]
    col.gate.clear()
    first = asyncio.create_task(group.insert({"_id": 0}))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [asyncio.create_task(group.insert({"_id": i})) for i in range(1, 6)]
    await asyncio.sleep(0)
    col.gate.set()
    assert await first and all(await asyncio.gather(*later))
    assert [len(b) for b in col.batches] == [1, 5]


async def test_a_failed_round_trip_hands_every_record_to_the_fallback() -> None:
    col, kept = Gated(), []
    group = GroupInsert(col, lambda doc, exc: kept.append((doc["_id"], type(exc).__name__)))  # type: ignore[arg-type]
    col.fail_with = AutoReconnect("down")
    results = await asyncio.gather(*(group.insert({"_id": i}) for i in range(3)))
    assert results == [False, False, False]
    assert sorted(kept) == [(0, "AutoReconnect"), (1, "AutoReconnect"), (2, "AutoReconnect")]


async def test_a_duplicate_counts_as_written_and_only_other_errors_fail_their_record() -> None:
    col, kept = Gated(), []
    group = GroupInsert(col, lambda doc, exc: kept.append(doc["_id"]))  # type: ignore[arg-type]
    col.fail_with = BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 2, "code": 121}]})
    results = await asyncio.gather(*(group.insert({"_id": i}) for i in range(3)))
    assert results == [True, True, False] and kept == [2]


async def test_a_cancelled_caller_does_not_take_its_record_out() -> None:
    col = Gated()
    group = GroupInsert(col, lambda doc, exc: None)  # type: ignore[arg-type]
    col.gate.clear()
    caller = asyncio.create_task(group.insert({"_id": "kept"}))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    caller.cancel()
    col.gate.set()
    await group.drain()
    assert "kept" in col.docs


async def test_a_cancelled_round_trip_answers_its_callers() -> None:
    col, kept = Gated(), []
    group = GroupInsert(col, lambda doc, exc: kept.append(doc["_id"]))  # type: ignore[arg-type]
    col.gate.clear()
    callers = [asyncio.create_task(group.insert({"_id": i})) for i in range(3)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert group._drainer is not None
    group._drainer.cancel()
    assert await asyncio.gather(*callers) == [False, False, False]
    assert sorted(kept) == [0, 1, 2]


async def test_concurrent_increments_of_one_document_are_summed_into_one_update() -> None:
    col = Gated()
    await col.insert_one({"_id": "w", "n": 0, "cost": 0.0})
    group = GroupIncrement(col, {"n": 1, "cost": 1})  # type: ignore[arg-type]
    docs = await asyncio.gather(*(group.update("w", {"n": 1, "cost": 0.5}, {"at": i}, read=True) for i in range(8)))
    assert len(col.batches) == 1 and col.batches[0] == [{"$inc": {"n": 8, "cost": 4.0}, "$set": {"at": 7}}]
    assert col.docs["w"]["n"] == 8 and col.docs["w"]["cost"] == 4.0
    assert all(doc == {"_id": "w", "n": 8, "cost": 4.0} for doc in docs)


async def test_increments_during_a_round_trip_are_applied_once_in_the_next() -> None:
    col = Gated()
    await col.insert_one({"_id": "w", "n": 0})
    group = GroupIncrement(col, {"n": 1})  # type: ignore[arg-type]
    col.gate.clear()
    first = asyncio.create_task(group.update("w", {"n": 1}, read=True))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [asyncio.create_task(group.update("w", {"n": 1}, read=True)) for _ in range(4)]
    await asyncio.sleep(0)
    col.gate.set()
    assert (await first) == {"_id": "w", "n": 1}
    assert [d["n"] for d in await asyncio.gather(*later)] == [5, 5, 5, 5]
    assert col.docs["w"]["n"] == 5 and len(col.batches) == 2


async def test_documents_are_grouped_separately_and_without_a_read_when_nobody_asks() -> None:
    col = Gated()
    for w in ("a", "b"):
        await col.insert_one({"_id": w, "n": 0})
    group = GroupIncrement(col, {"n": 1})  # type: ignore[arg-type]
    col.calls.clear()
    out = await asyncio.gather(group.update("a", {"n": 1}), group.update("b", {"n": 2}), group.update("a", {"n": 3}))
    assert out == [{}, {}, {}]
    assert col.docs["a"]["n"] == 4 and col.docs["b"]["n"] == 2
    assert "find_one" not in col.calls


async def test_a_missing_document_is_none_and_a_failed_update_raises_in_every_caller() -> None:
    col = Gated()
    group = GroupIncrement(col, {"n": 1})  # type: ignore[arg-type]
    assert await group.update("nope", {"n": 1}, read=True) is None
    await col.insert_one({"_id": "w", "n": 0})
    col.fail_with = AutoReconnect("down")
    results = await asyncio.gather(*(group.update("w", {"n": 1}) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, AutoReconnect) for r in results)
    col.fail_with = None
    assert await group.update("w", {"n": 1}, read=True) == {"_id": "w", "n": 1}  # the group still works


async def test_a_cancelled_increment_round_answers_its_callers() -> None:
    col = Gated()
    await col.insert_one({"_id": "w", "n": 0})
    group = GroupIncrement(col, {"n": 1})  # type: ignore[arg-type]
    col.gate.clear()
    callers = [asyncio.create_task(group.update("w", {"n": 1})) for _ in range(2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    group._drainers["w"].cancel()
    for caller in callers:
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert not group._drainers
