"""Nothing on the per-task path grows with the world, the number of worlds or the history: every query the
worker makes is served by an index (explained here on the real database), and the targeted writes by `_id`
cost the same on a large collection as on a small one.

(SecantusDB's `explain` reports a collection scan for `{_id: X, status: Y}` although it executes it by the
`_id` index, so the by-id claims and conditional updates are measured instead of explained.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from ai_worker.devstack.stack import StackInfo
from ai_worker.providers.history import HISTORY_COLLECTION, MongoRecorder
from ai_worker.tasks.store import TASKS, TaskStore
from ai_worker.worlds.status import COLLECTION as WORLDS
from ai_worker.worlds.status import WorldStatusStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(stack_info: StackInfo) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    name = f"indexes_{uuid.uuid4().hex[:10]}"
    try:
        yield client[name]  # not dropped: dropping is slow on the embedded server; names are unique
    finally:
        await client.close()


def _stages(plan: Any) -> list[str]:
    """Every stage name in a (nested) winning plan."""
    out: list[str] = []
    while isinstance(plan, dict):
        out.append(str(plan.get("stage")))
        plan = plan.get("inputStage")
    return out


async def _plan(db: Any, command: dict[str, Any]) -> list[str]:
    explained = await db.command("explain", command, verbosity="queryPlanner")
    planner = explained.get("queryPlanner") or explained["stages"][0]["$cursor"]["queryPlanner"]
    return _stages(planner["winningPlan"])


async def test_the_scans_and_recounts_use_indexes(db: Any) -> None:
    await TaskStore(db).ensure_indexes()
    await WorldStatusStore(db).ensure_indexes()
    await MongoRecorder(db).ensure_indexes()
    now = datetime.now(UTC)
    await db[TASKS].insert_many([{"_id": str(i), "type": "generate_post", "world_id": f"w{i % 7}",
                                  "status": "completed", "updated_at": now} for i in range(300)])
    await db[WORLDS].insert_many([{"_id": f"w{i}", "status": "completed", "updated_at": now} for i in range(50)])
    await db[HISTORY_COLLECTION].insert_many([{"_id": str(i), "world_id": f"w{i % 7}", "api_type": "llm",
                                               "cost": 0.0} for i in range(300)])
    old = now - timedelta(seconds=10)
    queries = {
        "reconciler: expired leases": {"find": TASKS, "filter": {"status": "in_progress", "lease_until": {"$lt": now}}},
        "reconciler: stale worlds": {"find": WORLDS, "filter": {"status": "in_progress", "updated_at": {"$lt": old}}},
        "recount: a world's tasks": {"aggregate": TASKS, "pipeline": [
            {"$match": {"world_id": "w1"}},
            {"$group": {"_id": {"type": "$type", "status": "$status"}, "n": {"$sum": 1}}}], "cursor": {}},
        "sync: a world's history": {"aggregate": HISTORY_COLLECTION, "pipeline": [
            {"$match": {"world_id": "w1", "api_type": {"$in": ["llm", "image_generation"]}}},
            {"$group": {"_id": "$api_type", "n": {"$sum": 1}}}], "cursor": {}},
        "operator: recent worlds": {"find": WORLDS, "filter": {}, "sort": {"created_at": -1}, "limit": 20},
    }
    for what, command in queries.items():
        stages = await _plan(db, command)
        assert "COLLSCAN" not in stages, (what, stages)


async def test_targeted_writes_cost_the_same_on_a_large_collection(db: Any) -> None:
    """A claim-like conditional update by `_id` on 5,000 tasks takes about as long as on 100."""

    async def per_update(collection: str, n: int) -> float:
        await db[collection].insert_many([{"_id": str(i), "status": "pending", "pad": "x" * 50} for i in range(n)])
        start = time.perf_counter()
        for i in range(60):
            await db[collection].update_one({"_id": str(i * (n // 60)), "status": "pending"},
                                            {"$set": {"status": "in_progress"}, "$inc": {"attempt_count": 1}})
        return (time.perf_counter() - start) / 60

    small = await per_update("small", 100)
    large = await per_update("large", 5_000)
    assert large < max(3 * small, 0.02), (small, large)
