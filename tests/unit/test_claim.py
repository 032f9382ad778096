"""The claim: read by `_id`, decide in Python, compare-and-set on what was read (TaskStore.try_claim).
The real database runs the same claim in tests/integration/test_engine.py (ten racing claimers, one wins)
and tests/integration/test_indexes.py (its cost does not grow with the collection)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fakedb import FakeDatabase
from pymongo.errors import OperationFailure

from ai_worker.tasks.store import TASKS, TaskStore, claimable

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
PAST, FUTURE = NOW - timedelta(seconds=5), NOW + timedelta(seconds=5)


@pytest.mark.parametrize(("doc", "types", "expected"), [
    ({"status": "pending"}, None, True),
    ({"status": "pending", "not_before": None}, None, True),
    ({"status": "pending", "not_before": PAST}, None, True),
    ({"status": "pending", "not_before": NOW}, None, True),
    ({"status": "pending", "not_before": FUTURE}, None, False),
    ({"status": "pending", "not_before": PAST.replace(tzinfo=None)}, None, True),  # a naive date is UTC
    ({"status": "pending", "not_before": "2026-01-01"}, None, False),  # not a date: quarantined elsewhere
    ({"status": "in_progress", "lease_until": PAST}, None, True),
    ({"status": "in_progress", "lease_until": FUTURE}, None, False),
    ({"status": "in_progress", "lease_until": NOW}, None, False),
    ({"status": "in_progress"}, None, False),
    ({"status": "in_progress", "lease_until": "soon"}, None, False),
    ({"status": "completed"}, None, False),
    ({"status": "failed"}, None, False),
    ({"status": None}, None, False),
    ({"status": "pending", "type": "generate_post"}, {"generate_post"}, True),
    ({"status": "pending", "type": "mystery"}, {"generate_post"}, False),
    ({"status": "pending", "type": {"not": "hashable"}}, {"generate_post"}, False),
    ({"status": "pending"}, {"generate_post"}, False),
])
def test_what_is_claimable(doc: dict[str, Any], types: set[str] | None, expected: bool) -> None:
    assert claimable(doc, NOW, types) is expected


def _task(**fields: Any) -> dict[str, Any]:
    return {"_id": "t1", "type": "generate_post", "world_id": "w1", "status": "pending", "attempt_count": 0,
            "parameters": {}, "updated_at": PAST, **fields}


async def test_the_claimed_document_is_what_the_database_holds() -> None:
    db = FakeDatabase()
    await db[TASKS].insert_one(_task(steps={"ask": 1}, attempts=[{"worker_id": "old", "started_at": PAST}]))
    claim = await TaskStore(db).try_claim("t1", "me", 60, ["generate_post"])  # type: ignore[arg-type]
    assert claim.claimed is not None
    assert claim.claimed == db[TASKS].docs["t1"]
    assert claim.claimed["status"] == "in_progress" and claim.claimed["worker_id"] == "me"
    assert claim.claimed["attempt_count"] == 1 and len(claim.claimed["attempts"]) == 2
    assert claim.current is not None and claim.current["status"] == "pending"


async def test_a_platform_task_without_our_fields_is_claimed() -> None:
    db = FakeDatabase()
    await db[TASKS].insert_one({"_id": "t1", "type": "generate_world_description", "world_id": "w1",
                                "status": "pending", "parameters": {}, "created_at": "2026-11-30T12:00:00Z",
                                "updated_at": "2026-11-30T12:00:00Z"})
    claim = await TaskStore(db).try_claim("t1", "me", 60)  # type: ignore[arg-type]
    assert claim.claimed == db[TASKS].docs["t1"]
    assert claim.claimed is not None and claim.claimed["attempt_count"] == 1


async def test_a_second_claimer_gets_nothing_and_sees_the_claim() -> None:
    db = FakeDatabase()
    await db[TASKS].insert_one(_task())
    store = TaskStore(db)  # type: ignore[arg-type]
    first = await store.try_claim("t1", "a", 60)
    second = await store.try_claim("t1", "b", 60)
    assert first.claimed is not None and second.claimed is None
    assert second.current is not None and second.current["worker_id"] == "a"


async def test_a_write_between_the_read_and_the_claim_is_not_lost() -> None:
    """An old holder whose lease expired saves a step after the claimer read the task: the claimer's
    compare-and-set misses, it reads again, and the claimed document carries that step."""
    db = FakeDatabase()
    await db[TASKS].insert_one(_task(status="in_progress", worker_id="old", attempt_count=1, lease_until=PAST))
    tasks = db[TASKS]
    real_find = tasks.find_one
    reads = 0

    async def find_then_old_holder_writes(query: dict[str, Any], projection: Any = None) -> Any:
        nonlocal reads
        doc = await real_find(query, projection)
        reads += 1
        if reads == 1:
            await tasks.update_one({"_id": "t1", "worker_id": "old", "attempt_count": 1},
                                   {"$set": {"steps.ask": "paid answer", "updated_at": NOW}})
        return doc

    tasks.find_one = find_then_old_holder_writes  # type: ignore[method-assign]
    claim = await TaskStore(db).try_claim("t1", "me", 60)  # type: ignore[arg-type]
    assert reads == 2
    assert claim.claimed is not None and claim.claimed["steps"] == {"ask": "paid answer"}
    assert claim.claimed == tasks.docs["t1"] and claim.claimed["attempt_count"] == 2


async def test_a_task_that_stays_busy_is_given_up_after_a_few_rounds() -> None:
    db = FakeDatabase()
    await db[TASKS].insert_one(_task())
    tasks = db[TASKS]
    real_find = tasks.find_one
    bumps = 0

    async def find_then_touch(query: dict[str, Any], projection: Any = None) -> Any:
        nonlocal bumps
        doc = await real_find(query, projection)
        bumps += 1
        await tasks.update_one({"_id": "t1"}, {"$set": {"updated_at": NOW + timedelta(milliseconds=bumps)}})
        return doc

    tasks.find_one = find_then_touch  # type: ignore[method-assign]
    claim = await TaskStore(db).try_claim("t1", "me", 60)  # type: ignore[arg-type]
    assert claim.claimed is None and claim.current is not None and claim.current["status"] == "pending"
    assert tasks.docs["t1"]["attempt_count"] == 0


async def test_a_document_the_claim_cannot_update_is_handed_back_for_quarantine() -> None:
    db = FakeDatabase()
    await db[TASKS].insert_one(_task(attempt_count="one"))
    db[TASKS].fail_next("update_one", OperationFailure("Cannot apply $inc to a value of non-numeric type", 14))
    claim = await TaskStore(db).try_claim("t1", "me", 60)  # type: ignore[arg-type]
    assert claim.claimed is None and claim.current is not None and claim.current["attempt_count"] == "one"


async def test_other_database_errors_are_raised() -> None:
    db = FakeDatabase()
    await db[TASKS].insert_one(_task())
    db[TASKS].fail_next("update_one", OperationFailure("not primary", 10107))
    with pytest.raises(OperationFailure):
        await TaskStore(db).try_claim("t1", "me", 60)  # type: ignore[arg-type]


async def test_an_unknown_task_is_neither_claimed_nor_read() -> None:
    claim = await TaskStore(FakeDatabase()).try_claim("nope", "me", 60)  # type: ignore[arg-type]
    assert claim.claimed is None and claim.current is None
