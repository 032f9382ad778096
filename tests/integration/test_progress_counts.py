"""World counters equal the truth even when a recount and a transition's own increment cross (issue #16:
"counters equal the truth"): a recount that reads a task already completed, while that task's increment
is still on its way, counted it once more when the increment landed; the final recount only raised counts
($max), so the excess stayed. Found by the C7 chaos run (a 10/40 world ended with tasks_completed one
above its completed tasks). Against the embedded database, since the guard is a query condition."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from ai_worker.devstack.stack import StackInfo
from ai_worker.jobs import build_registry
from ai_worker.messaging.events import TaskType, utcnow
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore, new_status_document

pytestmark = pytest.mark.integration

INIT, DESC = TaskType.INIT_WORLD_CREATION.value, TaskType.GENERATE_WORLD_DESCRIPTION.value


@pytest.fixture
async def db(stack_info: StackInfo) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    try:
        yield client[f"counts_{uuid.uuid4().hex[:10]}"]
    finally:
        await client.close()


async def _world(db: Any) -> tuple[str, WorldProgress, WorldStatusStore]:
    world_id = str(uuid.uuid4())
    status = WorldStatusStore(db)
    await status.open(world_id, new_status_document(users=1, posts=1, user_prompt="p", task_predicted=2,
                                                    llm_call_limit=10, image_call_limit=10, budget_usd=None,
                                                    now=utcnow(), first_task_type=INIT))
    return world_id, WorldProgress(status, build_registry(), tasks=TaskStore(db)), status


async def _task(db: Any, world_id: str, task_type: str, status: str) -> str:
    task_id = str(uuid.uuid4())
    now = utcnow()
    await db["tasks"].insert_one({"_id": task_id, "type": task_type, "world_id": world_id, "status": status,
                                  "parameters": {}, "attempt_count": 1, "created_at": now, "updated_at": now})
    return task_id


async def test_an_increment_that_arrives_after_the_final_recount_is_not_counted_again(db: Any) -> None:
    world_id, progress, status = await _world(db)
    await _task(db, world_id, INIT, "completed")
    # The init task completed and inserted no children; before its own `$inc` lands, a recount runs (the
    # reconciler's, or a quarantine's): every task is terminal, so it counts them and finishes the world.
    assert await progress.recount(world_id) == "completed"
    assert await progress.record(world_id, completed=INIT) is None  # the late increment: not applied
    doc = await status.get(world_id)
    assert doc is not None and doc["status"] == "completed"
    assert (doc["tasks_total"], doc["tasks_completed"], doc["tasks_failed"]) == (1, 1, 0)
    assert doc["task_counts"][INIT] == {"total": 1, "done": 1, "failed": 0}


async def test_a_mid_world_recount_that_counted_ahead_is_made_exact_by_the_final_one(db: Any) -> None:
    world_id, progress, status = await _world(db)
    await _task(db, world_id, INIT, "completed")
    desc = await _task(db, world_id, DESC, "pending")
    await progress.record(world_id, inserted=Counter({DESC: 1}))  # init's children...
    # ...then, before init's own completion is counted, a recount reads it as completed (a mid-world
    # recount may only raise the counts), and init's increment lands after it.
    assert await progress.recount(world_id) is None
    await progress.record(world_id, completed=INIT)
    ahead = await status.get(world_id)
    assert ahead is not None and ahead["tasks_completed"] == 2  # one ahead of the truth, for now
    await db["tasks"].update_one({"_id": desc}, {"$set": {"status": "completed"}})
    state = await progress.record(world_id, completed=DESC)  # the last transition: the final recount
    assert state is not None and state.finished == "completed"
    doc = await status.get(world_id)
    assert doc is not None and (doc["tasks_total"], doc["tasks_completed"]) == (2, 2)


async def test_an_operators_retry_lifts_the_final_mark(db: Any) -> None:
    world_id, progress, status = await _world(db)
    await _task(db, world_id, INIT, "failed")
    assert await progress.recount(world_id) == "failed"
    assert await status.reopen(world_id)
    assert await progress.record(world_id, inserted=Counter({DESC: 1})) is not None
    doc = await status.get(world_id)
    assert doc is not None and doc["tasks_total"] == 2 and "counts_final" not in doc
