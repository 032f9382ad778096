"""Retention: TTL indexes with the configured values (created, changed, dropped, idempotent), and the
`finished_at` date every terminal task transition sets (what the tasks' TTL index expires on)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import WorkerEnv, mongo

from ai_worker.config import Settings, load_settings
from ai_worker.mongo import Database
from ai_worker.retention import apply_retention
from ai_worker.tasks.store import TaskStore

pytestmark = pytest.mark.integration


def _settings(**days: float) -> Settings:
    return load_settings(check=False, MONGODB_URI="mongodb://unused", KAFKA_BROKERS="unused:9092", **days)


async def _ttls(db: Database) -> dict[str, tuple[str, dict[str, int], int]]:
    """collection -> (index name, key, expireAfterSeconds) of its TTL indexes."""
    out: dict[str, tuple[str, dict[str, int], int]] = {}
    for name in ("tasks", "api_requests_history", "model_stats", "world_generation_status", "world_parameters"):
        async for index in await db[name].list_indexes():
            if "expireAfterSeconds" in index:
                out[name] = (index["name"], dict(index["key"]), int(index["expireAfterSeconds"]))
    return out


async def test_ttl_indexes_follow_the_settings(wenv: WorkerEnv) -> None:
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        defaults = await apply_retention(db, _settings())
        assert defaults == {"tasks": "created: 30 days", "api_requests_history": "created: 30 days",
                            "model_stats": "created: 400 days"}
        assert await _ttls(db) == {
            "tasks": ("ttl_finished_at", {"finished_at": 1}, 30 * 86400),
            "api_requests_history": ("ttl_created_at", {"created_at": 1}, 30 * 86400),
            "model_stats": ("ttl_updated_at", {"updated_at": 1}, 400 * 86400),
        }  # the world status documents and world_parameters are kept
        again = await apply_retention(db, _settings())
        assert set(again.values()) == {"unchanged: 30 days", "unchanged: 400 days"}

        changed = await apply_retention(db, _settings(TASK_RETENTION_DAYS=7, HISTORY_RETENTION_DAYS=0.5,
                                                      MODEL_STATS_RETENTION_DAYS=0))
        assert changed == {"tasks": "changed: 7 days", "api_requests_history": "changed: 0.5 days",
                           "model_stats": "dropped: kept forever"}
        ttls = await _ttls(db)
        assert ttls["tasks"][2] == 7 * 86400 and ttls["api_requests_history"][2] == 43200
        assert "model_stats" not in ttls
        forever = await apply_retention(db, _settings(MODEL_STATS_RETENTION_DAYS=0, TASK_RETENTION_DAYS=7,
                                                      HISTORY_RETENTION_DAYS=0.5))
        assert forever["model_stats"] == "absent: kept forever"
    finally:
        await client.close()


async def test_a_foreign_index_on_the_field_is_left_alone(wenv: WorkerEnv) -> None:
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        await db["api_requests_history"].create_index("created_at", name="by_date")
        done = await apply_retention(db, _settings())
        assert done["api_requests_history"] == "conflict: 30 days"
        assert "api_requests_history" not in await _ttls(db)
    finally:
        await client.close()


async def test_the_worker_creates_them_with_the_configured_values(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    wenv.start_worker(TASK_RETENTION_DAYS="2", HISTORY_RETENTION_DAYS="3", MODEL_STATS_RETENTION_DAYS="0")
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        for _ in range(200):
            ttls = await _ttls(db)
            if "tasks" in ttls and "api_requests_history" in ttls:
                break
            await asyncio.sleep(0.1)
        assert ttls["tasks"][2] == 2 * 86400 and ttls["api_requests_history"][2] == 3 * 86400
        assert "model_stats" not in ttls
    finally:
        await client.close()


def _doc(task_id: str, world_id: str = "w") -> dict[str, Any]:
    return {"_id": task_id, "type": "generate_post", "world_id": world_id, "status": "pending", "worker_id": None,
            "parameters": {}, "result": None, "error": None, "attempt_count": 0}


async def test_every_terminal_transition_sets_finished_at(wenv: WorkerEnv) -> None:
    client = mongo(wenv.info)
    db = client[wenv.database]
    store = TaskStore(db)
    try:
        for task_id in ("done", "failed", "cancelled", "unclaimed", "world-1", "world-2", "retrying", "open"):
            await store.insert(_doc(task_id, "w2" if task_id.startswith("world") else "w"))
        for task_id, finish in (("done", "complete"), ("failed", "fail"), ("cancelled", "cancel"),
                                ("retrying", "retry")):
            task = await store.claim(task_id, "me", 60)
            assert task is not None
            if finish == "complete":
                assert await store.complete(task, "me", {})
            elif finish == "fail":
                assert await store.fail(task, "me", "boom", "unexpected")
            elif finish == "cancel":
                assert await store.cancel_claimed(task, "me", "world failed")
            else:
                from ai_worker.messaging.events import utcnow
                assert await store.schedule_retry(task, "me", "later", "timeout", utcnow())
        assert await store.fail_unclaimed("unclaimed", "unknown type", "unknown_task_type")
        assert await store.cancel_world("w2", "operator") == 2
        finished = {d["_id"]: d.get("finished_at") async for d in db["tasks"].find({})}
        terminal = {"done", "failed", "cancelled", "unclaimed", "world-1", "world-2"}
        assert {k for k, v in finished.items() if v is not None} == terminal
        assert finished["retrying"] is None and finished["open"] is None  # pending tasks never expire
    finally:
        await client.close()
